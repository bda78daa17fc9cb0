"""`spa-lite eval`: judge accuracy, noise detection, self-labelling noise and pass rates for every policy of a run."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from spa_lite.audit import run_agreement
from spa_lite.config import Recipe
from spa_lite.data import load_pairs, load_prompts, pair_texts, shuffled
from spa_lite.demo.tasks import question_index, verify
from spa_lite.errors import SpaError, StageOrderError
from spa_lite.evaluation import (
    encode_pairs_for_eval,
    judge_accuracy,
    noise_detection,
    response_outcomes,
    self_label_noise,
    summarize_outcomes,
)
from spa_lite.io import atomic_write_json, read_json, read_jsonl, sha256_file, sha256_obj
from spa_lite.layout import Stage, adapter_dir, complete_policies, data_path, eval_dir, policy_label, stage_dir
from spa_lite.loading import load_stack
from spa_lite.losses import lambda_for_iteration
from spa_lite.metrics import paired_difference
from spa_lite.options import EvalOptions
from spa_lite.sampling_copy import dtype_name, sampling_dtype
from spa_lite.tracking import log_eval
from spa_lite.ui import console, progress


def run(recipe: Recipe, opts: EvalOptions, *, policies: list[int | None] | None = None) -> dict:
    """Evaluate pi_init, pi_0, ..., pi_T of a run (or only ``policies``; None is pi_init) with the options
    ``opts`` (``spa_lite.options.EvalOptions``: each field is documented there); writes
    runs/<name>/eval/<tag>.json and returns it.

    Pass rates decode greedily by default (``temperature`` 0, one response per prompt), so every policy's
    answer is a function of the prompt and differences between policies are paired exactly; each policy's
    per-prompt outcomes are cached under runs/<name>/eval/cache/, keyed by the hash of its adapters, the
    prompts and the decoding settings, so a policy already evaluated is not decoded again.

    Pair files with a human audit (``spa-lite inspect``) get each judge's agreement with the person
    (``human_audit``); ``audit_only`` reports only that, without loading a model (tag ``audit``).
    """
    t0 = time.time()
    audits = run_agreement(recipe.run_path, recipe.iterations)
    if opts.audit_only:
        if not audits:
            raise SpaError(f"{recipe.run_path} has no audit: annotate pairs with `spa-lite inspect "
                           f"{recipe.run_path} --iter 1 --serve` (or import a download with `spa-lite audit import`)")
        return _write_report(recipe, {"run": str(recipe.run_path), "human_audit": audits}, opts.tag or "audit", t0)
    ks = complete_policies(recipe)
    if not ks:
        raise StageOrderError(f"{recipe.run_path} has no complete stage; run `spa-lite seed-dpo` first")
    chosen = [None, *ks] if policies is None else [k for k in [None, *ks] if k in policies]
    methods = opts.methods  # the LLM-as-judge (slow: it reads both responses) only on request
    lambdas = opts.lambdas or [lambda_for_iteration(i, recipe.train.lambdas) for i in (1, 2, 3)]
    pairs_spec = opts.pairs or recipe.data.eval_pairs
    stack = load_stack(recipe, frozen_upto=max(ks))

    report: dict = {"run": str(recipe.run_path), "policies": [policy_label(None)] + [policy_label(k) for k in ks]}
    if audits:
        report["human_audit"] = audits
    if pairs_spec:
        report.update(_pair_metrics(stack, recipe, pairs_spec, opts.fmt, opts.limit, chosen, methods, opts.flip,
                                    lambdas))
    verify = _demo_verifier(recipe)
    if verify is not None:
        report["self_label_noise"] = _self_label_noise(recipe, verify)
        if opts.pass_rate and recipe.data.eval_prompts:
            report.update(_pass_rates(stack, recipe, chosen, verify, opts.prompt_limit,
                                      1 if opts.temperature == 0 else opts.samples, opts.temperature))
    tag = opts.tag or (Path(str(pairs_spec)).name.split(".")[0].replace("demo:", "") if pairs_spec else "generation")
    return _write_report(recipe, report, tag, t0)


def _pair_metrics(stack, recipe: Recipe, pairs_spec: str, fmt: str | None, limit: int | None, chosen: list,
                  methods: list[str], flip: float, lambdas: list[float]) -> dict:
    """Judge accuracy of every chosen policy on gold pairs, and noise detection on a ``flip`` share of them
    flipped: the report's ``pairs``, ``judge_accuracy`` and ``noise_detection``."""
    beta = recipe.expand.beta
    dropped: dict = {}  # blank prompts, empty or identical responses: skipped and counted
    rows = shuffled(load_pairs(pairs_spec, fmt or recipe.data.format, dropped=dropped), recipe.seed)[:limit]
    m = recipe.model
    pairs = encode_pairs_for_eval(stack.tokenizer, rows, m.max_length, m.max_prompt_length, m.truncation)
    info = {"spec": pairs_spec, "n": len(pairs), "skipped_length": len(rows) - len(pairs),
            "truncated": sum(bool(p.meta.get("truncated")) for p in pairs), "truncation": m.truncation,
            "dropped": dropped}
    acc, noise = {}, {}
    policies = [k for k in chosen if k is not None]
    with progress() as p:
        task = p.add_task("judge accuracy", total=len(chosen), info="")
        shared: dict = {}  # pi_k judges at k and is the "prev" reference at k + 1: score it once
        for k in chosen:
            acc[policy_label(k)] = judge_accuracy(stack, pairs, k, methods, beta=beta, cache=shared)
            p.advance(task)
        if flip > 0:
            t2 = p.add_task("noise detection", total=len(complete_policies(recipe)), info=f"flip {flip:.0%}")
            for k in policies:
                noise[policy_label(k)] = noise_detection(stack, pairs, k, flip, lambdas, seed=recipe.seed, beta=beta)
                p.advance(t2)
    return {"pairs": info, "judge_accuracy": acc, "noise_detection": {"flip": flip, "lambdas": lambdas,
                                                                      "by_policy": noise}}


