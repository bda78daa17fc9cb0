"""Rebuild the shipped demo data from the bundled model.

    python -m spa_lite.demo.build --out spa_lite/demo/data [--seed 0] [--samples 4] [--max-new-tokens 64] [--limit N]

1. Splits the demo records by *question* (so the splits share no question) into seed-candidate
   prompts, the iteration prompt pool and held-out eval prompts.
2. Samples ``--samples`` responses per seed candidate from the bundled model and labels them with the
   verifier; a prompt whose samples disagree (some pass, some fail) yields one pair
   (chosen = a passing sample, rejected = a failing one). Stops at ``--target-pairs``.
3. Does the same on the eval prompts for held-out gold pairs (``--target-eval-pairs``).
4. Writes, atomically: seed_pairs.jsonl, prompts.jsonl, eval_prompts.jsonl, eval_pairs.jsonl and
   build_info.json.

``--gold-pool N`` only grows the gold: gold_pool.jsonl holds seed_pairs.jsonl's rows unchanged, then pairs
sampled the same way from prompts of the *seed* questions not sampled before (the seed candidates left over,
then more constraint kinds per seed question), until N pairs. Its questions stay disjoint from the pool's (and
so from the dev prompts at the pool's end) and the eval prompts'; nothing else in ``--out`` changes. It refuses
a ``--seed``, ``--limit``, ``--pool-size`` or ``--eval-size`` other than the build's (another split) before
sampling. Consumers shuffle the whole file, so the first G pairs of gold_pool.jsonl after a recipe's shuffle are
not those of seed_pairs.jsonl, even for G <= 150.

The iteration pool carries prompts and constraints only: SPA iterations label responses with the model
itself, never with the verifier.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from spa_lite.demo import tasks
from spa_lite.io import atomic_write_text

#: Weights for the *extra* constraint kinds drawn for seed-candidate questions: the kinds the tiny
#: bundled model (almost) never satisfies are rare, since they cannot yield a pair.
SEED_EXTRA_WEIGHTS = {k: (0.1 if k in tasks.LOW_SEPARATION_KINDS else w) for k, w in tasks.KIND_WEIGHTS.items()}


def _log(msg: str) -> None:
    print(f"[demo.build {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Splits (pure, no model)
# --------------------------------------------------------------------------


def split_records(
    records: Sequence[dict],
    *,
    seed: int = 0,
    eval_size: int = 100,
    pool_size: int = 320,
) -> Tuple[List[dict], List[dict], List[dict]]:
    """Split ``records`` by question into (seed_candidates, pool, eval).

    Questions are shuffled with ``seed``; whole questions go to eval until it holds ``eval_size``
    records, then to the pool until it holds ``pool_size``, the rest to the seed candidates.
    """
    by_q: Dict[int, List[dict]] = defaultdict(list)
    for r in records:
        by_q[tasks.question_index(r)].append(r)
    order = sorted(by_q)
    random.Random(f"spa-demo-split:{seed}").shuffle(order)
    seed_c: List[dict] = []
    pool: List[dict] = []
    evals: List[dict] = []
    for qi in order:
        if len(evals) < eval_size:
            evals.extend(by_q[qi])
        elif len(pool) < pool_size:
            pool.extend(by_q[qi])
        else:
            seed_c.extend(by_q[qi])
    return seed_c, pool, evals


def _group_by_question(records: Sequence[dict]) -> Dict[int, List[dict]]:
    """Records grouped by question index, questions in order of first appearance."""
    by_q: Dict[int, List[dict]] = {}
    for r in records:
        by_q.setdefault(tasks.question_index(r), []).append(r)
    return by_q


def expand_seed_candidates(seed_records: Sequence[dict], *, seed: int = 0, extra_kinds: int = 2) -> List[dict]:
    """Seed candidates: each seed question's records plus ``extra_kinds`` more kinds (separating kinds
    preferred), ordered question by question. Low-separation kinds are kept for one question in four."""
    by_q = _group_by_question(seed_records)
    out: List[dict] = []
    for qi in by_q:
        rng = random.Random(f"spa-demo-seedextra:{seed}:{qi}")
        have = {r["constraint"]["kind"] for r in by_q[qi]}
        weights = {k: w for k, w in SEED_EXTRA_WEIGHTS.items() if k not in have}
        extra = tasks._weighted_kinds(rng, extra_kinds, weights)
        recs = list(by_q[qi]) + tasks.records_for_question(qi, extra, seed=seed, salt="seed-extra")
        keep_low = rng.random() < 0.25
        out.extend(r for r in recs if keep_low or r["constraint"]["kind"] not in tasks.LOW_SEPARATION_KINDS)
    return out


def grow_records(base: Sequence[dict], kinds_per_question: int, *, seed: int = 0, salt: str = "grow") -> List[dict]:
    """More prompts for the same questions: each question of ``base`` keeps its records and gets further
    constraint kinds (drawn with :data:`tasks.KIND_WEIGHTS`, distinct per question) up to
    ``kinds_per_question`` records. Pure and deterministic in ``seed``; question sets are unchanged, so
    splits stay disjoint by question."""
    by_q = _group_by_question(base)
    out: List[dict] = []
    for qi in by_q:
        have = {r["constraint"]["kind"] for r in by_q[qi]}
        rng = random.Random(f"spa-demo-{salt}:{seed}:{qi}")
        weights = {k: w for k, w in tasks.KIND_WEIGHTS.items() if k not in have}
        extra = tasks._weighted_kinds(rng, max(0, kinds_per_question - len(have)), weights)
        out.extend(by_q[qi])
        out.extend(tasks.records_for_question(qi, extra, seed=seed, salt=salt))
    return out


def gold_candidates(seed_candidates: Sequence[dict], sampled: int, *, seed: int = 0,
                    kinds_per_question: int = 10) -> List[dict]:
    """Seed-question prompts for growing the gold pool: the seed candidates after the first ``sampled`` (never
    sampled for seed_pairs.jsonl), then each seed question's further constraint kinds (separating kinds preferred,
    as for the seed candidates) up to ``kinds_per_question`` kinds, shuffled with ``seed`` so that a pool cut at
    any size spreads over the questions. No record id (question x kind) repeats a seed candidate's."""
    left = list(seed_candidates[sampled:])
    taken = {r["id"] for r in seed_candidates}
    extra: List[dict] = []
    for qi, recs in _group_by_question(seed_candidates).items():
        have = {r["constraint"]["kind"] for r in recs}
        rng = random.Random(f"spa-demo-gold:{seed}:{qi}")
        weights = {k: w for k, w in SEED_EXTRA_WEIGHTS.items() if k not in have}
        kinds = tasks._weighted_kinds(rng, max(0, kinds_per_question - len(have)), weights)
        extra.extend(r for r in tasks.records_for_question(qi, kinds, seed=seed, salt="gold")
                     if r["id"] not in taken)
    random.Random(f"spa-demo-gold-order:{seed}").shuffle(extra)
    return left + extra


