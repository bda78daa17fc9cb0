"""The paper's ablations on the embedded demo task with the bundled SmolLM2 (CPU: tens of minutes).

Variants share one seed stage (pi_0) and then run 2 SPA iterations each:
  seed_only        pi_0 alone (DPO on the seed pairs)
  spa_no_refine    Eq. 7 labels, plain DPO                    (--no-refine)
  spa_refine_no_dnd  refinement with the policy's own confidence (Eq. 9)  (--no-dnd)
  spa_full         refinement + de-coupled noise detection (Eq. 10-12)
  judge_prev / judge_none   full SPA with Eq. 7's reference = pi_{i-2} / none
For each: verifier pass rate on held-out prompts per policy, judge accuracy (Eq. 7, init reference) on
held-out gold pairs, and the verifier's contradiction rate of each D_i.

Run: python bench/quality_ablations.py [--variants spa_full,seed_only] [--prompts 100] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

VARIANTS = {  # seed_only first: it also measures pi_init and pi_0, shared by all variants
    "seed_only": None,
    "spa_no_refine": {"train.refine": False},
    "spa_refine_no_dnd": {"train.dnd": False},
    "spa_full": {},
    "judge_prev": {"expand.judge_ref": "prev"},
    "judge_none": {"expand.judge_ref": "none"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="smollm2-demo")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--prompts", type=int, default=100, help="held-out prompts for the pass rate")
    ap.add_argument("--samples", type=int, default=2, help="samples per held-out prompt")
    ap.add_argument("--run-dir", default="runs/bench-quality")
    ap.add_argument("--set", action="append", default=[], help="extra recipe overrides key=value")
    ap.add_argument("--out", default="bench/results/quality_ablations.json")
    args = ap.parse_args()

    from spa_lite.config import load_recipe, parse_override
    from spa_lite.options import EvalOptions
    from spa_lite.stages import evaluate, expand, seed_dpo, train

    extra = {".".join(k): v for k, v in (parse_override(s) for s in args.set)}
    results: dict = {"command": " ".join(sys.argv), "machine": {"platform": platform.platform(),
                     "torch": torch.__version__, "threads": torch.get_num_threads()}, "variants": {}}
    out = Path(args.out)
    if out.exists():
        results["variants"] = json.loads(out.read_text()).get("variants", {})
    base = load_recipe(args.recipe, {"name": "seed", "run_dir": args.run_dir, **extra})
    t = time.time()
    seed_dpo.run(base)
    results["seed_wall_s"] = round(time.time() - t, 1)
    for name in args.variants.split(","):
        if name in results["variants"]:
            print(f"[quality] {name}: done before, skipped", flush=True)
            continue
        over = VARIANTS[name]
        t = time.time()
        recipe = load_recipe(args.recipe, {"name": name, "run_dir": args.run_dir, **extra, **(over or {}),
                                           **({"iterations": 0} if over is None else {})})
        if not (recipe.run_path / "seed" / "manifest.json").exists():
            shutil.copytree(base.run_path / "seed", recipe.run_path / "seed")
        for i in range(1, recipe.iterations + 1):
            expand.run(recipe, i)
            train.run(recipe, i)
        # pi_init and pi_0 are the same in every variant: evaluated once, with seed_only
        pols = None if over is None else list(range(1, recipe.iterations + 1))
        opts = EvalOptions.build({"methods": ["init"], "flip": 0.0, "prompt_limit": args.prompts, "samples": args.samples,
                                  "tag": "quality", "temperature": recipe.expand.temperature})
        rep = evaluate.run(recipe, opts, policies=pols)
        results["variants"][name] = {
            "overrides": over, "wall_s": round(time.time() - t, 1), "command": " ".join(sys.argv),
            "pass_rate": rep.get("pass_rate"), "judge_accuracy": rep.get("judge_accuracy"),
            "self_label_noise": rep.get("self_label_noise"),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"[quality] {name}: {json.dumps(rep.get('pass_rate'))}", flush=True)


if __name__ == "__main__":
    main()
