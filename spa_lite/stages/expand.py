"""Stage expand --iter i: sample two responses per prompt of X_i from pi_{i-1}, judge them with Eq. 7, write D_i.

Work is done in shards of ``shard_size`` prompts, each written atomically when finished and seeded by its
index alone, so a killed expand resumes at the first missing shard and gives the same D_i as an
uninterrupted run.
"""

from __future__ import annotations

import statistics
import time

from spa_lite.config import Recipe
from spa_lite.data import iteration_prompts, load_prompts, to_trl_conversational
from spa_lite.demo.tasks import verify
from spa_lite.distributed import get_dist
from spa_lite.errors import DataError
from spa_lite.generation import dtype_name, encode_prompt, sample_responses, sampling_dtype
from spa_lite.io import atomic_write_json, atomic_write_jsonl, read_json
from spa_lite.judge import judge_llm, judge_logprob
from spa_lite.loading import load_stack
from spa_lite.runs import Stage, begin_stage, finish_stage, require_upstream
from spa_lite.stack import PolicyStack, adapter_name
from spa_lite.ui import progress
from spa_lite.vllm_backend import VLLMSampler, prepare_adapter


# Self-check of Eq. 7's log-probs read off a reduced-precision copy: largest |recorded - float32 forward| per
# response token. bf16 on SmolLM2: median 0.007, max 0.042 over 96 samples (bench/RESULTS.md, generation); a
# recorder that applied the temperature first is off by several tenths per token.
REDUCED_TOL_PER_TOKEN = 0.1


def judge_reference(stack_names: list[str], judge_ref: str) -> list[str] | None:
    """Eq. 7's reference: init = pi_init (paper), prev = the stack one stage back, none = no reference."""
    if judge_ref == "init":
        return []
    if judge_ref == "prev":
        return stack_names[:-1]
    return None


