"""Run stages of a recipe in this process (launched N times by torchrun).

    dist_worker.py RECIPE NAME [STAGE ...]     stages: expand, train (default both), seed, train-resume
    (train-resume: train --iter 1 killed at its 3rd optimizer step, before that step's checkpoint, then rerun to
    completion: it resumes from step 2's)
"""

import sys

from inject import crash_at_step

from spa_lite.config import load_recipe
from spa_lite.stages import common, expand, seed_dpo, train

recipe = load_recipe(sys.argv[1], {"name": sys.argv[2]})
for stage in sys.argv[3:] or ["expand", "train"]:
    if stage == "seed":
        seed_dpo.run(recipe)
    elif stage == "expand":
        expand.run(recipe, 1)
    elif stage == "train":
        train.run(recipe, 1)
    elif stage == "train-resume":
        try:
            with crash_at_step(common, "run_dpo_loop", 3):
                train.run(recipe, 1)
        except KeyboardInterrupt:
            pass
        train.run(recipe, 1)
    else:
        raise SystemExit(f"unknown stage {stage}")
