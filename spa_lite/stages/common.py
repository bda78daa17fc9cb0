"""What the stages share: tokenising pairs and the training loop with a progress bar (``load_stack`` lives in
:mod:`spa_lite.loading`)."""

from __future__ import annotations

from collections.abc import Sequence

from spa_lite.config import Recipe
from spa_lite.distributed import get_dist
from spa_lite.loading import load_stack  # noqa: F401 - importable from here as before
from spa_lite.logps import TokenizedPair, tokenize_pair
from spa_lite.stack import PolicyStack
from spa_lite.tracking import log_step
from spa_lite.training import run_dpo_loop, total_steps
from spa_lite.ui import progress


def tokenize_pairs(tokenizer, rows: Sequence[dict], max_length: int, max_prompt_length: int) -> tuple[list[TokenizedPair], int]:
    """Tokenise normalised pairs; pairs over the length limits are skipped and counted (returned second)."""
    out, skipped = [], 0
    for k, r in enumerate(rows):
        tp = tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], {"row": k, "source": r.get("source")})
        longest = len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids))
        if len(tp.prompt_ids) > max_prompt_length or longest > max_length:
            skipped += 1
            continue
        out.append(tp)
    return out, skipped


def fit_and_save(recipe: Recipe, stack: PolicyStack, pairs: list[TokenizedPair], spec, out_dir, title: str,
                 stop_after: int | None = None) -> dict:
    """Run the training loop with a progress bar, then save the trainable adapter to out_dir/adapter."""
    dist = get_dist()
    try:  # the tracker run of this stage: seed, iter1/train
        stage_key = out_dir.resolve().relative_to(recipe.run_path.resolve()).as_posix()
    except ValueError:
        stage_key = out_dir.name
    with progress(enabled=dist.main) as p:
        task = p.add_task(title, total=total_steps(len(pairs), spec), info="")

        def on_step(step: int, total: int, row: dict) -> None:
            info = f"loss {row['loss']:.4f} margin {row['reward_margin']:+.3f}"
            if spec.refine:
                info += f" flagged {row['flagged_frac']:.2f}"
            p.update(task, completed=step, info=info)
            if dist.main:
                log_step(recipe, stage_key, row)  # report_to trackers, live

        summary = run_dpo_loop(stack, pairs, spec, out_dir, on_step=on_step, stop_after=stop_after)
    state = stack.trainable_state() if stack.sharded else None  # gathered on every process
    if dist.main:
        stack.save_trainable(out_dir / "adapter", state)
    dist.barrier()
    return summary