def prompt_row(rec: dict) -> dict:
    return {"id": rec["id"], "prompt": rec["prompt"], "constraint": rec["constraint"]}


def choose_pair(samples: Sequence, constraint: dict) -> Optional[Tuple[object, object]]:
    """(chosen, rejected) from samples with ``.text``/``.truncated``, or None when they do not disagree.

    Chosen: the first passing sample, preferring one that ended on its own (not truncated).
    Rejected: the first failing sample with the same truncation status as the chosen one, else the
    first failing sample.
    """
    verdicts = [tasks.verify(s.text, constraint) for s in samples]
    passing = [s for s, v in zip(samples, verdicts, strict=True) if v]
    failing = [s for s, v in zip(samples, verdicts, strict=True) if not v]
    if not passing or not failing:
        return None
    chosen = next((s for s in passing if not s.truncated), passing[0])
    rejected = next((s for s in failing if s.truncated == chosen.truncated), failing[0])
    return chosen, rejected


def pair_row(rec: dict, chosen, rejected) -> dict:
    return {
        "id": rec["id"],
        "prompt": rec["prompt"],
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "constraint": rec["constraint"],
    }


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _kind_counts(rows: Sequence[dict]) -> Dict[str, int]:
    c: Dict[str, int] = defaultdict(int)
    for r in rows:
        c[r["constraint"]["kind"]] += 1
    return {k: c[k] for k in tasks.CONSTRAINT_KINDS if k in c}


