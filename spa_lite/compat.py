"""Every place spa-lite reaches into another library's internals, with the versions it was checked against.

Each patch below names the package whose internals it touches and the release range it was tested with
(``TESTED``). Outside that range spa-lite does not risk the patch: it takes a fallback on public APIs, slower
but correct (or, where no public path computes the same, refuses with the setting to change), and says so once
in the log. ``SPA_LITE_TRUST_INTERNALS=1`` applies the patches anyway (for
trying a new release before this table is updated).

  patch              package        what it touches                                 fallback
  kv_cache_in_place  transformers   DynamicLayer's class swapped, its keys/values   the `hf` engine
                                    written into buffers, rows stacked and columns  (transformers `generate`)
                                    dropped (fast decoding engine)
  cache_argument     transformers   the name model.forward takes and returns the    (same as kv_cache_in_place)
                                    KV cache under (signature sniffed)
  module_tree        torch          nn.Module._modules / _parameters, Tensor        no merged copy: decode with
                                    ._version (merged sampling copy)                the peft model itself
  cpu_bf16_probe     torch          torch.cpu._is_amx_tile_supported / _avx512_bf16 "no fast bf16": float32
  bnb_cpu_probe      bitsandbytes   bitsandbytes.functional.has_avx512bf16          doctor's row says "unknown"
  bnb_cpu_repack     bitsandbytes   Linear4bit.support_avx512bf16_for_cpu set False a 4-bit base on the CPU is
                                    (a 4-bit base trains on the CPU)                refused: quantization none
  no_split_modules   transformers   PreTrainedModel._no_split_modules read (the     FSDP refused with the setting
                                    decoder-layer classes FSDP shards by; only a    to change (model.fsdp off);
                                    read, so not version-gated)                     see decoder_layer_classes
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import inspect
import logging
import os
import re

import torch
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)

# (first, last) tested release, as (major, minor); a patch applies where its package's version is inside
TESTED: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "torch": ((2, 13), (2, 13)),
    "transformers": ((5, 24), (5, 25)),
    "peft": ((0, 21), (0, 21)),
    "bitsandbytes": ((0, 50), (0, 50)),
}
PATCHES = {"kv_cache_in_place": "transformers", "cache_argument": "transformers", "module_tree": "torch",
           "cpu_bf16_probe": "torch", "bnb_cpu_probe": "bitsandbytes", "bnb_cpu_repack": "bitsandbytes"}
_warned: set[str] = set()


@functools.lru_cache(maxsize=None)  # a metadata lookup scans site-packages; versions do not change in a process
def installed(package: str) -> tuple[int, int] | None:
    """(major, minor) of an installed package, None where it is not installed or its version is unreadable."""
    try:
        m = re.match(r"(\d+)\.(\d+)", md.version(package))
    except md.PackageNotFoundError:
        return None
    return (int(m.group(1)), int(m.group(2))) if m else None


def supported(patch: str) -> bool:
    """Whether ``patch`` (a key of PATCHES) applies: its package is inside the tested range, or the user said
    ``SPA_LITE_TRUST_INTERNALS=1``. Logs the fallback once per patch."""
    pkg = PATCHES[patch]
    v = installed(pkg)
    lo, hi = TESTED[pkg]
    ok = v is not None and lo <= v <= hi
    if not ok and os.environ.get("SPA_LITE_TRUST_INTERNALS") == "1":
        return True
    if not ok and patch not in _warned:
        _warned.add(patch)
        log.warning("spa-lite's %s patch was tested with %s %d.%d-%d.%d, not %s: using the public-API fallback "
                    "(SPA_LITE_TRUST_INTERNALS=1 applies it anyway)", patch, pkg, *lo, *hi,
                    "an unknown version" if v is None else f"{v[0]}.{v[1]}")
    return ok


def report() -> list[tuple[str, str, bool]]:
    """(patch, "package version", applies) for each patch: what ``spa-lite doctor`` can show."""
    rows = []
    for patch, pkg in PATCHES.items():
        v = installed(pkg)
        rows.append((patch, f"{pkg} {'-' if v is None else f'{v[0]}.{v[1]}'}", supported(patch)))
    return rows


# ------------------------------------------------------------------- transformers: the fast engine's KV cache

def fast_decoding_supported() -> bool:
    """The fast decoding engine's cache patches apply (else sampling goes through transformers' generate)."""
    return supported("kv_cache_in_place") and supported("cache_argument")


def cache_argument(model) -> str:
    """The keyword model.forward takes the KV cache by: transformers >= 5.2x names it ``cache``
    (``past_key_values`` still works there, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def grow_kv_in_place(cache, room: int) -> None:
    """Let every plain ``DynamicLayer`` of ``cache`` append a decoding step in place (``GrowingLayer``).

    A DynamicLayer appends by ``torch.cat`` (a copy of the whole cache per layer and step: 12% of a step's time
    on CPU, bench/RESULTS.md, generation). Here its class is swapped, so that its keys and values become the
    leading part of buffers with ``room`` spare positions. Only the fast engine calls this, and only where
    ``fast_decoding_supported()``.
    """
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
            layer.room = room


def output_cache(out):
    """The KV cache a forward returned: transformers >= 5.2x names it ``cache``, earlier ``past_key_values``."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


def append_cache_rows(cache, new, pad) -> None:
    """Stack the rows of the DynamicCache ``new`` below those of ``cache``, layer by layer; ``pad`` maps each
    layer's keys or values to the common (left-padded) length first. Writes every layer's keys and values."""
    for old, nw in zip(cache.layers, new.layers, strict=True):
        old.keys, old.values = (torch.cat([pad(a), pad(b)], 0)
                                for a, b in ((old.keys, nw.keys), (old.values, nw.values)))


def drop_cache_columns(cache, first: int) -> None:
    """Drop the first ``first`` positions of every layer of ``cache`` (padding in every row): views, no copy."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.drop_columns(first)
        else:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with room to append (``grow_kv_in_place``).

    ``update`` writes the new step into the room and only reallocates when it runs out or when the views were
    replaced (rows left the batch, columns were trimmed); the tensors the attention reads are the same values.
    """

    kbuf: torch.Tensor | None = None
    vbuf: torch.Tensor | None = None
    room: int = 16

    def _in_buffer(self, extra: int) -> bool:
        """The keys/values are still the leading part of the buffers, with room for ``extra`` more positions."""
        k, v, kb, vb = self.keys, self.values, self.kbuf, self.vbuf
        return (kb is not None and k.data_ptr() == kb.data_ptr() and v.data_ptr() == vb.data_ptr()
                and k.shape[:2] == kb.shape[:2] and k.stride() == kb.stride() and v.stride() == vb.stride()
                and k.shape[2] + extra <= kb.shape[2])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        n, q = self.keys.shape[2], key_states.shape[2]
        if not self._in_buffer(q):
            shape = (*self.keys.shape[:2], n + q + self.room, self.keys.shape[3])
            self.kbuf, self.vbuf = self.keys.new_empty(shape), self.values.new_empty(shape)
            self.kbuf[:, :, :n] = self.keys
            self.vbuf[:, :, :n] = self.values
        self.kbuf[:, :, n : n + q] = key_states
        self.vbuf[:, :, n : n + q] = value_states
        self.keys, self.values = self.kbuf[:, :, : n + q], self.vbuf[:, :, : n + q]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``: one copy of the buffers (room included), so the next step still appends in place."""
        if not self._in_buffer(0):
            return super().batch_select_indices(indices)
        n = self.keys.shape[2]
        self.kbuf, self.vbuf = self.kbuf[indices], self.vbuf[indices]
        self.keys, self.values = self.kbuf[:, :, :n], self.vbuf[:, :, :n]

    def drop_columns(self, first: int) -> None:
        """Drop the first ``first`` positions (padding in every row): views of the same buffers, no copy."""
        if not self._in_buffer(0):
            self.keys, self.values = self.keys[:, :, first:], self.values[:, :, first:]
            return
        n = self.keys.shape[2]
        self.kbuf, self.vbuf = self.kbuf[:, :, first:], self.vbuf[:, :, first:]
        self.keys, self.values = self.kbuf[:, :, : n - first], self.vbuf[:, :, : n - first]


# ------------------------------------------------------------------- torch: nn.Module internals

def module_tree_supported() -> bool:
    """The merged sampling copy's module-tree patches apply (else decoding uses the peft model itself)."""
    return supported("module_tree")


def clone_module_tree(mod: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree: new module objects, the very same parameter and buffer tensors."""
    import copy

    new = copy.copy(mod)  # a new instance whose __dict__ is a shallow copy: _parameters, _buffers shared
    new._modules = {k: None if v is None else clone_module_tree(v) for k, v in mod._modules.items()}
    return new


def replace_parameters(mod: torch.nn.Module, params: dict) -> None:
    """Give ``mod`` its own parameter dict (a cloned tree shares the original's; it must never be mutated)."""
    mod._parameters = params


def own_parameters(mod: torch.nn.Module) -> dict:
    """``mod``'s directly held parameters by name, None entries included (unlike named_parameters)."""
    return dict(mod._parameters)


def tensor_version(t: torch.Tensor) -> int:
    """torch's in-place modification counter of ``t`` (bumped by every in-place write, e.g. optimizer steps)."""
    return t._version


# ------------------------------------------------------------------- torch and bitsandbytes: CPU probes

def cpu_has_amx_bf16() -> bool:
    """True where this CPU multiplies bfloat16 matrices in hardware (AMX tiles and AVX512-BF16, oneDNN).

    torch exposes this only through private probes; outside the tested torch range (or without them) False,
    so decoding stays in the model's own precision."""
    cpu = getattr(torch, "cpu", None)
    if not supported("cpu_bf16_probe"):
        return False
    try:
        return bool(cpu._is_amx_tile_supported() and cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without the probes
        return False


def bnb_cpu_kernel_probe():
    """bitsandbytes' probe for the CPUs it fetches a faster 4-bit kernel for (``has_avx512bf16``), or None where
    this bitsandbytes has none or is outside the tested range."""
    if not supported("bnb_cpu_probe"):
        return None
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:  # older releases have no probe; a broken native library raises many kinds of errors
        return None
    return has_avx512bf16


# ------------------------------------------------------------------- bitsandbytes: 4-bit layers on the CPU

def bnb_cpu_training_supported() -> bool:
    """``keep_bnb_cpu_differentiable`` applies: else a 4-bit base on the CPU is refused (``spa_lite.models``)."""
    return supported("bnb_cpu_repack")


def keep_bnb_cpu_differentiable(model) -> None:
    """Keep the autograd path of every bitsandbytes ``Linear4bit`` of ``model`` on the CPU.

    bitsandbytes repacks a Linear4bit's weight for its AVX512-BF16 CPU kernel on the first eval-mode, no-grad
    forward (a reference pass), and that kernel has no autograd: later training forwards would then silently
    drop the gradient through the base layers. The layer's ``support_avx512bf16_for_cpu`` flag (bitsandbytes
    0.50) switches the repacking off. Only where ``bnb_cpu_training_supported()``: under another release the
    flag could be renamed and this a silent no-op, so a 4-bit CPU base is refused there instead.
    """
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------- transformers: decoder-layer classes
def decoder_layer_classes(model) -> set[str]:
    """The class names transformers marks as not to be split across devices (``_no_split_modules``): the decoder
    layers, which FSDP shards one unit each. Empty where the model names none (the caller refuses)."""
    return set(getattr(model, "_no_split_modules", None) or [])
