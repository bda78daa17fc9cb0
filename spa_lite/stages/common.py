"""What the stages share: loading the base and the adapter stack, and tokenising pairs for training."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spa_lite.config import Recipe
from spa_lite.logps import TokenizedPair, tokenize_pair
from spa_lite.models import load_base_model
from spa_lite.runs import adapter_dir
from spa_lite.stack import LoraSettings, PolicyStack, adapter_name, build_stack


def setup_torch(recipe: Recipe) -> None:
    if recipe.threads:
        torch.set_num_threads(recipe.threads)


def load_stack(recipe: Recipe, frozen_upto: int, trainable: str | None = None, shard: bool = False) -> PolicyStack:
    """The base model with adapters pi_0..pi_{frozen_upto} frozen (-1: none) and an optional new one.

    ``shard``: a training stage; the base is sharded with FSDP2 when ``model.fsdp`` asks for it.
    """
    stack = _load_stack(recipe, frozen_upto, trainable)
    from spa_lite.fsdp import fsdp_requested, shard_stack

    if shard and fsdp_requested(recipe.model.fsdp):
        from spa_lite.distributed import get_dist

        shard_stack(stack, get_dist().world)
    return stack


def _load_stack(recipe: Recipe, frozen_upto: int, trainable: str | None = None) -> PolicyStack:
    from spa_lite.distributed import local_device

    setup_torch(recipe)
    m = recipe.model
    device = local_device() or m.device  # under a launcher each process takes its own GPU
    base, tok = load_base_model(m.name_or_path, m.quantization, m.dtype, device, m.gradient_checkpointing)
    frozen = [(adapter_name(k), adapter_dir(recipe, k)) for k in range(frozen_upto + 1)]
    lora = LoraSettings(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    if not frozen and trainable is None:
        # judging and sampling from pi_init alone still go through a stack: one zero adapter, never active
        stack = build_stack(base, tok, (), trainable="_unused", lora=lora)
        stack.trainable = None
        return stack
    # the new adapter's A matrices are drawn from torch's global RNG: seed it from the recipe, so that a stage
    # gives the same pi_i whether it runs in a fresh process, after other stages (`run`), or in a test
    torch.manual_seed(recipe.seed * 1_000_003 + frozen_upto + 1)
    return build_stack(base, tok, frozen, trainable, lora)


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
    from spa_lite.distributed import get_dist
    from spa_lite.tracking import log_step
    from spa_lite.training import run_dpo_loop, total_steps
    from spa_lite.ui import progress

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
