"""Tokens per second of batched sampling (spa_lite.generation.sample_responses, P prompts x S samples in one
call) vs unbatched (the same function, one prompt and one sample per call: batch_size=1, num_samples=1).

One process, one model (the base with the frozen 'seed' adapter active, as in SPA's expand stage); the two
sides alternate batched, unbatched, batched, unbatched, ... after one untimed warm-up of each. By default
every sequence is forced to exactly ``--max-new-tokens`` tokens (generation_config.min_new_tokens), so both
sides do the same work whatever the model samples; tokens/s = generated response tokens / wall seconds.

Target: batched / unbatched >= 5 (CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "generation", repeats=3)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=24, help="words in each prompt (random vocabulary words)")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per generate call when batched (0 = all)")
    p.add_argument("--no-force-length", action="store_true", help="let sequences stop at EOS")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.samples, args.max_new_tokens, args.prompt_len = 4, 2, 8, 8
        args.repeats = min(args.repeats, 2)

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

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

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
        for name, fn in fns.items():  # warm-up, untimed
            fn(m, 10_000)
        for rep in range(args.repeats):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                n = fn(m, 1000 * rep)
                sync()
                wall = time.perf_counter() - t0
                raw[name].append({"tokens": n, "wall_s": wall, "tokens_per_s": n / wall})
                print(f"[{rep + 1}/{args.repeats}] {name:9s} {n:6d} tokens in {wall:7.2f} s = {n / wall:8.1f} tok/s",
                      flush=True)

    sides = {k: common.side("generated tokens per second", "tok/s", True, v, "tokens_per_s") for k, v in raw.items()}
    ratios = [common.ratio("batched / unbatched throughput", "batched", "unbatched", sides, ">=", 5.0)]
    notes = [
        "Same process and model for both sides; interleaved batched, unbatched, ... after one warm-up of each.",
        f"{args.prompts} prompts x {args.samples} samples = {args.prompts * args.samples} sequences per repeat; "
        f"batched = {-(-args.prompts // bs)} generate call(s) of {bs} prompts x {args.samples} samples, unbatched = "
        f"{args.prompts * args.samples} calls of one sequence.",
        "Lengths forced to max_new_tokens (min_new_tokens)" if not args.no_force_length
        else "Sequences stop at EOS: the two sides may generate different token counts.",
        f"torch threads: {torch.get_num_threads()}.",
    ]
    settings = dict(model=model_path, device=args.device, threads=args.threads, prompts=args.prompts,
                    samples=args.samples, max_new_tokens=args.max_new_tokens, prompt_len=args.prompt_len,
                    batch_size=bs, force_length=not args.no_force_length, seed=args.seed, policy="base + seed adapter")
    common.write_result(args, "generation", settings, sides, ratios, notes, machine)


if __name__ == "__main__":
    main()
