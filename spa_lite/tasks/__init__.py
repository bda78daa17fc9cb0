"""What each `spa-lite` command does once its options are parsed: one function per command.

``spa_lite.cli`` parses and calls one function here; these call the stages (``spa_lite.stages``) and the
library, and print the results. This package is light to import (no torch): the submodules import what
they need at their top, and ``tasks.<submodule>`` imports a submodule on first use (the command that runs).

    tasks.stages      seed-dpo, expand, train, run, eval, split
    tasks.winrate     winrate
    tasks.answers     export-answers
    tasks.export      export
    tasks.plan        plan
    tasks.info        recipes, recipes copy, report
    tasks.doctor      doctor
    tasks.labels      inspect, audit import
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import shlex
import sys
import traceback
import warnings
from dataclasses import dataclass, field

import click
import typer
from rich.markup import escape

from spa_lite.config import Recipe, load_recipe, parse_override
from spa_lite.errors import SpaError, expected_failure
from spa_lite.ui import console

__all__ = ["RecipeArgs", "setup_logging", "user_errors"]

_SUBMODULES = ("stages", "winrate", "answers", "export", "plan", "info", "doctor", "labels")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class RecipeArgs:
    """The recipe options every command shares, as given on the command line.

    Args:
        recipe: a YAML path or a shipped recipe name.
        sets: ``section.key=value`` overrides (``--set``), in order.
        name, run_dir: ``--name`` and ``--run-dir`` (None: the recipe's).
        shorthands: ``section.key`` -> value of a command's dedicated flags (``--loss``, ``--judge-ref``, ...);
            None means the flag was not given.
    """

    recipe: str
    sets: list[str] | None = None
    name: str | None = None
    run_dir: str | None = None
    shorthands: dict = field(default_factory=dict)

    def load(self) -> Recipe:
        """The recipe with ``--set`` overrides, then the shorthands, then ``--name`` and ``--run-dir`` applied."""
        overrides = {}
        for text in self.sets or []:
            keys, value = parse_override(text)
            overrides[".".join(keys)] = value
        overrides.update({k: v for k, v in self.shorthands.items() if v is not None})
        overrides.update({k: v for k, v in (("name", self.name), ("run_dir", self.run_dir)) if v})
        recipe = load_recipe(self.recipe, overrides)
        recipe.rerun_args = self.shell()  # every rerun command an error suggests repeats these options
        return recipe

    def shell(self) -> str:
        """These options as a shell fragment (``report_to`` left out), for the commands an error message suggests."""
        parts = [self.recipe]
        if self.name:
            parts += ["--name", self.name]
        if self.run_dir:
            parts += ["--run-dir", self.run_dir]
        for s in self.sets or []:
            parts += ["--set", s]
        for k, v in self.shorthands.items():
            if v is not None and k != "report_to":
                parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        return " ".join(shlex.quote(p) for p in parts)


def setup_logging() -> None:
    """Log level from ``SPA_LITE_LOG`` (default WARNING); the libraries' chatter and progress bars off."""
    logging.basicConfig(level=os.environ.get("SPA_LITE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # datasets logs a damaged Parquet file as ERROR lines before it raises; spa-lite reports that error once
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft reads transformers' deprecated `is_gradient_checkpointing` alias: nothing a spa-lite user can act on
    # (the tests still show it). Every other warning stays visible.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging  # seconds to import: only for commands that run
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; spa-lite shows its own progress


def user_errors(fn):
    """The one error boundary of every command. Expected failures (bad input, stage order, I/O, permissions, a
    full disk, decoding, hub access) print one red line and exit with code 2; anything else is a bug: its
    traceback is printed, then one line that says so, and the exit code is 1. (Each stage releases its own lock
    when it ends, however it ends: ``spa_lite.runs.stage_run``.)
    """

    def line(text: str, code: int):
        console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(code=code) from None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except SpaError as e:
            line(str(e), 2)
        except KeyboardInterrupt as e:
            console.print(f"[yellow]interrupted[/] ({escape(str(e)) or 'Ctrl-C'}); rerun the same command to resume")
            raise typer.Exit(code=130) from None
        except Exception as e:  # noqa: BLE001 - the boundary: every exception ends here, named or with its traceback
            msg = expected_failure(e)
            if msg is not None:
                line(msg, 2)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            line(f"unexpected {type(e).__name__} (a bug in spa-lite or a library, not in your input): {e}; "
                 f"the traceback above shows where", 1)

    return wrapper
