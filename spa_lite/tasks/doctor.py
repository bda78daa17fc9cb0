"""`spa-lite doctor`: what this machine can run, as a table."""

from __future__ import annotations

from rich.table import Table

from spa_lite.doctor import checks
from spa_lite.ui import console


def doctor(run_dir: str | None) -> None:
    t = Table(title="spa-lite doctor")
    for c in ("item", "status", "detail"):
        t.add_column(c)
    colors = {"ok": "green", "warn": "yellow", "missing": "red"}
    for item, status, detail in checks(run_dir or "runs"):
        t.add_row(item, f"[{colors[status]}]{status}[/]", detail)
    console.print(t)
