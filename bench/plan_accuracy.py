"""Memory planner accuracy: spa_lite.plan's estimate of one training step's peak against the measured peak
(a fresh process per case; RSS high-water mark reset after a warm-up step; tests/test_plan.py's MEASURE).

Run: python bench/plan_accuracy.py [--out bench/results/plan_accuracy.json]   (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench/results/plan_accuracy.json"))
    args = ap.parse_args()
    import torch
    from test_plan import SMOLLM2, TINY, estimate_step, measure_step

    out = {"command": " ".join(["python"] + sys.argv), "machine": {"platform": platform.platform(),
           "torch": torch.__version__}, "target": "estimate / measured within 0.8-1.2", "cases": {}}
    for name, cfg, B, L, ck in (("tiny", TINY, 8, 256, False), ("smollm2", SMOLLM2, 2, 256, False),
                                ("smollm2_ckpt", SMOLLM2, 2, 256, True)):
        m = measure_step(cfg, B=B, L=L, ckpt=ck, dnd=True)
        e = estimate_step(cfg, B=B, L=L, ckpt=ck, dnd=True)
        out["cases"][name] = {"pairs": B, "seq_len": L, "gradient_checkpointing": ck, "measured_mib": round(m / 2**20, 1),
                              "estimated_mib": round(e / 2**20, 1), "ratio": round(e / m, 3)}
        print(name, out["cases"][name], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
