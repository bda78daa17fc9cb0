"""The policy to decode with: a working copy of the base with the active LoRA adapters merged in, optionally
rounded to a reduced precision (``expand.sample_dtype``), kept on the model while its adapters are unchanged.

Split from ``spa_lite.generation``, where the decoding loop lives; import these names from here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

import spa_lite.compat as compat


def _is_plain_lora_linear(mod) -> bool:
    """A peft LoRA Linear over an ordinary nn.Linear, with no variant (DoRA) or bias among its adapters."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(mod, LoraLinear) or type(mod.get_base_layer()) is not torch.nn.Linear:
        return False
    return not getattr(mod, "lora_variant", None) and not any(getattr(mod, "lora_bias", {}).values())


def _can_merge(model) -> bool:
    from peft.tuners.lora import LoraLayer

    if not compat.module_tree_supported():  # the copy is built on nn.Module internals (spa_lite.compat)
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(_is_plain_lora_linear(m) for m in layers)


def _active_lora_state(model) -> tuple:
    """What a merged copy depends on: each LoRA layer's active adapters and their weights' identity and version."""
    from peft.tuners.lora import LoraLayer

    key = []
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            active = () if mod.disable_adapters else tuple(a for a in mod.active_adapters if a in mod.lora_A)
            key.append(active)
            for a in active:
                for w in (mod.lora_A[a].weight, mod.lora_B[a].weight):
                    key.append((w.data_ptr(), compat.tensor_version(w)))
            key.append(tuple(mod.scaling.get(a) for a in active))
    return tuple(key)


def _cast_params(work: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every module of the cloned tree ``work`` its own floating-point parameters in ``dtype``.

    The tree's modules share their ``_parameters`` dicts with the original (``compat.clone_module_tree``), so each dict is
    replaced, never mutated; a parameter used twice (tied embeddings and LM head) is converted once and stays
    tied. Buffers (rotary frequencies) keep their dtype: the model computes positions from them in float32.
    """
    seen: dict[int, torch.nn.Parameter] = {}
    for mod in work.modules():
        new = {}
        for k, p in compat.own_parameters(mod).items():
            if p is None or not p.is_floating_point() or p.dtype == dtype:
                new[k] = p
                continue
            if id(p) not in seen:
                seen[id(p)] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            new[k] = seen[id(p)]
        compat.replace_parameters(mod, new)


@torch.no_grad()
def merged_copy(model, dtype: torch.dtype | None = None):
    """A plain transformers model computing what the peft ``model`` computes with its active adapters.

    Every LoRA-wrapped linear layer of the copy holds W + sum_a scaling_a B_a A_a over the active adapters
    (W alone where adapters are disabled); every other tensor (embeddings, norms, rotary buffers, the
    linear layers no adapter targets) is shared with ``model``, not copied. The base is not modified.
    ``dtype`` (e.g. bfloat16 for sampling on a CPU with bf16 matrix units): the copy's weights in that dtype
    (merged in the model's own dtype first, then rounded once); then no parameter is shared.
    Returns None where merging does not apply (no LoRA layers, quantized or non-Linear bases, DoRA).
    """
    if not _can_merge(model):
        return None
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    work = compat.clone_module_tree(inner)
    for name, mod in list(work.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        lin = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        weight = base.weight
        active = [] if mod.disable_adapters else [a for a in mod.active_adapters if a in mod.lora_A]
        if active:
            weight = weight.detach().clone()
            for a in active:  # the same delta, in the same order, that peft's merge adds
                weight += mod.get_delta_weight(a).to(weight.dtype)
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            lin.bias = base.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, attr, lin)
    if dtype is not None:
        _cast_params(work, dtype)
    work.eval()
    return work


@contextlib.contextmanager
def sampling_model(model, merge: bool = True, dtype: torch.dtype | None = None) -> Iterator[object]:
    """The model to decode with: ``merged_copy(model, dtype)`` when possible (and ``merge``), else ``model`` itself.

    The merged copy of the last policy is kept on ``model`` (one slot) and reused while the active adapters and
    their weights are unchanged (checked by tensor identity and version), so a stage that samples shard after
    shard from one frozen policy merges once. ``release_sampling_copy(model)`` drops it.
    """
    if not merge or not _can_merge(model):
        yield model
        return
    key = (_active_lora_state(model), dtype)
    slot = getattr(model, "_spa_sampling_copy", None)
    if slot is None or slot[0] != key:
        release_sampling_copy(model)
        slot = (key, merged_copy(model, dtype))
        object.__setattr__(model, "_spa_sampling_copy", slot)  # not a submodule: no parameters registered
    yield slot[1]


def release_sampling_copy(model) -> None:
    """Drop the merged working copy ``sampling_model`` keeps on ``model`` (its merged weights' memory)."""
    if getattr(model, "_spa_sampling_copy", None) is not None:
        object.__setattr__(model, "_spa_sampling_copy", None)


SAMPLE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fast_bf16_cpu() -> bool:
    """True where this CPU multiplies bfloat16 matrices in hardware (AMX tiles and AVX512-BF16, oneDNN)."""
    return compat.cpu_has_amx_bf16()


def resolve_sample_dtype(setting: str, device_type: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype to decode in for ``expand.sample_dtype`` on a model computing in ``model_dtype`` on
    ``device_type`` (None: the model's own).

    "auto" is bfloat16 for a float32 model on a CPU with bf16 matrix units (decoding is 2-3x faster there:
    bench/RESULTS.md, generation), else the model's own dtype; "model" is always the model's own.
    """
    if setting == "model":
        return None
    if setting == "auto":
        fast = device_type == "cpu" and model_dtype == torch.float32 and fast_bf16_cpu()
        return torch.bfloat16 if fast else None
    if setting not in SAMPLE_DTYPES:
        raise ValueError(f"sample dtype '{setting}' is not auto, model or one of {', '.join(SAMPLE_DTYPES)}")
    dt = SAMPLE_DTYPES[setting]
    return None if dt == model_dtype else dt


def dtype_name(dtype: torch.dtype | None) -> str:
    """How manifests name a sampling dtype: "bfloat16", ... or "model" (None: the model's own)."""
    return "model" if dtype is None else str(dtype).removeprefix("torch.")


def sampling_dtype(setting: str, model) -> torch.dtype | None:
    """``resolve_sample_dtype`` for a loaded model (its first parameter's device and dtype)."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    return resolve_sample_dtype(setting, param.device.type, param.dtype)
