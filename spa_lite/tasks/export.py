"""`spa-lite export`: pi_i as a merged full model with a model card, or as one exact LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from spa_lite.errors import SpaError
from spa_lite.layout import complete_policies, policy_label
from spa_lite.merge import export_merged, export_single_adapter
from spa_lite.tasks import RecipeArgs, setup_logging
from spa_lite.ui import console, task

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def run_export(args: RecipeArgs, iteration: int, out: Path, *, merged: bool, dtype: str) -> Path:
    setup_logging()
    r = args.load()
    label = policy_label(iteration)
    if iteration not in complete_policies(r):
        raise SpaError(f"{label} is not complete in {r.run_path}; run its stages first")
    with task(f"export {label} ({'merged' if merged else 'adapter'})", 1, info=str(out)) as advance:
        if merged:
            if dtype not in DTYPES:
                raise SpaError(f"--dtype '{dtype}' is not bfloat16, float16 or float32")
            path = export_merged(r, iteration, out, dtype=DTYPES[dtype])
        else:
            path = export_single_adapter(r, iteration, out)
        advance()
    console.print(f"exported {label} to {path}")
    return path
