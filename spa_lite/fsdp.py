"""Sharded training with PyTorch FSDP2 (``fully_shard``), for bases too large to replicate on every GPU.

Under plain data parallelism (recipes/accelerate/multi_gpu.yaml) each process holds the whole base; that
is the right choice for a 4-bit 7B/8B base, which fits one consumer GPU. For a larger full-precision base,
``seed-dpo`` and ``train`` shard it: every decoder layer becomes one FSDP unit and the rest (embeddings,
final norm, LM head) the root unit, so a process holds 1/N of the frozen base, of the LoRA adapters and of
the optimizer state, and all-gathers one layer at a time.

The adapter stack works unchanged on a sharded base: switching policy (``PolicyStack.use``) flips peft's
flags and ``requires_grad``, which FSDP2 re-reads at every unshard, and the policy, reference and DND
forwards all go through the model's own ``forward`` (FSDP's hooks all-gather there; the fused hidden-state
log-prob path reaches into the LM head's weight directly, so sharded runs use the logits path).

Every process must run the same forwards in the same order (each all-gather is a collective), so a
process whose share of a micro-batch is empty runs the same computation on a stand-in pair and discards
it (``training.run_dpo_loop``). Gradients are summed over processes, as in the unsharded loop.

Enable with ``accelerate launch --config_file recipes/accelerate/fsdp.yaml cli.py train ...`` (which sets
``ACCELERATE_USE_FSDP``) or ``model.fsdp: on`` under ``torchrun``. Expand and eval do not shard: sampling
and judging run the whole stack in each process, on its own shard of the prompts.
"""

from __future__ import annotations

import os

import torch

from spa_lite.compat import decoder_layer_classes
from spa_lite.errors import SpaError


def fsdp_requested(setting: str) -> bool:
    """``model.fsdp``: on, off, or auto (on when accelerate launched this process with an FSDP config)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def fully_shard_fn():
    """torch's FSDP2 ``fully_shard`` (ImportError when this torch has none)."""
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # pragma: no cover - torch 2.4/2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _layer_classes(base) -> set[str]:
    names = decoder_layer_classes(base)
    if not names:
        raise SpaError(f"FSDP: {type(base).__name__} names no decoder-layer class (_no_split_modules); "
                       "run with model.fsdp=off (data parallel)")
    return names


def shard_stack(stack, world: int, reshard_after_forward: bool | None = None) -> int:
    """Shard the stack's base model in place: one FSDP unit per decoder layer plus the root. Returns the units.

    Call after the adapters are loaded (they are sharded with their layers) and before the optimizer is built.
    """
    base = stack.model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise SpaError("FSDP shards full-precision (bf16/fp32) bases; a bitsandbytes 4-bit base is not sharded "
                       "here. A 4-bit 7B/8B base fits one GPU: use data parallel "
                       "(recipes/accelerate/multi_gpu.yaml), or set model.quantization=none for FSDP")
    if world < 2:
        raise SpaError("FSDP needs several processes: launch with `accelerate launch --config_file "
                       "recipes/accelerate/fsdp.yaml` or `torchrun --nproc_per_node N`")
    from torch.distributed.device_mesh import init_device_mesh

    if reshard_after_forward is None:
        reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("0", "false")
    device = next(base.parameters()).device
    mesh = init_device_mesh(device.type, (world,))
    fully_shard = fully_shard_fn()
    classes = _layer_classes(base)
    units = 0
    for module in list(base.modules()):
        if type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
            units += 1
    if units == 0:
        raise SpaError(f"FSDP: no module of class {sorted(classes)} in {type(base).__name__}")
    fully_shard(base, mesh=mesh, reshard_after_forward=reshard_after_forward)
    stack.sharded = True
    return units + 1


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded DTensor; a collective for DTensors: call on every process."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def copy_full_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Load a whole tensor into a parameter that may be a sharded DTensor (every process passes the same value)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value.to(param.device))
