"""Layering: the library under spa_lite/ never imports a stage module or a front end (the CLI, the Python API),
and no module imports itself back through others (function-local imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import spa_lite

ROOT = Path(spa_lite.__file__).parent
# front ends sit above the stages: the CLI, the Python API, and the package's lazy re-export of the API
ABOVE_LIBRARY = ("spa_lite.stages", "spa_lite.cli", "spa_lite.api")
# cycles through function-local imports that are known and still to be removed (each one names its modules)
KNOWN_CYCLES: list[set[str]] = []  # none left (runs <-> tracking went when spa_lite.layout took the paths)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every spa_lite module a module imports, at the top or inside a function."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_library_does_not_import_stages_or_cli():
    graph = _imports()
    assert "spa_lite.loading" in graph and "spa_lite.stages.common" in graph  # the walk found the package
    upward = {
        (mod, dep)
        for mod, deps in graph.items()
        if mod != "spa_lite" and not mod.startswith(ABOVE_LIBRARY)
        for dep in deps
        if dep.startswith(ABOVE_LIBRARY)
    }
    assert upward == set()


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    cycles = []

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert [c for c in cycles if set(c) not in KNOWN_CYCLES] == []


def test_pi_init_only_stack_has_no_trainable_adapter(tiny_model_dir):
    import torch

    from spa_lite.models import load_base_model
    from spa_lite.stack import PLACEHOLDER_ADAPTER, build_stack

    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = base(input_ids=ids).logits
    stack = build_stack(base, tok)
    assert stack.trainable is None and stack.theta == [] and stack.frozen == []
    assert list(stack.model.peft_config) == [PLACEHOLDER_ADAPTER]
    assert stack.trainable_parameters() == [] and not any(p.requires_grad for p in stack.model.parameters())
    with stack.use([]) as m, torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, want, atol=0, rtol=0)
