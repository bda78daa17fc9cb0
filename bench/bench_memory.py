"""Peak memory of one SPA training iteration's steps: the adapter stack vs three full model copies vs TRL.

Each configuration runs in a FRESH subprocess (peak RSS is a process-lifetime high-water mark), in the order
spa, threecopy, trl, spa, threecopy, trl, ... Reported: peak RSS (ru_maxrss) minus the RSS after imports,
i.e. model weights + adapters + optimizer state + activations of ``--steps`` optimizer steps; on CUDA also
torch.cuda.max_memory_allocated.

  spa       : one base + frozen 'seed' adapter + trainable 'iter1' (pi_ref = seed, DND + refinement on),
              spa_lite.training.run_dpo_loop.
  threecopy : pi_theta, pi_ref (= pi_{i-1}, seed merged) and pi_init as three full models, the same
              spa_lite.training.pair_loss computed across them (pi_init is resident, as a naive iteration
              also judges with it, but the DPO loss does not read it).
  trl       : trl.DPOTrainer, peft LoRA on the same base, ref = adapters disabled, plain sigmoid DPO.

Targets: spa <= 1.2x trl; threecopy >= 2x spa.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "memory", repeats=3)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step (2B rows per forward)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=192)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per process (AdamW state exists from step 1)")
    p.add_argument("--frozen", type=int, default=1, choices=[0, 1], help="frozen adapters under the trainable one")
    p.add_argument("--impls", default="spa,threecopy,trl")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="every side recomputes activations in backward (what a memory-bound user turns on)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.prompt_len, args.response_len, args.steps = 2, 8, 24, 2
        args.repeats = min(args.repeats, 2)

    machine = common.machine_info(args.threads, args.device)
    model = common.resolve_model(args.model)
    adapter = common.adapter_dir(model, args.lora_r, args.seed)
    impls = args.impls.split(",")
    cfg = dict(model=model, adapter=adapter, device=args.device, threads=args.threads, seed=args.seed,
               batch_size=args.batch_size, prompt_len=args.prompt_len, response_len=args.response_len,
               steps=args.steps, frozen=args.frozen, lora_r=args.lora_r, ckpt=args.gradient_checkpointing)
    raw = {k: [] for k in impls}
    for rep in range(args.repeats):
        for impl in impls:  # interleaved: A, B, C, A, B, C, ...
            r = common.run_worker("train", {**cfg, "impl": impl})
            raw[impl].append(r)
            cuda = f", cuda {r['cuda_max_allocated_mib']:.0f} MiB" if "cuda_max_allocated_mib" in r else ""
            pl = r.get("post_load_peak_minus_baseline_mib")
            post = f", post-load peak-baseline {pl:8.1f} MiB" if pl is not None else ""
            print(f"[{rep + 1}/{args.repeats}] {impl:10s} peak-baseline {r['peak_minus_baseline_mib']:8.1f} MiB"
                  f" (peak {r['peak_rss_mib']:.0f}, baseline {r['baseline_rss_mib']:.0f}){post}{cuda}", flush=True)

    key = "cuda_max_allocated_mib" if args.device.startswith("cuda") else "peak_minus_baseline_mib"
    metric = "torch.cuda.max_memory_allocated" if key.startswith("cuda") else "peak RSS - RSS after imports"
    sides = {k: common.side(metric, "MiB", False, v, key) for k, v in raw.items()}
    suffixes = [""]
    if not args.device.startswith("cuda") and all(r.get("hwm_reset") for v in raw.values() for r in v):
        # Second view: the high-water mark is reset once the models are built, so the loading transient of
        # from_pretrained (file pages + copies) does not hide or inflate the resident-models + training peak.
        for k, v in raw.items():
            sides[k + "_postload"] = common.side("VmHWM after a reset post-loading - RSS after imports", "MiB", False,
                                                 v, "post_load_peak_minus_baseline_mib")
            sides[k + "_postload"]["raw"] = "see the side without _postload"
        suffixes.append("_postload")
    ratios = []
    for sfx in suffixes:
        view = " (post-load peak)" if sfx else " (ru_maxrss)"
        if "spa" in raw and "trl" in raw:
            ratios.append(common.ratio("spa / trl peak memory" + view, "spa" + sfx, "trl" + sfx, sides, "<=", 1.2))
        if "spa" in raw and "threecopy" in raw:
            ratios.append(common.ratio("threecopy / spa peak memory" + view, "threecopy" + sfx, "spa" + sfx, sides,
                                       ">=", 2.0))
    notes = [
        "Each repeat of each side is a fresh Python process; sides are interleaved spa, threecopy, trl, ...",
        "Memory includes the model weights (loaded in-process), adapters, AdamW state and activations.",
        "Workers run with MALLOC_MMAP_THRESHOLD_=65536 (unless set): freed large blocks go back to the OS, so peak "
        "RSS tracks peak live memory rather than glibc arena fragmentation (earlier runs without it: "
        "bench/results/memory.json).",
        "ru_maxrss also contains the transient of from_pretrained (file pages and copies while loading), which can "
        "exceed the training peak for small batches; the _postload sides reset the high-water mark "
        "(/proc/self/clear_refs 5) after the models are built and read VmHWM at the end.",
        "TRL 1.16 and spa_lite both score tokens from hidden states with TRL's chunked LM-head kernel (no "
        "[rows, L, vocab] logits); spa_lite's DND mix goes through the same kernel (the head is affine).",
        f"gradient checkpointing: {'on for every side' if args.gradient_checkpointing else 'off for every side'} "
        "(DPOConfig defaults to on; spa_lite's recipes to off).",
        f"frozen adapters under the trainable one: {args.frozen} (TRL trains a single adapter against the bare base).",
    ]
    common.write_result(args, "memory", {k: v for k, v in cfg.items() if k != "adapter"} | {"impls": impls},
                        sides, ratios, notes, machine)


if __name__ == "__main__":
    main()
