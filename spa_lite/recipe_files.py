"""The shipped recipes: the folder they live in (checkout or wheel), their names, descriptions and copies."""

from __future__ import annotations

import re
from pathlib import Path

from spa_lite.errors import SpaError
from spa_lite.io import atomic_write_text

__all__ = ["recipes_dir", "shipped_recipes", "recipe_description", "resolve_recipe_path", "copy_recipe"]


def recipes_dir() -> Path:
    """The folder of shipped recipes: ``spa_lite/recipes`` in an installed wheel (pyproject maps the top-level
    ``recipes/`` folder there), the checkout's ``recipes/`` when spa-lite runs from its source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise SpaError(f"no shipped recipes found next to {here} (a broken install: reinstall spa-lite)")


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every shipped recipe: ``smollm2-demo``, ..., and ``accelerate/fsdp`` for launcher configs."""
    root = recipes_dir()
    paths = sorted(root.rglob("*.yaml"), key=lambda p: (len(p.relative_to(root).parts), p.as_posix()))  # recipes first
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in paths}


def recipe_description(path: Path) -> str:
    """The first comment line of a recipe file (its one-line description), without the '#'."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def listing_line(name: str, path: Path) -> str:
    """A recipe's line in `spa-lite recipes`: its description, where an accelerate config's is its launch command
    as a checkout runs it (``cli.py``, ``recipes/...`` paths), rewritten to one that works wherever spa-lite is
    installed: copy the config out, then launch the installed module."""
    text = recipe_description(path)
    if not text.startswith("accelerate launch"):
        return text
    cmd = text.replace(f"--config_file recipes/{name}.yaml", f"--config_file {path.name}")
    cmd = re.sub(r"(?<!\S)cli\.py(?!\S)", "-m spa_lite.cli", cmd)
    cmd = re.sub(r"--recipe recipes/([\w.-]+)\.yaml", r"--recipe \1", cmd)
    return f"spa-lite recipes copy {name}, then: {cmd}"


def resolve_recipe_path(path: str | Path) -> Path:
    """A file path, or the name of a shipped recipe (``smollm2-demo``, ``smollm2-demo.yaml``)."""
    p = Path(path)
    if p.exists():
        return p
    # "recipes/zephyr-7b-qlora.yaml" as the README writes it also works outside a checkout
    name = p.as_posix().removesuffix(".yaml").removeprefix("recipes/")
    try:
        found = shipped_recipes().get(name)
    except SpaError:
        found = None
    if found is not None:
        return found
    try:
        names = ", ".join(n for n in shipped_recipes() if "/" not in n)
    except SpaError:
        names = "none found"
    raise SpaError(f"recipe '{path}' not found: give a YAML path or a shipped recipe name ({names}; "
                   "`spa-lite recipes` lists them)")


def copy_recipe(name: str, dest: str | Path | None = None, force: bool = False) -> Path:
    """Write shipped recipe ``name`` to ``dest`` (a file, or a folder to put NAME.yaml in; default ./NAME.yaml)
    to edit it: torchtune's ``tune cp`` habit.

    Raises:
        SpaError: for an unknown name, or a destination that exists (unless ``force``).
    """
    recipes = shipped_recipes()
    key = str(name).removesuffix(".yaml").removeprefix("recipes/")
    if key not in recipes:
        raise SpaError(f"no shipped recipe '{name}' (shipped: {', '.join(recipes)})")
    src = recipes[key]
    out = Path(dest) if dest is not None else Path(src.name)
    if out.is_dir():
        out = out / src.name
    if out.exists() and not force:
        raise SpaError(f"{out} exists; give another destination or add --force to overwrite it")
    atomic_write_text(out, src.read_text(encoding="utf-8"))
    return out