def expand_shard(stack: PolicyStack, recipe: Recipe, prompts: list[dict], seed: int, on_gen=None, on_judge=None,
                 sample_fn=sample_responses) -> dict:
    """Sample, judge and pair up one shard of prompts. Returns {"rows": [...], "counts": {...}}.

    ``sample_fn`` is transformers' batched sampling on the stack, or a vLLM sampler serving pi_{i-1} as one
    exported adapter (``expand.backend: vllm``); judging always runs on the stack.
    """
    c = recipe.expand
    names = stack.prev
    # Eq. 7's log pi_{i-1}(y|x) read off the sampling pass (transformers backend): judging runs only the reference
    record = c.judge == "logprob" and c.judge_logps == "sampler" and sample_fn is sample_responses
    # prompts over model.max_prompt_length are skipped and counted, as in training (a 100,000-character
    # prompt would otherwise make generation allocate gigabytes)
    fits = [len(encode_prompt(stack.tokenizer, p["prompt"])) <= recipe.model.max_prompt_length for p in prompts]
    kept_prompts = [p for p, f in zip(prompts, fits) if f]
    samples, dtype = [], None
    if kept_prompts:
        with stack.use(names) as m:
            extra = {}
            if sample_fn is sample_responses and not (record and c.sample_dtype == "auto"):
                # auto keeps full precision where Eq. 7 reads pi_{i-1}'s log-probs off the sampling pass: a bf16
                # copy's log-probs are not pi_{i-1}'s, and a float32 forward of pi_{i-1} costs more than bf16
                # decoding saves (bench/RESULTS.md, generation). A dtype asked for by name with judge_logps:
                # sampler reads Eq. 7 off the reduced copy: approximate labels (README, "Sampling precision")
                dtype = sampling_dtype(c.sample_dtype, m)
                extra = {"dtype": dtype} if dtype is not None else {}
            samples = sample_fn(
                m, stack.tokenizer, [p["prompt"] for p in kept_prompts], num_samples=c.num_samples,
                max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=seed,
                batch_size=c.batch_size, on_batch=on_gen, **({"record_logps": True} if record else {}), **extra,
            )
    if on_gen is not None and len(kept_prompts) < len(prompts):
        on_gen(len(prompts) - len(kept_prompts))
    counts = {"prompts": len(prompts), "prompt_too_long": len(prompts) - len(kept_prompts), "identical": 0,
              "truncated": 0, "empty": 0, "dropped_truncated": 0}
    if c.judge == "verifier":
        counts["undecided"] = 0
    keep = []
    for rec, ss in zip(kept_prompts, samples):
        y1, y2 = ss[0], ss[1]
        trunc = y1.truncated or y2.truncated
        counts["truncated"] += int(trunc)
        if not y1.text or not y2.text:
            counts["empty"] += 1
            continue
        if y1.text == y2.text:
            counts["identical"] += 1
            continue
        if trunc and c.drop_truncated:
            counts["dropped_truncated"] += 1
            continue
        keep.append((rec, y1, y2))
    check: dict = {}
    if c.judge == "verifier":
        keep, judged = verifier_judge(keep, counts, recipe.data.prompts)
    elif c.judge == "llm":
        judged = judge_llm(stack, names, [r["prompt"] for r, _, _ in keep], [a.text for _, a, _ in keep],
                           [b.text for _, _, b in keep], batch_size=c.judge_batch_size, on_batch=on_judge)
    else:
        prompt_ids = [encode_prompt(stack.tokenizer, r["prompt"]) for r, _, _ in keep]
        known = None
        if record and all(a.logp is not None and b.logp is not None for _, a, b in keep):
            known = ([a.logp for _, a, _ in keep], [b.logp for _, _, b in keep])
            if dtype is not None:  # a reduced copy's log-probs: the self-check allows its rounding, per token
                check.update(tol=REDUCED_TOL_PER_TOKEN, per_token=True)
        judged = judge_logprob(stack, names, judge_reference(names, c.judge_ref), prompt_ids,
                               [a.token_ids for _, a, _ in keep], [b.token_ids for _, _, b in keep],
                               beta=c.beta, length_penalty=c.length_penalty, batch_size=c.judge_batch_size,
                               on_batch=on_judge, judge_logps=known, check=check)
    rows = []
    for (rec, y1, y2), j in zip(keep, judged):
        first = j["p"] > 0.5  # Eq. 7: y_w = y1 iff p > 0.5 (ties go to y2)
        w, l = (y1, y2) if first else (y2, y1)
        row = {k: v for k, v in rec.items() if k not in {"chosen", "rejected"}}
        row.update(
            chosen=w.text, rejected=l.text, p_y1=j["p"], confidence=max(j["p"], 1 - j["p"]),
            chosen_is_y1=first, len_chosen=w.num_tokens, len_rejected=l.num_tokens,
            truncated_chosen=w.truncated, truncated_rejected=l.truncated,
        )
        if "logratio_1" in j:
            row.update(logratio_chosen=j["logratio_1"] if first else j["logratio_2"],
                       logratio_rejected=j["logratio_2"] if first else j["logratio_1"])
        rows.append(row)
    out = {"rows": rows, "counts": counts, "sample_dtype": dtype_name(dtype)}
    if check.get("checked"):
        out["sampler_logps"] = {k: check[k] for k in ("reused", "max_abs_dev", "checked", "per_token")}
    return out


def verifier_judge(keep: list, counts: dict, source: object = "prompts") -> tuple[list, list[dict]]:
    """The oracle-label control: label (rec, y1, y2) with the demo task's gold verifier instead of Eq. 7.

    A pair the verifier separates gets p = 1 (y1 passes) or 0; pairs where both or neither pass carry no gold
    preference and are dropped (counted as ``undecided``). Prompts must carry the demo ``constraint``.
    """
    kept, judged = [], []
    for rec, y1, y2 in keep:
        if "constraint" not in rec:
            raise DataError(source, None, "constraint", f"prompt {rec.get('id', '?')!r} has none; expand.judge: "
                            "verifier labels with the demo task's verifier and needs demo prompts (data.prompts: demo:prompts)")
        v1, v2 = verify(y1.text, rec["constraint"]), verify(y2.text, rec["constraint"])
        if v1 == v2:
            counts["undecided"] += 1
            continue
        kept.append((rec, y1, y2))
        judged.append({"p": 1.0 if v1 else 0.0})
    return kept, judged


