"""Embedded demo data: a verifiable instruction-following task shipped inside the package.

Files under ``spa_lite/demo/data`` (rebuilt by ``python -m spa_lite.demo.build``):

- ``seed_pairs.jsonl``   seed preference pairs (verifier-labelled samples of the bundled model)
- ``gold_pool.jsonl``    the same 150 pairs, then more of the same kind from the same questions (512 in all:
                         gold sizes past 150; ``python -m spa_lite.demo.build --gold-pool 512``). Recipes shuffle
                         the whole file before taking the first ``data.seed_limit`` pairs, so a gold set drawn from
                         it differs from one drawn from ``seed_pairs.jsonl`` even at 150 pairs or fewer
- ``prompts.jsonl``      iteration prompt pool (prompts and constraints only, no responses or labels)
- ``eval_prompts.jsonl`` held-out prompts
- ``eval_pairs.jsonl``   held-out gold pairs
- ``build_info.json``    how they were built

Configs refer to them as ``demo:seed_pairs``, ``demo:prompts``, ... ; see :func:`demo_path`.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["DATA_DIR", "DEMO_FILES", "demo_path", "is_demo_ref"]

#: Folder holding the shipped demo files.
DATA_DIR: Path = Path(str(importlib.resources.files(__name__).joinpath("data")))

#: Short names accepted by :func:`demo_path` and their file names.
DEMO_FILES = {
    "seed_pairs": "seed_pairs.jsonl",
    "gold_pool": "gold_pool.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "eval_pairs": "eval_pairs.jsonl",
    "build_info": "build_info.json",
}


def is_demo_ref(value: object) -> bool:
    """True for strings of the form ``demo:NAME``."""
    return isinstance(value, str) and value.startswith("demo:")


def demo_path(name: str) -> Path:
    """Path of a shipped demo file.

    ``name`` may be a short name (``"seed_pairs"``), a reference (``"demo:seed_pairs"``) or a file name
    (``"seed_pairs.jsonl"``).

    Raises:
        FileNotFoundError: the name is unknown or the file is not in the installed package.
    """
    key = name[len("demo:"):] if is_demo_ref(name) else name
    filename = DEMO_FILES.get(key)
    if filename is None:
        if key in DEMO_FILES.values():
            filename = key
        else:
            raise FileNotFoundError(
                f"unknown demo file {name!r}; known: {', '.join('demo:' + k for k in DEMO_FILES)}"
            )
    path = DATA_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"demo file {filename!r} is missing from {DATA_DIR}; the installed package lacks its demo data "
            f"(rebuild it with: python -m spa_lite.demo.build --out {DATA_DIR})"
        )
    return path
