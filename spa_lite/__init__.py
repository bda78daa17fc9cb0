"""spa-lite: Spread Preference Annotation (Kim et al., ICLR 2025) on one GPU, with one copy of the base weights.

The Python API (``spa_lite.api``) is re-exported here: ``spa_lite.load_recipe``, ``spa_lite.run``,
``spa_lite.open_run``, ... ; importing ``spa_lite`` stays light (torch loads on first use).
"""

import logging as _logging

__version__ = "0.1.0"

__all__ = ["load_recipe", "run", "run_stage", "evaluate", "open_run", "Run", "Policy", "list_recipes", "copy_recipe",
           "resolve_policy", "plan", "size_for_gpu", "inspect_html"]


class _DropBnbKernelNotice(_logging.Filter):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every import on an
    AVX512-BF16 CPU without the optional `kernels` package; `spa-lite doctor` explains it once instead."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropBnbKernelNotice())


def __getattr__(name: str):
    if name in __all__:
        from spa_lite import api

        return getattr(api, name)
    raise AttributeError(f"module 'spa_lite' has no attribute {name!r}")