def _self_label_noise(recipe: Recipe, verify) -> dict:
    """How often the verifier contradicts the labels of each D_i (and of its flagged pairs), while D_i exist."""
    noise_rows = {}
    for i in range(1, recipe.iterations + 1):
        data = data_path(recipe.run_path, i)
        if not data.exists():
            break
        d = [pair_texts(r, data, line) for line, r in read_jsonl(data)]
        if not d or "constraint" not in d[0]:
            break
        flags_path = stage_dir(recipe, Stage("train", i)) / "flags.jsonl"
        flags = [json.loads(x) for x in flags_path.read_text().splitlines() if x.strip()] if flags_path.exists() else None
        noise_rows[f"D_{i}"] = self_label_noise(d, verify, flags)
    return noise_rows


def _pass_rates(stack, recipe: Recipe, chosen: list, verify, prompt_limit: int | None, samples: int,
                temperature: float) -> dict:
    """Each chosen policy's verifier pass rate on the held-out demo prompts (per-policy outcomes cached under
    eval/cache/), and the paired differences between policies."""
    prompts_dropped: dict = {}
    recs = [r for r in load_prompts(recipe.data.eval_prompts, dropped=prompts_dropped)
            if "constraint" in r][:prompt_limit or None]
    settings = {"prompts": sha256_obj([[r.get("id"), r["prompt"], r["constraint"]] for r in recs]),
                "max_new_tokens": recipe.expand.max_new_tokens, "temperature": temperature,
                "top_p": recipe.expand.top_p, "samples": samples, "seed": recipe.seed}
    low = sampling_dtype(recipe.expand.sample_dtype, stack.model)
    if low is not None:  # full-precision settings keep the cache keys they had before the setting existed
        settings["sample_dtype"] = dtype_name(low)
    outcomes, cached = {}, []
    with progress() as p:
        task = p.add_task("pass rate", total=len(chosen) * len(recs),
                          info=f"{len(chosen)} policies x {len(recs)} prompts x {samples}")
        for k in chosen:
            label = policy_label(k)
            path = eval_dir(recipe) / "cache" / f"outcomes_{label}_{_policy_key(recipe, k, settings)}.json"
            if path.exists():
                outcomes[label] = read_json(path)
                cached.append(label)
                p.advance(task, len(recs))
            else:
                outcomes[label] = response_outcomes(
                    stack, recs, k, verify, samples=samples, max_new_tokens=recipe.expand.max_new_tokens,
                    temperature=temperature, seed=recipe.seed, batch_size=recipe.expand.batch_size,
                    on_batch=lambda n: p.advance(task, n), sample_dtype=recipe.expand.sample_dtype)
                atomic_write_json(path, outcomes[label])
    return {"eval_prompts_dropped": prompts_dropped,
            "pass_rate": {lab: summarize_outcomes(rows) for lab, rows in outcomes.items()},
            "pass_rate_settings": {**settings, "n_prompts": len(recs), "cached": cached},
            "pass_rate_diff": paired_pass_rate_diffs(outcomes)}