def write_jsonl(path: Path, rows: Sequence[dict]) -> int:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


# --------------------------------------------------------------------------
# Sampling + labelling
# --------------------------------------------------------------------------


class KindStats:
    def __init__(self) -> None:
        self.d: Dict[str, Dict[str, int]] = defaultdict(
            lambda: {"prompts": 0, "separated": 0, "samples": 0, "passed": 0, "truncated": 0}
        )

    def add(self, kind: str, verdicts: Sequence[bool], truncated: Sequence[bool]) -> None:
        e = self.d[kind]
        e["prompts"] += 1
        e["samples"] += len(verdicts)
        e["passed"] += sum(verdicts)
        e["truncated"] += sum(truncated)
        e["separated"] += int(any(verdicts) and not all(verdicts))

    def merged(self, other: "KindStats") -> "KindStats":
        out = KindStats()
        for src in (self, other):
            for k, e in src.d.items():
                for f, v in e.items():
                    out.d[k][f] += v
        return out

    def report(self) -> Dict[str, Dict]:
        rep = {}
        for k in tasks.CONSTRAINT_KINDS:
            if k not in self.d:
                continue
            e = dict(self.d[k])
            e["separation_rate"] = round(e["separated"] / e["prompts"], 3) if e["prompts"] else None
            e["pass_rate"] = round(e["passed"] / e["samples"], 3) if e["samples"] else None
            rep[k] = e
        fields = ("prompts", "separated", "samples", "passed", "truncated")
        tot = {f: sum(e[f] for e in self.d.values()) for f in fields}
        tot["separation_rate"] = round(tot["separated"] / tot["prompts"], 3) if tot["prompts"] else None
        tot["pass_rate"] = round(tot["passed"] / tot["samples"], 3) if tot["samples"] else None
        rep["_all"] = tot
        return rep


