"""Tokens per second of spa-lite's sampling engines on the bundled SmolLM2, old vs new in one interleaved run.

Two workloads, as the stages run them (natural stops at the end of turn, real prompts of mixed lengths):

* **expand**: ``--prompts`` demo prompts (spa_lite/demo/data/prompts.jsonl) x 2 samples at temperature 0.7,
  at most ``--expand-tokens`` new tokens, batches of ``--expand-batch`` prompts, one call per shard of
  ``--expand-shard`` prompts (as the stage calls it), with the sampler's log-probs recorded (Eq. 7); policy
  pi_1 = base + two frozen LoRA adapters (``seed`` and ``iter1``), as in expand --iter 2: random ones, or the
  trained adapters of a finished run with ``--run`` (e.g. the quick start's runs/smollm2-demo).
* **export**: ``export-answers`` style, greedy, at most ``--export-tokens`` new tokens, batches of
  ``--export-batch`` prompts, one answer per prompt, same policy.

Sides: ``old`` = ``sample_responses(engine="hf")``, transformers' generate on the unmerged stack in file order
(what spa-lite did before); ``new`` = ``sample_responses(engine="fast")``: adapters merged into a working copy,
length-sorted batches, one prefill per prompt, finished rows leaving the batch; ``bf16`` = the fast engine
decoding with a bfloat16 merged copy (``expand.sample_dtype: auto`` on a CPU with bf16 matrix units). A bf16
copy's log-probs are not pi_{i-1}'s, so the bf16 expand side also pays what expand then runs with
``judge_logps: forward``: a float32 forward of pi_{i-1} over every sample (``judge.response_logps``), inside its
timed wall. ``bf16_eq7`` (expand only) = the same bf16 sampling with Eq. 7 read off the bf16 copy's own
log-probs, no forward (``expand.sample_dtype: bfloat16`` with ``judge_logps: sampler``; approximate labels). One
process and model; one untimed warm-up of each side, then old, new, ... per repeat. tokens/s = response tokens
/ wall seconds (including the merge of the working copy for the new sides). The forward of pi_init that every
side's Eq. 7 needs is not timed. Greedy outputs of the two sides are compared (same tokens, up to float
rounding); the two engines' samples at temperature > 0 differ by design (per-row random streams), so the
expand side's token counts differ between sides.

Target: new / old >= 3 on each workload (CPU); reported for every side. Fidelity of bf16: greedy
answers token-identical to the float32 fast engine's, per-token |log-prob of the bf16 copy - float32
forward| on the expand samples, and how many Eq. 7 labels (which sample is preferred, against pi_init) the
bf16 copy's log-probs would flip compared with the float32 forward's: the price of skipping that forward.

``--mode batching`` keeps the earlier measurement: batched vs one-sequence-per-call sampling (forced lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "generation", repeats=2)
    p.add_argument("--mode", choices=["engines", "batching"], default="engines")
    p.add_argument("--prompts", type=int, default=48, help="prompts of each workload")
    p.add_argument("--expand-tokens", type=int, default=64, help="expand: max new tokens (smollm2-demo: 64)")
    p.add_argument("--expand-batch", type=int, default=24, help="expand: prompts per batch (smollm2-demo: 24)")
    p.add_argument("--expand-shard", type=int, default=48, help="expand: prompts per call (smollm2-demo: 48)")
    p.add_argument("--run", default="", help="take the adapters seed and iter1 from this finished run folder")
    p.add_argument("--export-tokens", type=int, default=192, help="export: max new tokens")
    p.add_argument("--export-batch", type=int, default=25, help="export: prompts per batch")
    p.add_argument("--workloads", default="expand,export", help="comma list of expand,export")
    p.add_argument("--sides", default="", help="comma list of old,new,bf16,bf16_eq7 (default: all)")
    # --mode batching
    p.add_argument("--samples", type=int, default=4, help="batching: samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="batching: tokens per sequence")
    p.add_argument("--prompt-len", type=int, default=24, help="batching: words in each prompt")
    p.add_argument("--batch-size", type=int, default=0, help="batching: prompts per call (0 = all)")
    p.add_argument("--no-force-length", action="store_true", help="batching: let sequences stop at EOS")
    args = p.parse_args(argv)
    if args.mode == "batching":
        return batching(args)
    if args.quick:
        args.prompts, args.expand_tokens, args.export_tokens = 6, 8, 12
        args.expand_batch, args.export_batch, args.expand_shard = 4, 4, 3
        args.repeats = min(args.repeats, 1)
    machine = common.machine_info(args.threads, args.device)
    load0 = list(os.getloadavg())
    import torch

    from spa_lite.data import load_prompts
    from spa_lite.generation import encode_prompt, sample_responses
    from spa_lite.judge import response_logps
    from spa_lite.models import load_base_model
    from spa_lite.sampling_copy import fast_bf16_cpu
    from spa_lite.stack import build_stack

    model_path = common.resolve_model(args.model)
    if args.run:
        adapters = [("seed", str(Path(args.run) / "seed" / "adapter")),
                    ("iter1", str(Path(args.run) / "iter1" / "train" / "adapter"))]
    else:
        adapters = [("seed", common.adapter_dir(model_path, args.lora_r, args.seed)),
                    ("iter1", common.adapter_dir(model_path, args.lora_r, args.seed + 1))]
    base, tok = load_base_model(model_path, quantization="none", device=args.device, dtype="auto")
    common.strip_stale_gguf(base)
    stack = build_stack(base, tok, adapters)
    names = [n for n, _ in adapters]
    recs = load_prompts("demo:prompts")
    prompts = [r["prompt"] for r in recs[: args.prompts]]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    workloads = {
        "expand": dict(num_samples=2, max_new_tokens=args.expand_tokens, temperature=0.7, top_p=1.0,
                       batch_size=args.expand_batch, record_logps=True),
        "export": dict(num_samples=1, max_new_tokens=args.export_tokens, temperature=0.0,
                       batch_size=args.export_batch),
    }
    engines = {"old": dict(engine="hf"), "new": dict(engine="fast"), "bf16": dict(engine="fast", dtype=torch.bfloat16),
               "bf16_eq7": dict(engine="fast", dtype=torch.bfloat16)}
    only = {"bf16_eq7": "expand"}  # bf16 whose own log-probs feed Eq. 7 (no forward): expand only
    workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    if args.sides:
        engines = {k: v for k, v in engines.items() if k in args.sides.split(",")}
    # (workload, side) pairs that run, in interleaving order
    runs = [(w, s) for w in workloads for s in engines if only.get(s, w) == w]
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    fidelity: dict[str, list] = {"expand_abs_dev_per_token": [], "expand_seq_abs_dev": [], "label_flips": [],
                                 "flipped_abs_margin": []}
    raw = {f"{w}_{s}": [] for w, s in runs}
    greedy: dict[str, list] = {}
    with stack.use(names) as m:
        for w, s in runs:  # warm-up, untimed
            sample_responses(m, tok, prompts[:2], seed=99, **engines[s], **{**workloads[w], "max_new_tokens": 4})
        for rep in range(args.repeats):
            for w, s in runs:
                kw, eng = workloads[w], engines[s]
                sync()
                t0 = time.perf_counter()
                if w == "expand":  # one call per shard, each with its own seed, as the stage does
                    shard = args.expand_shard
                    out = [g for s0 in range(0, len(prompts), shard)
                           for g in sample_responses(m, tok, prompts[s0 : s0 + shard],
                                                     seed=1000 * rep + s0, **eng, **kw)]
                else:
                    out = sample_responses(m, tok, prompts, seed=1000 * rep, **eng, **kw)
                if w == "expand" and s == "bf16":  # Eq. 7 needs pi_{i-1}'s own log-probs: a float32 forward
                    seqs = [(prompt_ids[i], smp) for i, g in enumerate(out) for smp in g]
                    fwd = response_logps(stack, names, [x for x, _ in seqs], [y.token_ids for _, y in seqs],
                                         batch_size=16)  # expand: 2 x judge_batch_size 8
                sync()
                wall = time.perf_counter() - t0
                if w == "expand" and s == "bf16":
                    for (_, smp), f in zip(seqs, fwd.tolist()):
                        fidelity["expand_seq_abs_dev"].append(abs(smp.logp - f))
                        fidelity["expand_abs_dev_per_token"].append(abs(smp.logp - f) / max(1, smp.num_tokens))
                    # Eq. 7 against pi_init, untimed: the label from the float32 forward vs from the bf16 copy
                    ref = response_logps(stack, [], [x for x, _ in seqs], [y.token_ids for _, y in seqs],
                                         batch_size=16).tolist()
                    for i in range(0, len(seqs), 2):
                        exact = (fwd[i].item() - ref[i]) - (fwd[i + 1].item() - ref[i + 1])
                        approx = (seqs[i][1].logp - ref[i]) - (seqs[i + 1][1].logp - ref[i + 1])
                        flip = (exact > 0) != (approx > 0)
                        fidelity["label_flips"].append(int(flip))
                        if flip:
                            fidelity["flipped_abs_margin"].append(abs(exact))
                n = sum(x.num_tokens for g in out for x in g)
                la = os.getloadavg()[0]
                raw[f"{w}_{s}"].append({"tokens": n, "wall_s": wall, "tokens_per_s": n / wall, "loadavg_1m": la})
                if w == "export":
                    greedy.setdefault(s, [x[0].token_ids for x in out])
                print(f"[{rep + 1}/{args.repeats}] {w:6s} {s}: {n:6d} tokens in {wall:7.2f} s = "
                      f"{n / wall:7.1f} tok/s (load {la:.2f})", flush=True)
    sides = {k: common.side("generated tokens per second", "tok/s", True, v, "tokens_per_s") for k, v in raw.items()}
    ratios = [common.ratio(f"{w}: {s} / old throughput", f"{w}_{s}", f"{w}_old", sides, ">=", 3.0)
              for w, s in runs if s != "old" and "old" in engines]

    def agree(a_side, b_side):
        a, b = greedy.get(a_side), greedy.get(b_side)
        if a is None or b is None:
            return None, []
        pre = [next((i for i, (x, y) in enumerate(zip(u, v)) if x != y), min(len(u), len(v)))
               for u, v in zip(a, b) if u != v]
        return sum(u == v for u, v in zip(a, b)), sorted(pre)

    same, prefix = agree("old", "new")
    same_bf16, prefix_bf16 = agree("new", "bf16")
    dev_tok = sorted(fidelity["expand_abs_dev_per_token"])
    dev_seq = sorted(fidelity["expand_seq_abs_dev"])
    fid = {"greedy_identical_bf16_vs_new": same_bf16, "greedy_first_difference_bf16_vs_new": prefix_bf16,
           "expand_logp_abs_dev_per_token_median": common.median(dev_tok) if dev_tok else None,
           "expand_logp_abs_dev_per_token_max": dev_tok[-1] if dev_tok else None,
           "expand_logp_abs_dev_per_sequence_median": common.median(dev_seq) if dev_seq else None,
           "expand_logp_abs_dev_per_sequence_max": dev_seq[-1] if dev_seq else None,
           "eq7_labels_flipped": [sum(fidelity["label_flips"]), len(fidelity["label_flips"])],
           "eq7_flipped_abs_margin_nats": sorted(round(x, 3) for x in fidelity["flipped_abs_margin"]),
           "cpu_has_fast_bf16": fast_bf16_cpu()}
    notes = [
        "One process and model; interleaved old, new per workload after one warm-up of each; tokens/s per repeat, "
        "median reported.",
        f"{len(prompts)} demo prompts; policy base + seed + iter1 "
        f"({'the trained adapters of ' + args.run if args.run else f'two random frozen rank-{args.lora_r} adapters'}); "
        f"sequences stop at the end of turn; expand samples in calls of {args.expand_shard} prompts (one shard).",
        f"export (greedy): {same}/{len(prompts)} answers token-identical between old and new; the others agree for "
        f"their first {sorted(prefix)} tokens (float rounding of merged vs unmerged weights flips a near-tie argmax).",
        f"bf16 fidelity: {json.dumps(fid)} (greedy bf16 vs new float32; expand: log-prob of each bf16 sample under "
        f"the bf16 copy vs a float32 forward of pi_1, per token and per sequence, nats).",
        f"load average (1, 5, 15 min) at start {load0}; per-repeat 1-min load in raw.",
        f"torch threads: {torch.get_num_threads()}.",
    ]
    settings = dict(model=model_path, device=args.device, threads=args.threads, prompts=len(prompts),
                    expand_shard=args.expand_shard, adapters=dict(adapters), repeats=args.repeats,
                    workloads=workloads, seed=args.seed, policy="base + seed + iter1", sides=list(engines),
                    bf16_fidelity=fid)
    common.write_result(args, "generation", settings, sides, ratios, notes, machine)


def batching(args):
    """Batched (P prompts x S samples in one call) vs unbatched (one sequence per call), both on the new engine."""
    if args.quick:
        args.prompts, args.samples, args.max_new_tokens, args.prompt_len = 4, 2, 8, 8
        args.repeats = min(args.repeats, 2)
    else:
        args.prompts = min(args.prompts, 12)
    machine = common.machine_info(args.threads, args.device)
    import torch

    from spa_lite.generation import sample_responses
    from spa_lite.models import load_base_model
    from spa_lite.stack import build_stack

    model_path = common.resolve_model(args.model)
    adapter = common.adapter_dir(model_path, args.lora_r, args.seed)
    base, tok = load_base_model(model_path, quantization="none", device=args.device, dtype="auto")
    common.strip_stale_gguf(base)
    if not args.no_force_length:
        base.generation_config.min_new_tokens = args.max_new_tokens
    stack = build_stack(base, tok, [("seed", adapter)])
    rows = common.make_text_rows(tok, args.prompts, args.prompt_len, 2, seed=args.seed)
    prompts = [[{"role": "user", "content": r["prompt"].strip()}] for r in rows]
    bs = args.batch_size or args.prompts
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=0.7, top_p=1.0)

    def batched(m, seed):
        out = sample_responses(m, tok, prompts, num_samples=args.samples, batch_size=bs, seed=seed, **kw)
        return sum(s.num_tokens for group in out for s in group)

    def unbatched(m, seed):
        n = 0
        for i, pr in enumerate(prompts):
            for j in range(args.samples):
                out = sample_responses(m, tok, [pr], num_samples=1, batch_size=1,
                                       seed=seed + i * args.samples + j, **kw)
                n += out[0][0].num_tokens
        return n

    fns = {"batched": batched, "unbatched": unbatched}
    raw = {k: [] for k in fns}
    with stack.use(["seed"]) as m:
        for fn in fns.values():  # warm-up, untimed
            fn(m, 10_000)
        for rep in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                n = fn(m, 1000 * rep)
                wall = time.perf_counter() - t0
                raw[name].append({"tokens": n, "wall_s": wall, "tokens_per_s": n / wall})
                print(f"[{rep + 1}/{args.repeats}] {name:9s} {n:6d} tokens in {wall:7.2f} s = {n / wall:8.1f} tok/s",
                      flush=True)
    sides = {k: common.side("generated tokens per second", "tok/s", True, v, "tokens_per_s") for k, v in raw.items()}
    ratios = [common.ratio("batched / unbatched throughput", "batched", "unbatched", sides, ">=", 5.0)]
    notes = [f"{args.prompts} prompts x {args.samples} samples; lengths forced to max_new_tokens"
             if not args.no_force_length else "sequences stop at EOS", f"torch threads: {torch.get_num_threads()}."]
    settings = dict(mode="batching", model=model_path, prompts=args.prompts, samples=args.samples,
                    max_new_tokens=args.max_new_tokens, batch_size=bs, force_length=not args.no_force_length)
    common.write_result(args, "generation_batching", settings, sides, ratios, notes, machine)


if __name__ == "__main__":
    main()
