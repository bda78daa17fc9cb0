"""spa-lite: Spread Preference Annotation (Kim et al., ICLR 2025) on one GPU, with one copy of the base weights.

The Python API (``spa_lite.api``) is re-exported here: ``spa_lite.load_recipe``, ``spa_lite.run``,
``spa_lite.open_run``, ... ; importing ``spa_lite`` stays light (torch loads on first use).
"""

import logging as _logging

__version__ = "0.1.0"

__all__ = ["load_recipe", "run", "run_stage", "evaluate", "open_run", "Run", "Policy", "list_recipes", "copy_recipe",
           "resolve_policy", "plan", "size_for_gpu", "inspect_html", "policy_win_rate", "export_answers", "split",
           "export_policy", "write_report"]


class _DropBnbKernelNotice(_logging.Filter):
    """bitsandbytes (>= 0.49) on an AVX512-BF16 CPU asks the `kernels` package (a dependency of transformers 5)
    for a faster 4-bit CPU kernel on every import. Offline, `kernels` logs "Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes' ..." and bitsandbytes then "Failed to load CPU
    gemm_4bit_forward from kernels-community"; neither library reads a setting that turns the attempt off, so
    spa-lite drops these two lines (only these: other repositories' trust notices stay) and `spa-lite doctor`
    says once whether the kernel loaded."""

    PREFIXES = ("Failed to load CPU gemm_4bit_forward from kernels-community",
                "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'")

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).addFilter(_DropBnbKernelNotice())


def __getattr__(name: str):
    if name in __all__:
        from spa_lite import api

        return getattr(api, name)
    raise AttributeError(f"module 'spa_lite' has no attribute {name!r}")
