"""Stage 0: DPO on the gold seed pairs D0 (pi_ref = pi_init, adapters off) gives the ``seed`` adapter, pi_0."""

from __future__ import annotations

from spa_lite.config import Recipe
from spa_lite.data import load_pairs, shuffled
from spa_lite.errors import DataError
from spa_lite.layout import Stage
from spa_lite.loading import load_stack
from spa_lite.runs import stage_run
from spa_lite.stages.common import fit_and_save, tokenize_pairs, truncated_count
from spa_lite.training import LoopSpec


def loop_spec(recipe: Recipe) -> LoopSpec:
    """Seed DPO's loop: the ``seed_dpo`` section, pi_ref = pi_init, no refinement."""
    return LoopSpec.from_config(recipe.seed_dpo, seed=recipe.seed, ref=[])


def run(recipe: Recipe, force: bool = False) -> dict:
    """Train pi_0. Returns the stage manifest (the existing one if the stage is already complete)."""
    with stage_run(recipe, Stage("seed", 0), force) as st:
        if st.done:
            return st.done
        dropped: dict = {}  # identical / empty pairs, skipped and counted
        rows = shuffled(load_pairs(recipe.data.seed_pairs, recipe.data.format, dropped=dropped), recipe.data.shuffle_seed)
        if recipe.data.seed_limit:
            rows = rows[: recipe.data.seed_limit]
        stack = load_stack(recipe, frozen_upto=-1, trainable="seed", shard=True)
        m = recipe.model
        pairs, skipped = tokenize_pairs(stack.tokenizer, rows, m.max_length, m.max_prompt_length, m.truncation)
        if not pairs:
            raise DataError(recipe.data.seed_pairs, None, None, f"all {len(rows)} pairs exceed model.max_length "
                            f"{m.max_length} or model.max_prompt_length {m.max_prompt_length} and model.truncation is "
                            "skip: set it to truncate or raise the limits")
        summary = fit_and_save(st, stack, pairs, loop_spec(recipe), "seed DPO")
        summary.update(pairs_used=len(pairs), pairs_skipped_length=skipped, pairs_truncated=truncated_count(pairs),
                       truncation=m.truncation, pairs_dropped=dropped)
        return st.finish(summary, {"seed_pairs": recipe.data.seed_pairs})
