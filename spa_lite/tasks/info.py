"""`spa-lite recipes | recipes copy | report | doctor`: what is shipped, what a run holds, what this machine runs."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from spa_lite.config import copy_recipe, recipe_description, shipped_recipes
from spa_lite.doctor import checks
from spa_lite.report import write_report
from spa_lite.ui import console


def list_recipes() -> None:
    """One line per shipped recipe: its name and description."""
    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")


def copy_shipped_recipe(name: str, dest: Path | None, force: bool) -> Path:
    path = copy_recipe(name, dest, force)
    print(f"wrote {path}")
    return path


def report(run: Path, out: Path | None) -> Path:
    path = write_report(run, out)
    console.print(f"report: {path}")
    return path


def doctor(run_dir: str | None) -> None:
    t = Table(title="spa-lite doctor")
    for c in ("item", "status", "detail"):
        t.add_column(c)
    colors = {"ok": "green", "warn": "yellow", "missing": "red"}
    for item, status, detail in checks(run_dir or "runs"):
        t.add_row(item, f"[{colors[status]}]{status}[/]", detail)
    console.print(t)
