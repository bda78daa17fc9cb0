"""Re-sample shard 0 of s42-oracle_a70's iteration-1 expand (issue 19) a few times and print its token count.

That shard decoded 3,033 tokens in the a70 arm and 3,130 in the oracle, a55 and a85 arms (same per-row random
draws, bf16 decoding copy). Run it under different settings (OMP_NUM_THREADS, ONEDNN_MAX_CPU_ISA) to see which
kernels change the samples:

    python bench/before_after/shard0_check.py --run-dir runs/spa-gain-judge --tries 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import torch

    from spa_lite.config import load_recipe
    from spa_lite.data import iteration_prompts, load_prompts
    from spa_lite.loading import load_stack
    from spa_lite.stages.expand import expand_shard

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/spa-gain-judge", help="the gain run's folder (holds s42-oracle_a70)")
    ap.add_argument("--tries", type=int, default=3)
    args = ap.parse_args()
    r = load_recipe("smollm2-judge", {"name": "s42-oracle_a70", "run_dir": args.run_dir, "seed": 42,
                                      "memory.malloc": "glibc", "expand.judge": "verifier",
                                      "expand.verifier_accuracy": 0.7})
    pool = load_prompts(r.data.prompts, r.data.format)
    prompts = iteration_prompts(pool, r.data.iter_prompts, 1, r.data.shuffle_seed)[: r.expand.shard_size]
    stack = load_stack(r, frozen_upto=0)
    for t in range(args.tries):
        t0 = time.time()
        res = expand_shard(stack, r, prompts, 42 * 1_000_003 + 10_007)  # _make_shards' seed of shard 0, iteration 1
        print(f"try {t}: sampled_tokens {res['counts']['sampled_tokens']} pairs {len(res['rows'])} "
              f"threads {torch.get_num_threads()} ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')} "
              f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
