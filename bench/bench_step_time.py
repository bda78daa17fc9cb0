"""Seconds per optimizer step: spa_lite's refined DPO (self-refinement + DND) vs TRL DPOTrainer's plain DPO.

Same model, batch and sequence length (identical token ids: TRL's tokenization of the same strings is checked
against spa_lite's pairs). Every repeat of every side is a fresh subprocess running ``--steps`` optimizer
steps, in the interleaved order spa, trl, spa_plain, spa, trl, spa_plain, ...; a repeat's value is the median
of its steps after the first (warm-up). Reported per side: the per-repeat values and their median.

  spa       : run_dpo_loop, frozen 'seed' adapter + trainable 'iter1', pi_ref = seed, refine + DND on.
  trl       : trl.DPOTrainer + peft LoRA, ref = adapters disabled, loss 'sigmoid', no gradient checkpointing.
  spa_plain : as spa with refine and DND off (plain DPO through the same loop), to show DND's own cost.

Target: median(spa) / median(trl) <= 1.05.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "step_time", repeats=3)
    p.add_argument("--batch-size", type=int, default=2, help="pairs per optimizer step (2B rows per forward)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=96)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per process, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="leading steps of each process left out of its median")
    p.add_argument("--frozen", type=int, default=1, choices=[0, 1],
                   help="frozen adapters under spa's trainable one (1 = an SPA iteration; 0 = seed DPO, like TRL)")
    p.add_argument("--impls", default="spa,trl,spa_plain")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.prompt_len, args.response_len, args.steps, args.warmup = 2, 8, 24, 4, 2
        args.repeats = min(args.repeats, 2)

    machine = common.machine_info(args.threads, args.device)
    model = common.resolve_model(args.model)
    adapter = common.adapter_dir(model, args.lora_r, args.seed)
    impls = args.impls.split(",")
    cfg = dict(model=model, adapter=adapter, device=args.device, threads=args.threads, seed=args.seed,
               batch_size=args.batch_size, prompt_len=args.prompt_len, response_len=args.response_len,
               steps=args.steps, warmup=args.warmup, frozen=args.frozen, lora_r=args.lora_r)
    raw = {k: [] for k in impls}
    for rep in range(args.repeats):
        for impl in impls:
            r = common.run_worker("train", {**cfg, "impl": impl})
            ts = r["step_times_s"]
            r["step_s"] = common.median(ts[args.warmup:] if len(ts) > args.warmup else ts[-1:])
            raw[impl].append(r)
            print(f"[{rep + 1}/{args.repeats}] {impl:10s} {r['step_s']:.4f} s/step  (steps: "
                  + ", ".join(f"{t:.3f}" for t in ts) + ")", flush=True)

    sides = {k: common.side("median seconds per optimizer step (after warm-up)", "s", False, v, "step_s")
             for k, v in raw.items()}
    ratios = []
    if "spa" in sides and "trl" in sides:
        ratios.append(common.ratio("spa refined / trl step time", "spa", "trl", sides, "<=", 1.05))
    if "spa" in sides and "spa_plain" in sides:
        r = common.ratio("spa refined / spa plain (cost of DND + refinement)", "spa", "spa_plain", sides, "<=", 1.05)
        r["informational"] = True
        ratios.append(r)
    if "spa_plain" in sides and "trl" in sides:
        r = common.ratio("spa plain / trl step time", "spa_plain", "trl", sides, "<=", 1.05)
        r["informational"] = True
        ratios.append(r)
    notes = [
        "Each repeat of each side is a fresh Python process; sides interleaved in the order listed in settings.impls.",
        "A step's time covers data collation, both forwards, backward, clipping, the optimizer and per-step logging "
        "(spa: metrics.jsonl line; TRL: its logging_steps=1 callbacks), measured between consecutive steps.",
        "TRL computes log-probs with a fused tiled LM head; spa_lite materialises the logits (needed for DND).",
        f"spa runs {args.frozen} frozen adapter(s) under the trainable one; TRL trains one adapter on the bare base.",
        "Only the first ratio has a target; the others are informational.",
    ]
    common.write_result(args, "step_time", {k: v for k, v in cfg.items() if k != "adapter"} | {"impls": impls},
                        sides, ratios, notes, machine)


if __name__ == "__main__":
    main()
