"""Stage reward: a Bradley-Terry reward model on the gold pairs D0 (the ``reward`` adapter on the base plus a scalar
head; two heads, quality and length, with ``reward.length_head``), the judge of ``expand.judge: reward``. Writes
runs/<name>/reward/{adapter/, head.safetensors, metrics.jsonl, manifest.json}; the manifest holds its accuracy on
held-out gold pairs."""

from __future__ import annotations

import torch

from spa_lite.config import Recipe
from spa_lite.data import load_pairs, shuffled
from spa_lite.distributed import get_dist
from spa_lite.errors import DataError, DivergedError, SpaError
from spa_lite.layout import REWARD_HEAD_FILE, REWARD_STAGE
from spa_lite.loading import load_stack
from spa_lite.memory import trim_heap
from spa_lite.reward import REWARD_ADAPTER, RewardModel, RewardSpec, gold_accuracy, new_head, run_reward_loop, save_head
from spa_lite.runs import StageRun, stage_run
from spa_lite.stack import LoraSettings
from spa_lite.stages.common import tokenize_pairs, truncated_count
from spa_lite.training import total_steps
from spa_lite.ui import progress


def reward_lora(recipe: Recipe) -> LoraSettings:
    """The reward adapter's LoRA: the reward section's rank and alpha where set, else the model's."""
    m, c = recipe.model, recipe.reward
    return LoraSettings(c.lora_r or m.lora_r, c.lora_alpha or m.lora_alpha, m.lora_dropout, m.lora_target_modules)


def gold_split(recipe: Recipe) -> tuple[list[dict], list[dict], str]:
    """(training pairs, held-out pairs, where the held-out ones come from).

    The training pairs are seed DPO's D0 (same shuffle and ``data.seed_limit``). Held out: data.eval_pairs when
    set, else the last ``reward.holdout`` fraction of D0, which is then not trained on.
    """
    d = recipe.data
    rows = shuffled(load_pairs(d.seed_pairs, d.format, dropped={}), d.shuffle_seed)
    if d.seed_limit:
        rows = rows[: d.seed_limit]
    if d.eval_pairs:
        return rows, load_pairs(d.eval_pairs, "auto", limit=recipe.reward.eval_limit), str(d.eval_pairs)
    k = int(len(rows) * recipe.reward.holdout)
    held = rows[len(rows) - k :] if k else []
    return rows[: len(rows) - k], held[: recipe.reward.eval_limit], f"holdout of {d.seed_pairs}"


def run(recipe: Recipe, force: bool = False) -> dict:
    """Train the reward model. Returns the stage manifest (the existing one if the stage is already complete)."""
    if get_dist().world > 1:
        raise SpaError("spa-lite reward runs in one process: start it without a launcher (accelerate, torchrun)")
    with stage_run(recipe, REWARD_STAGE, force) as st:
        if st.done:
            return st.done
        train_rows, held_rows, held_source = gold_split(recipe)
        stack = load_stack(recipe, frozen_upto=-1, trainable=REWARD_ADAPTER, lora=reward_lora(recipe))
        m = recipe.model
        pairs, skipped = tokenize_pairs(stack.tokenizer, train_rows, m.max_length, m.max_prompt_length, m.truncation)
        held, held_skipped = tokenize_pairs(stack.tokenizer, held_rows, m.max_length, m.max_prompt_length, m.truncation)
        if not pairs:
            raise DataError(recipe.data.seed_pairs, None, None, f"no trainable gold pairs ({len(train_rows)} after "
                            f"the holdout, {skipped} over model.max_length)")
        hidden = stack.model.get_base_model().config.hidden_size
        device = next(stack.model.parameters()).device
        rm = RewardModel(stack, new_head(hidden, recipe.seed * 1_000_003 + 7, device,
                                         heads=2 if recipe.reward.length_head else 1))
        summary = _fit(st, rm, pairs)
        stack.save_trainable(st.dir / "adapter")
        save_head(rm.head, st.dir / REWARD_HEAD_FILE)
        summary.update(pairs_used=len(pairs), pairs_skipped_length=skipped, pairs_truncated=truncated_count(pairs),
                       truncation=m.truncation, heldout={**gold_accuracy(rm, held), "source": held_source,
                                                         "skipped_length": held_skipped,
                                                         "truncated": truncated_count(held)})
        return st.finish(summary, {"seed_pairs": recipe.data.seed_pairs, "heldout": held_source})


def _fit(st: StageRun, rm: RewardModel, pairs: list) -> dict:
    """The reward loop of stage run ``st`` with a progress bar; refuses a diverged loss or non-finite weights."""
    out = st.dir
    spec = RewardSpec.from_config(st.recipe.reward, seed=st.recipe.seed)
    with progress(enabled=True) as p:
        task = p.add_task("reward model", total=total_steps(len(pairs), spec), info="")

        def on_step(step: int, total: int, row: dict) -> None:
            trim_heap()
            p.update(task, completed=step, info=f"loss {row['loss']:.4f} acc {row['accuracy']:.2f}")
            st.log_step(row)

        try:
            summary = run_reward_loop(rm, pairs, spec, out, on_step=on_step)
        except DivergedError as e:
            raise DivergedError(e.step, f"the reward model diverged: {e}; {out} is not complete. Lower reward.lr "
                                "(or raise reward.warmup_ratio) and rerun `spa-lite reward --force`") from None
    if not all(bool(torch.isfinite(w).all()) for w in rm.parameters()):
        raise DivergedError(summary["steps"], f"the reward model's weights are not finite; {out} is not complete. "
                            "Lower reward.lr and rerun `spa-lite reward --force`")
    return summary