def _write_report(recipe: Recipe, report: dict, tag: str, t0: float) -> dict:
    report["wall_s"] = round(time.time() - t0, 1)
    out = eval_dir(recipe) / f"{tag}.json"
    atomic_write_json(out, report)
    log_eval(recipe, tag, report)
    report["path"] = str(out)
    return report


def _policy_key(recipe: Recipe, k: int | None, settings: dict) -> str:
    """Hash of pi_k's adapter weights and the evaluation settings: the cache key of its outcomes."""
    adapters = [sha256_file(adapter_dir(recipe, j) / "adapter_model.safetensors") for j in range(k + 1)] if k is not None else []
    return sha256_obj({"adapters": adapters, "base": recipe.model.name_or_path, **settings})[:16]


def paired_pass_rate_diffs(outcomes: dict[str, list[dict]]) -> list[dict]:
    """Each policy against pi_0 and against the policy before it: the mean per-prompt difference in passing,
    with a paired bootstrap interval that resamples whole demo questions (95%)."""
    labels = list(outcomes)
    pairs = [(labels[i], labels[i - 1]) for i in range(1, len(labels))]
    pairs += [(lab, "pi_0") for lab in labels if lab not in ("pi_0", "pi_init") and (lab, "pi_0") not in pairs
              and "pi_0" in outcomes]
    out = []
    for a, b in pairs:
        ra, rb = outcomes[a], outcomes[b]
        if [(r["id"], r["sample"]) for r in ra] != [(r["id"], r["sample"]) for r in rb]:
            continue
        try:
            clusters = [question_index(r["id"]) for r in ra]
        except ValueError:  # not demo ids: each prompt is its own cluster
            clusters = [r["id"] for r in ra]
        d = paired_difference([r["passed"] for r in ra], [r["passed"] for r in rb], clusters=clusters)
        out.append({"a": a, "b": b, **{k: d[k] for k in ("diff", "ci_low", "ci_high", "n", "n_clusters")}})
    return out


def _demo_verifier(recipe: Recipe):
    if not (str(recipe.data.prompts).startswith("demo:") or str(recipe.data.eval_prompts or "").startswith("demo:")):
        return None
    return verify


