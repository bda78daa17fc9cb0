"""One import path per name: no spa_lite module imports a name from another spa_lite module only to hand it on.

A re-export shim (a name listed in `__all__` but defined elsewhere, or imported and never used, kept alive with
`# noqa: F401`) gives a name two homes, so a reader edits the wrong one and importers drift between them.
The package's public surface (spa_lite/__init__.py and spa_lite/api.py) re-exports on purpose and is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import spa_lite

ROOT = Path(spa_lite.__file__).parent
PUBLIC_SURFACE = {ROOT / "__init__.py", ROOT / "api.py"}


def _spa_imports(tree: ast.Module) -> dict[str, str]:
    """Names bound at module level by `from spa_lite... import x`, mapped to the module they come from."""
    bound: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("spa_lite"):
            for alias in node.names:
                bound[alias.asname or alias.name] = node.module
    return bound


def _dunder_all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return []


def _used_names(tree: ast.Module) -> set[str]:
    """Every name the module's code reads (import statements and `__all__` itself do not count)."""
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
        # a quoted annotation ("PolicyStack | None") still uses the names inside it
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isascii():
            try:
                used |= {n.id for n in ast.walk(ast.parse(node.value, mode="eval")) if isinstance(n, ast.Name)}
            except SyntaxError:
                pass
    return used - {"__all__"}


def reexports(path: Path, root: Path = ROOT) -> list[str]:
    """`module: name (from source)` for each name the module only passes on."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = _spa_imports(tree)
    listed = set(_dunder_all(tree))
    used = _used_names(tree)
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    return sorted(f"{module}: {name} (from {source})" for name, source in imported.items()
                  if name in listed or name not in used)


def _library_modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if p not in PUBLIC_SURFACE)


def test_walk_finds_the_package():
    names = {p.relative_to(ROOT).as_posix() for p in _library_modules()}
    assert {"layout.py", "runs.py", "stages/common.py", "generation.py"} <= names
    assert "api.py" not in names and "__init__.py" not in names


def test_detector_flags_both_kinds_of_shim(tmp_path):
    """The check itself can fail: an `__all__` entry and an unused noqa'd import are both caught."""
    mod = tmp_path / "spa_lite" / "fake.py"
    mod.parent.mkdir()
    mod.write_text(
        "from spa_lite.layout import stage_dir, adapter_dir, eval_dir  # noqa: F401\n"
        "__all__ = ['stage_dir', 'helper']\n"
        "def helper(recipe):\n"
        "    return adapter_dir(recipe, None)\n",
        encoding="utf-8",
    )
    assert reexports(mod, root=mod.parent) == ["spa_lite.fake: eval_dir (from spa_lite.layout)",
                                               "spa_lite.fake: stage_dir (from spa_lite.layout)"]


def test_no_module_reexports_another_modules_names():
    found = [line for path in _library_modules() for line in reexports(path)]
    assert found == []
