"""Terminal output: progress bars with ETA and end-of-stage summary tables (rich).

``progress()`` shows rich's live bar (with elapsed time and ETA) in a terminal and in a Jupyter/Colab
notebook. Where neither is attached (output redirected to a log file, a batch job), a live bar would either
stay invisible or fill the log with redraws, so the same calls write plain log lines instead: one when a task
starts, one at each further 10% of its total (with elapsed time and ETA), and one when it ends.
``SPA_LITE_QUIET=1`` silences both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogProgress:
    """The part of rich's ``Progress`` API the stages use, written as log lines (non-interactive output)."""

    def __init__(self, stream=None, step: float = 0.1) -> None:
        self.stream = stream
        self.step = step
        self.tasks: dict[int, dict] = {}

    def _write(self, line: str) -> None:
        stream = self.stream or sys.stderr
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=stream, flush=True)

    def add_task(self, description: str, total: float | None = None, info: str = "", **_) -> int:
        tid = len(self.tasks)
        self.tasks[tid] = {"desc": description, "total": total, "done": 0.0, "info": info, "t0": time.time(),
                           "next": self.step, "finished": False}
        extra = f" ({info})" if info else ""
        self._write(f"{description}: start, {total if total is not None else '?'} to do{extra}")
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, completed=self.tasks[task_id]["done"] + advance)

    def update(self, task_id: int, completed: float | None = None, advance: float | None = None,
               info: str | None = None, total: float | None = None, **_) -> None:
        t = self.tasks[task_id]
        if total is not None:
            t["total"] = total
        if info is not None:
            t["info"] = info
        if advance is not None:
            t["done"] += advance
        if completed is not None:
            t["done"] = completed
        total_ = t["total"]
        if not total_ or t["finished"]:
            return
        frac = t["done"] / total_
        elapsed = time.time() - t["t0"]
        if frac >= 1.0:
            t["finished"] = True
            extra = f", {t['info']}" if t["info"] else ""
            self._write(f"{t['desc']}: done, {t['done']:g}/{total_:g} in {_hms(elapsed)}{extra}")
        elif frac >= t["next"]:
            while t["next"] <= frac:
                t["next"] += self.step
            eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
            extra = f", {t['info']}" if t["info"] else ""
            self._write(f"{t['desc']}: {t['done']:g}/{total_:g} ({frac:.0%}), elapsed {_hms(elapsed)}, "
                        f"eta {_hms(eta)}{extra}")

    def close(self) -> None:
        for t in self.tasks.values():  # tasks that ended short of their total (a stop_after, an error)
            if t["total"] and not t["finished"]:
                t["finished"] = True
                self._write(f"{t['desc']}: stopped at {t['done']:g}/{t['total']:g} after {_hms(time.time() - t['t0'])}")


def interactive(con: Console | None = None) -> bool:
    """A live bar can be drawn: a terminal, or a Jupyter/Colab notebook (rich renders it as a widget)."""
    con = con or console
    return bool(con.is_terminal or con.is_jupyter)


@contextlib.contextmanager
def progress(enabled: bool = True) -> Iterator[Progress | LogProgress]:
    """Progress bars for one stage: rich's live bar when ``interactive()``, else log lines (``LogProgress``)."""
    quiet = bool(os.environ.get("SPA_LITE_QUIET")) or not enabled
    if not quiet and not interactive():
        lp = LogProgress()
        try:
            yield lp
        finally:
            lp.close()
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, disable=quiet,
    ) as p:
        yield p


@contextlib.contextmanager
def task(description: str, total: float | None, info: str = "", enabled: bool = True) -> Iterator:
    """One progress task; yields ``advance(n=1)``, e.g. as a sampler's or judge's ``on_batch`` callback."""
    with progress(enabled) as p:
        tid = p.add_task(description, total=total, info=info)
        yield lambda n=1: p.advance(tid, n)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_table(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    for k, v in rows.items():
        table.add_row(k, _fmt(v))
    Console().print(table)