def print_report(report: dict) -> None:
    """The eval report as tables on the console, one per measurement the report holds."""
    dropped = {**(report.get("pairs") or {}).get("dropped", {}), **{f"prompts {k}": v for k, v in
                                                                  report.get("eval_prompts_dropped", {}).items()}}
    if any(dropped.values()):
        console.print("skipped records: " + ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()) if v))
    if "judge_accuracy" in report:
        console.print(_judge_table(report))
    if report.get("noise_detection", {}).get("by_policy"):
        console.print(_noise_table(report["noise_detection"]))
    if report.get("human_audit"):
        print_audit(report["human_audit"])
    if report.get("self_label_noise"):
        console.print(_self_label_table(report["self_label_noise"]))
    if report.get("pass_rate"):
        console.print(_pass_rate_table(report["pass_rate"]))
    if report.get("pass_rate_diff"):
        console.print(_pass_diff_table(report["pass_rate_diff"]))
    console.print(f"written: {report.get('path')}")


def _table(title: str, columns) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    return t


def _judge_table(report: dict) -> Table:
    methods = sorted({m for v in report["judge_accuracy"].values() for m in v})
    t = _table(f"judge accuracy on {report['pairs']['spec']} (n={report['pairs']['n']}), 95% CI", ["policy", *methods])
    for pol, v in report["judge_accuracy"].items():
        t.add_row(pol, *[f"{v[m]['accuracy']:.3f} [{v[m]['ci_low']:.2f}, {v[m]['ci_high']:.2f}]" if m in v else "-"
                         for m in methods])
    return t


def _noise_table(noise: dict) -> Table:
    nd = noise["by_policy"]
    dets = [k for k in next(iter(nd.values())) if k not in {"flipped", "n"}]
    t = _table(f"noise detection: AUROC for {noise['flip']:.0%} flipped labels", ["policy", *dets])
    for pol, v in nd.items():
        t.add_row(pol, *[f"{v[d]['auroc']:.3f}" if v[d]["auroc"] is not None else "-" for d in dets])
    return t


def _self_label_table(noise: dict) -> Table:
    t = _table("self-labelling noise (verifier vs Eq. 7 labels)",
               ("D_i", "n", "confirmed", "contradicted", "undetermined", "contradicted | flagged",
                "contradicted | unflagged"))

    def f(x):
        return "-" if x is None else f"{x:.3f}"
    for d, v in noise.items():
        t.add_row(d, str(v["n"]), str(v["confirmed"]), str(v["contradicted"]), str(v["undetermined"]),
                  f(v.get("contradicted_rate_flagged")), f(v.get("contradicted_rate_unflagged")))
    return t


def _pass_rate_table(rates: dict) -> Table:
    t = _table("verifier pass rate on held-out prompts, 95% CI",
               ("policy", "n", "pass rate", "CI", "mean tokens", "truncated"))
    for pol, v in rates.items():
        t.add_row(pol, str(v["n"]), f"{v['pass_rate']:.3f}", f"[{v['ci_low']:.2f}, {v['ci_high']:.2f}]",
                  f"{v['mean_tokens']:.1f}", f"{v.get('truncated_rate', float('nan')):.2f}")
    return t


def _pass_diff_table(diffs: list) -> Table:
    t = _table("pass-rate differences, paired over the same prompts (bootstrap over questions, 95%)",
               ("a - b", "diff", "CI", "prompts"))
    for d in diffs:
        t.add_row(f"{d['a']} - {d['b']}", f"{d['diff']:+.3f}", f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]", str(d["n"]))
    return t


def print_audit(audits: dict) -> None:
    """The human audit's table: each judge's agreement with the person on the audited pairs of each D_i."""
    t = Table(title="agreement with the human audit (ties and skips excluded), Wilson 95% CI")
    for c in ("pairs", "judge", "agrees", "rate", "CI", "audited", "ties", "skips", "stale"):
        t.add_column(c)
    for d, a in audits.items():
        for name, v in a["judges"].items():
            rate = "-" if v["rate"] is None else f"{v['rate']:.3f}"
            ci = "-" if v["rate"] is None else f"[{v['ci_low']:.2f}, {v['ci_high']:.2f}]"
            t.add_row(d, name, f"{v['agree']}/{v['n']}", rate, ci, str(a["audited"]), str(a["ties"]), str(a["skips"]),
                      str(a["stale"]))
    console.print(t)
