"""Re-sample shard 0 of s42-oracle_a70's iteration-1 expand (the shard that decoded differently) a few times:
sampled_tokens 3130 = the oracle's / a55's / a85's, 3033 = a70's. Usage: python shard0_check.py N"""
import os, sys, time
sys.path.insert(0, "/work/wt-bench")
from spa_lite.config import load_recipe
from spa_lite.data import iteration_prompts, load_prompts
from spa_lite.loading import load_stack
from spa_lite.stages.expand import expand_shard
import torch
r = load_recipe("smollm2-judge", {"name": "s42-oracle_a70", "run_dir": "/work/wt-bench/runs/spa-gain-judge", "seed": 42,
                                  "memory.malloc": "glibc", "expand.judge": "verifier", "expand.verifier_accuracy": 0.7})
pool = load_prompts(r.data.prompts, r.data.format)
prompts = iteration_prompts(pool, r.data.iter_prompts, 1, r.data.shuffle_seed)[: r.expand.shard_size]
stack = load_stack(r, frozen_upto=0)
for t in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
    t0 = time.time()
    res = expand_shard(stack, r, prompts, 42 * 1_000_003 + 10_007)
    print(f"try {t}: sampled_tokens {res['counts']['sampled_tokens']} pairs {len(res['rows'])} threads "
          f"{torch.get_num_threads()} ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')} {time.time() - t0:.0f}s",
          flush=True)
