"""Eq. 7 judging (pi_init forward + self-check, pi_{i-1} log-probs from the sampler) on 48 demo pairs sampled
from the quick start's trained pi_1: pairs in the given order vs longest first (``judge_logprob``), interleaved,
3 repeats, plus the largest difference in p. Needs a finished quick start at RUN_DIR (default /tmp/qsb/smollm2-demo).

    python bench/judge_order.py [RUN_DIR]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import spa_lite.generation as G  # noqa: E402
import spa_lite.judge as J  # noqa: E402
from spa_lite.data import load_prompts  # noqa: E402
from spa_lite.models import load_base_model
from spa_lite.stack import build_stack

mp = common.resolve_model("smollm2")
run = sys.argv[1] if len(sys.argv) > 1 else "/tmp/qsb/smollm2-demo"
ad = [("seed", run + "/seed/adapter"), ("iter1", run + "/iter1/train/adapter")]
base, tok = load_base_model(mp, quantization="none", device="cpu", dtype="auto")
common.strip_stale_gguf(base)
stack = build_stack(base, tok, ad)
prompts = [r["prompt"] for r in load_prompts("demo:prompts")[:48]]
kw = dict(num_samples=2, max_new_tokens=64, temperature=0.7, top_p=1.0, batch_size=24, record_logps=True)
with stack.use(["seed","iter1"]) as m:
    out = G.sample_responses(m, tok, prompts, seed=0, **kw)
ids = [G.encode_prompt(tok, p) for p in prompts]
y1 = [g[0].token_ids for g in out]
y2 = [g[1].token_ids for g in out]
known = ([g[0].logp for g in out], [g[1].logp for g in out])
names = ["seed", "iter1"]
res = {}
for rep in range(3):
    for side in ("in_order", "sorted"):
        t0 = time.perf_counter()
        if side == "sorted":
            r = J.judge_logprob(stack, names, [], ids, y1, y2, batch_size=8, judge_logps=known)
        else:
            r = J._judge_in_order(stack, names, [], ids, y1, y2, 0.1, 0.0, 8, None, None, known, None, 2)
        w = time.perf_counter() - t0
        res.setdefault(side, []).append(r)
        print(f"rep {rep} {side}: {w:.2f}s load {os.getloadavg()[0]:.2f}", flush=True)
a, b = res["in_order"][0], res["sorted"][0]
print("max |dp|", max(abs(x["p"] - y["p"]) for x, y in zip(a, b)),
      "labels same", all((x["p"] > .5) == (y["p"] > .5) for x, y in zip(a, b)))
