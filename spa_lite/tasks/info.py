"""`spa-lite recipes | recipes copy | report`: the shipped recipes, and the report of a run."""

from __future__ import annotations

from pathlib import Path

from spa_lite.config import copy_recipe, shipped_recipes
from spa_lite.recipe_files import listing_line
from spa_lite.report import write_report
from spa_lite.ui import console


def list_recipes() -> None:
    """One line per shipped recipe: its name and description."""
    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        print(f"{name:<{width}}  {listing_line(name, path)}")


def copy_shipped_recipe(name: str, dest: Path | None, force: bool) -> Path:
    path = copy_recipe(name, dest, force)
    print(f"wrote {path}")
    return path


def report(run: Path, out: Path | None) -> Path:
    path = write_report(run, out)
    console.print(f"report: {path}")
    return path