def run(recipe: Recipe, iteration: int, force: bool = False, recipe_arg: str = "RECIPE",
        fail_after_shards: int | None = None) -> dict:
    """Write D_i to runs/<name>/iter{i}/expand/data.jsonl.

    Args:
        fail_after_shards: raise after writing this many new shards (tests inject a crash with it).
    """
    stage = Stage("expand", iteration)
    t0 = time.time()
    require_upstream(recipe, stage, recipe_arg)
    out, done = begin_stage(recipe, stage, force)
    if done:
        return done
    c = recipe.expand
    pool_dropped: dict = {}  # blank prompts (and unusable pairs of a pair file), skipped and counted
    pool = load_prompts(recipe.data.prompts, recipe.data.format, dropped=pool_dropped)
    prompts = iteration_prompts(pool, recipe.data.iter_prompts, iteration, recipe.data.shuffle_seed)
    shards = [prompts[s : s + c.shard_size] for s in range(0, len(prompts), c.shard_size)]
    shard_dir = out / "shards"
    dist = get_dist()
    # process r makes shards r, r+N, ...: the same shards, seeds and batches as one process would
    todo = [k for k in range(len(shards)) if k % dist.world == dist.rank and not (shard_dir / f"{k:05d}.json").exists()]
    written = 0
    if todo:
        stack = load_stack(recipe, frozen_upto=iteration - 1)
        assert stack.prev == [adapter_name(k) for k in range(iteration)]
        sample_fn = sample_responses
        if c.backend == "vllm":
            adapter = prepare_adapter(stack, iteration - 1, out / "vllm_adapter")
            sample_fn = VLLMSampler.from_recipe(recipe, iteration - 1).as_sample_fn(adapter)
        n_todo = sum(len(shards[k]) for k in todo)
        with progress(enabled=dist.main) as p:
            gen = p.add_task(f"sample iter {iteration}", total=n_todo, info=f"{len(shards) - len(todo)} shards done before")
            jud = p.add_task(f"judge iter {iteration} ({c.judge})", total=n_todo, info="")
            for k in todo:
                seed = recipe.seed * 1_000_003 + iteration * 10_007 + k * 101
                res = expand_shard(stack, recipe, shards[k], seed, on_gen=lambda n: p.advance(gen, n),
                                   on_judge=lambda n: p.advance(jud, n), sample_fn=sample_fn)
                p.advance(jud, len(shards[k]) - len(res["rows"]))
                atomic_write_json(shard_dir / f"{k:05d}.json", {"shard": k, **res})
                written += 1
                if fail_after_shards is not None and written >= fail_after_shards and k != todo[-1]:
                    raise KeyboardInterrupt(f"injected failure after shard {k}")
    dist.barrier()
    rows, counts, checks, dtypes = [], {}, [], set()
    for k in range(len(shards)):
        sh = read_json(shard_dir / f"{k:05d}.json")
        rows += sh["rows"]
        dtypes.add(sh.get("sample_dtype", "model"))
        for key, v in sh["counts"].items():
            counts[key] = counts.get(key, 0) + v
        if "sampler_logps" in sh:
            checks.append(sh["sampler_logps"])
    if dist.main:  # TRL's conversational preference format: DPOTrainer reads D_i as it is
        atomic_write_jsonl(out / "data.jsonl", [to_trl_conversational(r) for r in rows])
    summary = summarize_pairs(rows, counts)
    summary["sample_dtype"] = sorted(dtypes)
    summary["pool_dropped"] = pool_dropped
    if checks:  # how far the sampling pass's log-probs were from a forward pass on each shard's first batch
        summary["sampler_logps"] = {"shards_reused": sum(bool(x["reused"]) for x in checks), "shards": len(checks),
                                    "max_abs_dev": max(x["max_abs_dev"] for x in checks),
                                    "checked_sequences": sum(x["checked"] for x in checks),
                                    "per_token": any(x.get("per_token") for x in checks)}
    return finish_stage(recipe, stage, summary, {"prompts": recipe.data.prompts, "shards": len(shards)}, t0)


def summarize_pairs(rows: list[dict], counts: dict) -> dict:
    def mean(xs):
        return round(statistics.fmean(xs), 4) if xs else None

    return {
        "pairs": len(rows),
        **counts,
        "mean_confidence": mean([r["confidence"] for r in rows]),
        "frac_chosen_is_y1": mean([float(r["chosen_is_y1"]) for r in rows]),
        "mean_len_chosen": mean([r["len_chosen"] for r in rows]),
        "mean_len_rejected": mean([r["len_rejected"] for r in rows]),
        "frac_chosen_longer": mean([float(r["len_chosen"] > r["len_rejected"]) for r in rows]),
        "confidence_hist": confidence_histogram([r["confidence"] for r in rows]),
    }


def confidence_histogram(conf: list[float], bins: int = 10) -> dict:
    """Counts of judged confidences max(p, 1-p) in ``bins`` equal bins over [0.5, 1] (the last bin closed)."""
    edges = [round(0.5 + 0.5 * k / bins, 4) for k in range(bins + 1)]
    counts = [0] * bins
    for c in conf:
        counts[min(bins - 1, max(0, int((c - 0.5) * 2 * bins)))] += 1
    return {"edges": edges, "counts": counts}
