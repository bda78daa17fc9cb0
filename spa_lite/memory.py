"""Process memory: peak resident memory per stage, and handing freed memory back to the operating system.

Linux keeps a process's peak resident set (VmHWM in /proc/self/status) and lets the process reset it
(writing 5 to /proc/self/clear_refs), so each stage can report its own peak even when several stages run in
one process (``spa-lite run``). glibc keeps freed heap memory in its arenas instead of unmapping it; after a
stage's model is dropped, ``release_memory`` collects cyclic garbage (peft models hold reference cycles, so
they are not freed when the last name goes) and asks glibc to return free pages (``malloc_trim``).

How glibc's heap is tuned is the recipe's explicit choice, ``memory.malloc`` (or ``SPA_LITE_MALLOC``), applied
by ``apply_malloc`` when a stage or task sets up torch: ``tuned`` fixes the mmap threshold
(``fix_mmap_threshold``) and trims the heap after every optimizer step; ``glibc`` leaves glibc's heap as it is. CUDA runs
are never tuned: their tensors are not on this heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_gb() -> float | None:
    """Current resident memory of this process in GB (Linux), else None."""
    kb = _status_kb("VmRSS")
    return None if kb is None else round(kb / 1e6, 3)


def peak_rss_gb() -> float | None:
    """Peak resident memory in GB since the process started or since the last ``reset_peak``."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: the lifetime peak (ru_maxrss is KiB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kb = peak / 1024 if sys.platform == "darwin" else peak
    return round(kb / 1e6, 3)


def reset_peak() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers (glibc malloc.h)
MMAP_THRESHOLD = 64 << 10
_tuned: int | None = None  # the threshold this process set


def _libc():
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every heap block of ``threshold`` bytes or more by its own mmap, for the rest of the process.

    glibc raises its mmap threshold after each large free (up to 32 MiB): from then on, tensors of several
    MiB (activations, logit chunks, gradients) come from the heap arenas, which fragment and keep their peak.
    A CPU training stage of the quick start then peaked at 3.1 GB resident against 1.4 GB with a fixed 64 KiB
    threshold. The price is page faults: every large tensor is a fresh mapping, and the same stage took 1.7x the
    time (168-177 s vs 99-105 s with glibc's default plus ``trim_heap``, which peaked at 2.65-2.70 GB; a 4 MiB
    threshold: 2.47 GB, 122 s; bench/RESULTS.md, malloc). Setting the threshold turns glibc's adjustment off;
    blocks at or above it go back to the OS when freed; ``trim_heap`` returns what smaller blocks leave free.
    A threshold the user set (``MALLOC_MMAP_THRESHOLD_``) is left alone, and ``SPA_LITE_GLIBC_MALLOC=1`` keeps
    glibc's own (faster, larger) behaviour.
    Returns whether it was set (False off glibc/Linux).
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or os.environ.get("SPA_LITE_GLIBC_MALLOC") == "1":
        return False
    global _tuned
    if _tuned == threshold:
        return True
    libc = _libc()
    try:
        ok = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except AttributeError:  # not glibc
        return False
    if ok:
        _tuned = threshold
    return ok


MALLOC_MODES = ("auto", "tuned", "glibc")
_policy: dict = {"mode": "glibc", "why": "not applied yet (no stage or task has set up torch)"}


def resolve_malloc(setting: str, device_type: str) -> tuple[str, str]:
    """(mode, why): the heap policy a process on ``device_type`` gets for ``memory.malloc: setting``.

    ``SPA_LITE_MALLOC`` (auto|tuned|glibc) overrides the recipe, ``SPA_LITE_GLIBC_MALLOC=1`` means glibc, and a
    ``MALLOC_MMAP_THRESHOLD_`` the user exported is left to glibc (glibc).
    """
    env = os.environ.get("SPA_LITE_MALLOC")
    if env is not None and env not in MALLOC_MODES:
        raise ValueError(f"SPA_LITE_MALLOC='{env}' is not one of {', '.join(MALLOC_MODES)}")
    if os.environ.get("SPA_LITE_GLIBC_MALLOC") == "1":
        return "glibc", "SPA_LITE_GLIBC_MALLOC=1"
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return "glibc", "MALLOC_MMAP_THRESHOLD_ set by the user: glibc applies it"
    mode, source = (env, "SPA_LITE_MALLOC") if env else (setting, "memory.malloc")
    if device_type == "cuda":
        return "glibc", f"{source}={mode}, on CUDA: the model's tensors are not on glibc's heap"
    if mode == "auto":
        return "tuned", f"{source}=auto on CPU"
    return mode, f"{source}={mode}"


def apply_malloc(setting: str, threshold_kib: int, device_type: str) -> dict:
    """Apply ``memory.malloc`` for this process (see ``resolve_malloc``); returns what applies, for doctor.

    glibc cannot go back to its dynamic threshold once one is fixed, so a later ``glibc`` in the same process
    only stops the per-step trim.
    """
    mode, why = resolve_malloc(setting, device_type)
    if mode == "tuned" and not fix_mmap_threshold(threshold_kib << 10):
        mode, why = "glibc", why + "; not glibc on Linux"
    _policy.update(mode=mode, why=why, mmap_threshold_kib=threshold_kib if mode == "tuned" else None)
    return dict(_policy)


def malloc_policy() -> dict:
    """The heap policy this process applied last: mode (tuned|glibc), why, mmap_threshold_kib."""
    return dict(_policy)


def trim_after_step() -> bool:
    """Trim the heap after an optimizer step where the tuned policy applies (else a no-op, returns False)."""
    return _policy["mode"] == "tuned" and trim_heap()


def trim_heap() -> bool:
    """Hand the heap arenas' free pages back to the OS (``malloc_trim``); training calls it after each step."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:  # not glibc (musl has no malloc_trim)
        return False


def release_memory() -> dict:
    """Free what no one references any more and give it back to the OS. Returns RSS before and after (GB)."""
    before = rss_gb()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    trimmed = trim_heap()
    return {"rss_before_gb": before, "rss_after_gb": rss_gb(), "malloc_trim": trimmed}


class StagePeak:
    """Peak RSS of one stage: started by ``begin`` (which resets the kernel's high-water mark), read by ``read``.

    Where the mark cannot be reset, the reported peak is the process's peak so far (``peak_is_stage`` False).
    """

    def __init__(self) -> None:
        self.reset = reset_peak()
        self.start_rss = rss_gb()

    def read(self) -> dict:
        return {"peak_rss_gb": peak_rss_gb(), "start_rss_gb": self.start_rss, "end_rss_gb": rss_gb(),
                "peak_is_stage": self.reset, "malloc": _policy["mode"]}  # the heap policy the peak was made under
