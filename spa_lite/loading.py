"""From a recipe to a loaded :class:`~spa_lite.stack.PolicyStack`: the base model and the run's adapters.

Library code (export, merge, the vLLM backend) and the stages load policies the same way through
:func:`load_stack`, so nothing below ``spa_lite.stages`` needs to import a stage module.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from spa_lite.config import Recipe
from spa_lite.distributed import get_dist, local_device
from spa_lite.errors import SpaError
from spa_lite.fsdp import fsdp_requested, shard_stack
from spa_lite.layout import adapter_dir, adapter_name
from spa_lite.memory import apply_malloc
from spa_lite.models import ALIASES, load_base_model
from spa_lite.runs import verify_inputs
from spa_lite.stack import LoraSettings, PolicyStack, build_stack

__all__ = ["check_model_path", "load_stack", "setup_torch"]


def _device_type(recipe: Recipe) -> str:
    device = local_device() or recipe.model.device
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def setup_torch(recipe: Recipe) -> None:
    """Threads and the recipe's ``memory.malloc`` heap policy (never on CUDA), before any model is built."""
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    apply_malloc(recipe.memory.malloc, recipe.memory.mmap_threshold_kib, _device_type(recipe))


def check_model_path(name: str) -> None:
    """A base given as a path must exist (else transformers takes it for a malformed hub id)."""
    if name.lower() in ALIASES:
        return
    if (os.path.isabs(name) or name.startswith((".", "~"))) and not Path(name).expanduser().exists():
        raise SpaError(f"model.name_or_path: '{name}' does not exist (give a model folder, a hub id or a bundled alias)")


def load_stack(recipe: Recipe, frozen_upto: int, trainable: str | None = None, shard: bool = False,
               lora: LoraSettings | None = None) -> PolicyStack:
    """The base model with adapters pi_0..pi_{frozen_upto} frozen (-1: none) and an optional new one.

    ``shard``: a training stage; the base is sharded with FSDP2 when ``model.fsdp`` asks for it.
    ``lora``: the new adapter's settings (default: the model section's).
    """
    setup_torch(recipe)
    m = recipe.model
    check_model_path(m.name_or_path)
    verify_inputs(recipe, frozen_upto)  # eval, export and winrate load adapters without require_upstream
    device = local_device() or m.device  # under a launcher each process takes its own GPU
    base, tok = load_base_model(m.name_or_path, m.quantization, m.dtype, device, m.gradient_checkpointing)
    frozen = [(adapter_name(k), adapter_dir(recipe, k)) for k in range(frozen_upto + 1)]
    lora = lora or LoraSettings(m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    if frozen or trainable is not None:
        # the new adapter's A matrices are drawn from torch's global RNG: seed it from the recipe, so that a
        # stage gives the same pi_i whether it runs in a fresh process, after other stages (`run`), or in a test
        torch.manual_seed(recipe.seed * 1_000_003 + frozen_upto + 1)
    stack = build_stack(base, tok, frozen, trainable, lora)
    if shard and fsdp_requested(recipe.model.fsdp):
        shard_stack(stack, get_dist().world)
    return stack
