"""Stage train --iter i: pi_theta starts as pi_{i-1} (a new zero adapter on the frozen stack), pi_ref = pi_{i-1};
DPO on D_i with self-refinement (Eq. 10) and de-coupled noise detection (Eq. 11-12)."""

from __future__ import annotations

from spa_lite.audit import apply_human_labels, read_annotations
from spa_lite.config import Recipe
from spa_lite.data import pair_texts
from spa_lite.errors import DataError
from spa_lite.io import read_jsonl
from spa_lite.layout import Stage, adapter_name, audit_path, data_path
from spa_lite.loading import load_stack
from spa_lite.losses import lambda_for_iteration
from spa_lite.runs import stage_run
from spa_lite.stages.common import fit_and_save, tokenize_pairs, truncated_count
from spa_lite.training import LoopSpec


def loop_spec(recipe: Recipe, iteration: int, ref: list[str]) -> LoopSpec:
    """Iteration i's loop: the ``train`` section, pi_ref = pi_{i-1} (``ref``), lambda of iteration i; DND needs
    refinement (its confidences only decide which pairs to refine)."""
    c = recipe.train
    return LoopSpec.from_config(c, seed=recipe.seed + iteration, ref=ref, dnd=c.dnd and c.refine,
                                lam=lambda_for_iteration(iteration, c.lambdas))


def run(recipe: Recipe, iteration: int, force: bool = False, recipe_arg: str = "RECIPE") -> dict:
    """Train pi_i on D_i. Returns the stage manifest (the existing one if the stage is already complete)."""
    with stage_run(recipe, Stage("train", iteration), force, recipe_arg) as st:
        if st.done:
            return st.done
        data = data_path(recipe.run_path, iteration)
        rows = [pair_texts(r, data, line) for line, r in read_jsonl(data)]
        if not rows:
            raise DataError(data, None, None, "D_i is empty: expand judged no usable pairs (its manifest's summary "
                            "counts them: identical, dropped_truncated, undecided, below_min_confidence, "
                            "length_balance_dropped, length_mismatched)")
        labels = {"self": len(rows)}
        if recipe.train.audit_labels:  # audited pairs carry the person's label; the rest keep Eq. 7's
            rows, labels = apply_human_labels(rows, read_annotations(audit_path(recipe.run_path, iteration)))
        stack = load_stack(recipe, frozen_upto=iteration - 1, trainable=adapter_name(iteration), shard=True)
        m = recipe.model
        pairs, skipped = tokenize_pairs(stack.tokenizer, rows, m.max_length, m.max_prompt_length, m.truncation)
        if not pairs:
            raise DataError(data, None, None, f"all {len(rows)} pairs of D_i exceed model.max_length {m.max_length} "
                            "and model.truncation is skip: set it to truncate or raise the limit")
        spec = loop_spec(recipe, iteration, stack.prev)
        summary = fit_and_save(st, stack, pairs, spec, f"train iter {iteration}")
        summary.update(pairs_used=len(pairs), pairs_skipped_length=skipped, pairs_truncated=truncated_count(pairs),
                       truncation=m.truncation, dnd_lambda=spec.lam if spec.dnd else None, labels=labels)
        return st.finish(summary, {"data": str(data)})
