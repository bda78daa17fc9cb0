"""Eq. 7 judge throughput of one checkout (``stack``, ``stack_sampler``) through that checkout's own bench worker.

    python bench/before_after/judge_worker.py TREE PAIRS    # prints one line: RETIME {json}

Used by ``gen_judge.sh`` to time two commits interleaved (issue 22's before/after).
"""

import json
import sys


def main() -> None:
    tree, pairs = sys.argv[1], int(sys.argv[2])
    sys.path.insert(0, tree + "/bench")
    import common  # the checkout's own bench/common.py

    model = common.resolve_model("smollm2")
    adapter = common.adapter_dir(model, 16, 0)
    cfg = dict(model=model, adapter=adapter, device="cpu", threads=2, seed=0, pairs=pairs, batch_size=8,
               prompt_len=32, response_len=64)
    out = {}
    for impl in ("stack", "stack_sampler"):
        r = common.run_worker("judge", {**cfg, "impl": impl})
        out[impl] = {k: r[k] for k in ("pairs_per_s", "wall_s", "p_mean", "p_first")}
    print("RETIME " + json.dumps(out))


if __name__ == "__main__":
    main()