def collect_pairs(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    target: int,
    stage: str,
    args: argparse.Namespace,
    stats: KindStats,
    seed_offset: int,
) -> Tuple[List[dict], int, int]:
    """Sample and label ``records`` chunk by chunk until ``target`` pairs.

    Returns (pairs, prompts sampled, pairs whose chosen response was truncated)."""
    from spa_lite.generation import sample_responses

    pairs: List[dict] = []
    used = 0
    chosen_truncated = 0
    chunk = args.batch_size
    t0 = time.time()
    for ci, start in enumerate(range(0, len(records), chunk)):
        if len(pairs) >= target:
            break
        part = records[start : start + chunk]
        samples = sample_responses(
            model,
            tokenizer,
            [r["prompt"] for r in part],
            num_samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed * 1_000_003 + seed_offset + ci * 1000,
            batch_size=chunk,
        )
        for rec, ss in zip(part, samples, strict=True):
            used += 1
            verdicts = [tasks.verify(s.text, rec["constraint"]) for s in ss]
            stats.add(rec["constraint"]["kind"], verdicts, [s.truncated for s in ss])
            if len(pairs) < target:
                pair = choose_pair(ss, rec["constraint"])
                if pair is not None:
                    pairs.append(pair_row(rec, *pair))
                    chosen_truncated += int(bool(pair[0].truncated))
        _log(
            f"[{stage}] chunk {ci + 1}: {used}/{len(records)} prompts, {len(pairs)}/{target} pairs, "
            f"{time.time() - t0:.0f}s"
        )
    return pairs, used, chosen_truncated


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m spa_lite.demo.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "data"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=4, help="responses sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="at most N seed candidates and N eval prompts are sampled")
    p.add_argument("--target-pairs", type=int, default=150, help="seed pairs to collect")
    p.add_argument("--target-eval-pairs", type=int, default=50, help="held-out gold pairs to collect")
    p.add_argument("--eval-size", type=int, default=100, help="held-out eval prompt records")
    p.add_argument("--pool-size", type=int, default=320, help="iteration pool prompt records")
    p.add_argument("--pool-kinds", type=int, default=12,
                   help="constraint kinds per pool question (grows the iteration pool to thousands of prompts)")
    p.add_argument("--eval-kinds", type=int, default=8,
                   help="constraint kinds per held-out question (500+ eval prompts for paired comparisons)")
    p.add_argument("--prompts-only", action="store_true",
                   help="rewrite prompts.jsonl and eval_prompts.jsonl only (no model, no sampling): the "
                        "seed and eval pairs already in --out are kept")
    p.add_argument("--gold-pool", type=int, default=None, metavar="N",
                   help="only write gold_pool.jsonl: seed_pairs.jsonl's pairs, then new pairs from unsampled "
                        "seed-question prompts, N in all (build_info.json gets a gold_pool entry)")
    p.add_argument("--gold-kinds", type=int, default=10, help="--gold-pool: constraint kinds per seed question")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--model", default="smollm2", help="model alias or path (default: the bundled SmolLM2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    sp = _make_splits(args)
    if args.prompts_only:
        return _write_prompts_only(out, sp, args, argv)
    if args.gold_pool is not None:
        return _write_gold_pool(out, sp, args, argv, t_start)
    sampled = _sample_pairs(sp, args, t_start)
    counts = {
        "seed_pairs.jsonl": write_jsonl(out / "seed_pairs.jsonl", sampled.seed_pairs),
        "prompts.jsonl": write_jsonl(out / "prompts.jsonl", [prompt_row(r) for r in sp.pool_grown]),
        "eval_prompts.jsonl": write_jsonl(out / "eval_prompts.jsonl", [prompt_row(r) for r in sp.evals_grown]),
        "eval_pairs.jsonl": write_jsonl(out / "eval_pairs.jsonl", sampled.eval_pairs),
    }
    info = _build_info(sp, sampled, counts, args, argv)
    atomic_write_text(out / "build_info.json", json.dumps(info, indent=2) + "\n")
    _log(f"wrote {counts} to {out} in {sampled.t_end - sampled.t_start:.0f}s")
    return 0


@dataclass
class _Splits:
    """The demo records split by question, the seed and eval candidates to sample and the grown prompt sets."""

    seed_recs: List[dict]
    pool: List[dict]
    evals: List[dict]
    candidates: List[dict]
    eval_candidates: List[dict]
    pool_grown: List[dict]
    evals_grown: List[dict]


def _make_splits(args: argparse.Namespace) -> _Splits:
    records = tasks.make_prompt_records(args.seed)
    seed_recs, pool, evals = split_records(records, seed=args.seed, eval_size=args.eval_size, pool_size=args.pool_size)
    candidates = expand_seed_candidates(seed_recs, seed=args.seed)
    eval_candidates = list(evals)
    if args.limit is not None:
        candidates = candidates[: args.limit]
        eval_candidates = eval_candidates[: args.limit]
    _log(
        f"{len(records)} records from {len(tasks.QUESTIONS)} questions: {len(seed_recs)} seed-question records "
        f"({len(candidates)} candidates), {len(pool)} pool, {len(evals)} eval"
    )
    pool_grown = grow_records(pool, args.pool_kinds, seed=args.seed, salt="grow-pool")
    evals_grown = grow_records(evals, args.eval_kinds, seed=args.seed, salt="grow-eval")
    return _Splits(seed_recs, pool, evals, candidates, eval_candidates, pool_grown, evals_grown)


def _command(argv: Optional[Sequence[str]]) -> str:
    return "python -m spa_lite.demo.build " + " ".join(sys.argv[1:] if argv is None else list(argv))


def _write_prompts_only(out: Path, sp: _Splits, args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """``--prompts-only``: rewrite the two prompt sets and their entries in build_info.json (no model)."""
    info_path = out / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    counts = {
        "prompts.jsonl": write_jsonl(out / "prompts.jsonl", [prompt_row(r) for r in sp.pool_grown]),
        "eval_prompts.jsonl": write_jsonl(out / "eval_prompts.jsonl", [prompt_row(r) for r in sp.evals_grown]),
    }
    info.setdefault("counts", {}).update(counts)
    info["prompts_command"] = _command(argv)
    info["grow"] = {"pool_kinds": args.pool_kinds, "eval_kinds": args.eval_kinds}
    info.setdefault("kinds", {}).update(prompts=_kind_counts(sp.pool_grown), eval_prompts=_kind_counts(sp.evals_grown))
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    _log(f"wrote {counts} to {out}")
    return 0


def _write_gold_pool(out: Path, sp: _Splits, args: argparse.Namespace, argv: Optional[Sequence[str]],
                     t_start: float) -> int:
    """``--gold-pool N``: gold_pool.jsonl = seed_pairs.jsonl's rows, then new verifier-labelled pairs of the seed
    questions' unsampled prompts up to N; its entry in build_info.json (the other files are not touched)."""
    info_path = out / "build_info.json"
    info = json.loads(info_path.read_text())
    base = [json.loads(line) for line in (out / "seed_pairs.jsonl").read_text().splitlines() if line.strip()]
    _check_gold_pool_inputs(out, info, base, sp, args)
    sampled_before = info["prompts_sampled"]["seed"]
    cands = gold_candidates(sp.candidates, sampled_before, seed=args.seed, kinds_per_question=args.gold_kinds)
    _check_disjoint(out, base + cands)
    import torch

    need = max(0, args.gold_pool - len(base))
    _log(f"gold pool: {len(base)} seed pairs kept, {need} more wanted from {len(cands)} unsampled seed-question "
         "prompts")
    torch.set_num_threads(args.threads)
    from spa_lite.models import load_base_model

    model, tokenizer = load_base_model(args.model, quantization="none", dtype="float32", device=args.device)
    stats, t0 = KindStats(), time.time()
    new, used, trunc = collect_pairs(model, tokenizer, cands, target=need, stage="gold", args=args, stats=stats,
                                     seed_offset=1000)
    if len(new) < need:
        _log(f"gold pool: only {len(new)} of {need} new pairs from all {len(cands)} candidates")
    n = write_jsonl(out / "gold_pool.jsonl", base + new)
    info["gold_pool"] = {
        "command": _command(argv), "pairs": n, "from_seed_pairs": len(base), "new_pairs": len(new),
        "candidates": len(cands), "prompts_sampled": used, "kinds_per_question": args.gold_kinds,
        "sampling": {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                     "top_p": args.top_p, "batch_size": args.batch_size, "seed_offset": 1000},
        "questions": len({tasks.question_index(r) for r in base + new}),
        "kinds": _kind_counts(base + new), "chosen_truncated_new": trunc, "per_kind_new": stats.report(),
        "wall_time_s": round(time.time() - t0, 1), "versions": _versions(),
    }
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    _log(f"wrote {n} pairs to {out / 'gold_pool.jsonl'} ({time.time() - t_start:.0f}s)")
    return 0


def _check_gold_pool_inputs(out: Path, info: dict, base: List[dict], sp: _Splits, args: argparse.Namespace) -> None:
    """Refuse ``--gold-pool`` before any sampling when its split would not be the one ``--out`` was built with: the
    candidates are "seed-question prompts not sampled before" only under the build's own split (``--seed``,
    ``--limit``, and the pool and eval sizes, which decide the seed questions and so the candidate count)."""
    info_path = out / "build_info.json"
    for key in ("seed", "limit"):
        if info.get(key) != getattr(args, key):
            fix = f"--{key} {info.get(key)}" if info.get(key) is not None else f"without --{key}"
            raise SystemExit(f"{info_path}: field {key!r} is {info.get(key)!r} but --gold-pool was run with "
                             f"--{key} {getattr(args, key)!r}: the gold pool must use the build's own split; rerun "
                             f"{fix}")
    built = info.get("prompts_sampled", {}).get("seed_candidates")
    if built != len(sp.candidates):
        raise SystemExit(f"{info_path}: field 'prompts_sampled.seed_candidates' is {built!r} but this split has "
                         f"{len(sp.candidates)} seed candidates: --pool-size or --eval-size differ "
                         "from the build's; rerun with its settings (its 'command' field)")
    if args.gold_pool < len(base):
        raise SystemExit(f"--gold-pool {args.gold_pool}: the pool starts with seed_pairs.jsonl's {len(base)} pairs "
                         f"({out / 'seed_pairs.jsonl'}); ask for at least {len(base)}")


def _check_disjoint(out: Path, gold_rows: List[dict]) -> None:
    """The gold pool's questions (seed pairs and candidates) must not be questions of the prompt files in --out."""
    gold_q = {tasks.question_index(r) for r in gold_rows}
    for name in ("prompts.jsonl", "eval_prompts.jsonl"):
        path = out / name
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() and tasks.question_index(json.loads(line)) in gold_q:
                raise SystemExit(f"{path}:{n}: field 'id' is a question of the gold pool (seed pairs or its "
                                 f"candidates): the gold pool's questions would not be disjoint from {name}'s")


@dataclass
class _Sampled:
    """The pairs sampled from the model, with what it took to find them."""

    seed_pairs: List[dict]
    seed_used: int
    seed_trunc: int
    seed_stats: KindStats
    eval_pairs: List[dict]
    eval_used: int
    eval_trunc: int
    eval_stats: KindStats
    t_start: float  # main's start; the three below are when seed sampling, eval sampling and both ended
    t_seed: float
    t_eval: float
    t_end: float


def _sample_pairs(sp: _Splits, args: argparse.Namespace, t_start: float) -> _Sampled:
    """Load the model, then collect the seed pairs and the held-out gold pairs."""
    import torch

    torch.set_num_threads(args.threads)
    from spa_lite.models import load_base_model

    model, tokenizer = load_base_model(args.model, quantization="none", dtype="float32", device=args.device)
    _log(f"model loaded ({time.time() - t_start:.0f}s)")

    seed_stats, eval_stats = KindStats(), KindStats()
    t_seed = time.time()
    seed_pairs, seed_used, seed_trunc = collect_pairs(
        model, tokenizer, sp.candidates, target=args.target_pairs, stage="seed", args=args, stats=seed_stats,
        seed_offset=0,
    )
    t_eval = time.time()
    eval_pairs, eval_used, eval_trunc = collect_pairs(
        model, tokenizer, sp.eval_candidates, target=args.target_eval_pairs, stage="eval", args=args,
        stats=eval_stats, seed_offset=500,
    )
    return _Sampled(seed_pairs, seed_used, seed_trunc, seed_stats, eval_pairs, eval_used, eval_trunc, eval_stats,
                    t_start, t_seed, t_eval, time.time())


def _versions() -> Dict[str, str]:
    import torch

    try:
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}
    except Exception:  # pragma: no cover
        return {"torch": torch.__version__}


def _build_info(sp: _Splits, sa: _Sampled, counts: Dict[str, int], args: argparse.Namespace,
                argv: Optional[Sequence[str]]) -> dict:
    """build_info.json: the command and settings, what was written and sampled, per-kind rates and timings."""
    def qcount(rows):
        return len({tasks.question_index(r) for r in rows})

    kinds = _kind_counts
    return {
        "command": _command(argv),
        "seed": args.seed,
        "model": args.model,
        "sampling": {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                     "top_p": args.top_p, "batch_size": args.batch_size},
        "limit": args.limit,
        "grow": {"pool_kinds": args.pool_kinds, "eval_kinds": args.eval_kinds},
        "counts": counts,
        "questions": {"total": len(tasks.QUESTIONS), "seed": qcount(sp.seed_recs), "seed_pairs": qcount(sa.seed_pairs),
                      "pool": qcount(sp.pool_grown), "eval": qcount(sp.evals)},
        "prompts_sampled": {"seed": sa.seed_used, "seed_candidates": len(sp.candidates), "eval": sa.eval_used},
        "kinds": {"seed_pairs": kinds(sa.seed_pairs), "prompts": kinds(sp.pool_grown),
                  "eval_prompts": kinds(sp.evals_grown), "eval_pairs": kinds(sa.eval_pairs)},
        "chosen_truncated": {
            "note": "pairs whose chosen response hit max_new_tokens (used only when no passing sample ended)",
            "seed_pairs": sa.seed_trunc,
            "eval_pairs": sa.eval_trunc,
        },
        "per_kind": {"all": sa.seed_stats.merged(sa.eval_stats).report(), "seed": sa.seed_stats.report(),
                     "eval": sa.eval_stats.report()},
        "wall_time_s": {"total": round(sa.t_end - sa.t_start, 1), "seed_sampling": round(sa.t_eval - sa.t_seed, 1),
                        "eval_sampling": round(sa.t_end - sa.t_eval, 1)},
        "versions": _versions(),
        "constraint_kinds": list(tasks.CONSTRAINT_KINDS),
    }


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
