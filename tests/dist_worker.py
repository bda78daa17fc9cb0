"""Run expand --iter 1 and train --iter 1 of a recipe in this process (launched N times by torchrun)."""

import sys

from spa_lite.config import load_recipe
from spa_lite.stages import expand, train

recipe = load_recipe(sys.argv[1], {"name": sys.argv[2]})
expand.run(recipe, 1)
train.run(recipe, 1)
