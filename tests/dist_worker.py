"""Run stages of a recipe in this process (launched N times by torchrun).

    dist_worker.py RECIPE NAME [STAGE ...]     stages: expand, train (default both), seed, train-resume
    (train-resume: train --iter 1 killed after 2 optimizer steps, then rerun to completion)
"""

import sys

from spa_lite.config import load_recipe
from spa_lite.stages import expand, seed_dpo, train

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
            train.run(recipe, 1, stop_after=2)
        except KeyboardInterrupt:
            pass
        train.run(recipe, 1)
    else:
        raise SystemExit(f"unknown stage {stage}")
