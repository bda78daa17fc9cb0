"""The options of eval, winrate, export-answers, plan and split: one dataclass each (``spa_lite.options``), the CLI's
flags generated from it, validation that names the option, and a CLI that reaches the library only through the
Python API. No model is loaded: every bad value is refused before one would be."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import typer
from conftest import invoke

import spa_lite
from spa_lite.cli import app
from spa_lite.errors import SpaError
from spa_lite.options import (
    EvalOptions,
    ExportAnswersOptions,
    PlanOptions,
    SplitOptions,
    WinrateOptions,
    cli_default,
    cli_help,
    flag_name,
)

COMMANDS = {"eval": EvalOptions, "winrate": WinrateOptions, "export-answers": ExportAnswersOptions,
            "plan": PlanOptions, "split": SplitOptions}


def _params(command: str) -> dict:
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_field_is_a_cli_option_with_its_help_and_default(command):
    cls, params = COMMANDS[command], _params(command)
    for f in dataclasses.fields(cls):
        p = params[f.name]
        assert p.help == cli_help(f) and p.help.startswith(f.metadata["help"]), f.name
        assert (p.param_type_name == "argument") == bool(f.metadata["argument"]), f.name
        if p.param_type_name == "option":
            assert flag_name(f) in p.opts, (f.name, p.opts)
        want = cli_default(f)
        if want is inspect.Parameter.empty:
            assert p.required, f.name
        else:  # a list option's default is the comma-separated text its flag takes
            assert not p.required and p.default == want, (f.name, p.default, want)
    # nothing else than the fields and the recipe options the command shares with the others
    shared = {"recipe", "set_", "name", "run_dir", "report_to"}
    assert set(params) - {f.name for f in dataclasses.fields(cls)} <= shared


@pytest.mark.parametrize("args, needle", [
    (["eval", "--limit", 0], "--limit: 0 must be >= 1"),
    (["eval", "--methods", "init,oracle"], "--methods 'oracle' is not one of init, prev, none, llm"),
    (["eval", "--lambdas", "0.5,x"], "--lambdas[1]: expected float, got 'x'"),
    (["eval", "--flip", 1.5, "--temperature", -1], "--flip: 1.5 must be >= 0 and < 1; --temperature: -1.0 must be >= 0"),
    (["eval", "--tag", "../x"], "--tag: '../x' must be a plain name"),
    (["eval", "--format", "csv"], "--format 'csv' is not one of auto"),
    (["winrate", "--judge", "oracle"], "--judge 'oracle' is not one of verifier, local, http"),
    (["winrate", "--judge", "http"], "--judge http needs --judge-url and --judge-model"),
    (["winrate", "--limit", -2], "--limit: -2 must be >= 1"),
    (["export-answers", "q.json", "--out", "o.json", "--batch-size", 0], "--batch-size: 0 must be >= 1"),
    (["export-answers", "q.json", "--out", "o.json", "--temperature", -0.5], "--temperature: -0.5 must be >= 0"),
    (["plan", "--gpu-mem", 0], "--gpu-mem: 0.0 must be > 0"),
    (["plan", "--fsdp", 0], "--fsdp: 0 must be >= 1"),
    (["plan", "--fsdp", 2], "--fsdp shards full-precision bases only"),
    (["plan", "--quantization", "8bit"], "--quantization '8bit' is not one of 4bit, none (spa-lite loads"),
    (["split", "d.jsonl", "--out", "o", "--iter-sizes", "5,0"], "--iter-sizes: 0 must be >= 1"),
    (["split", "d.jsonl", "--out", "o", "--iter-sizes", "5,a"], "--iter-sizes[1]: expected int, got 'a'"),
    (["split", "d.jsonl", "--out", "o", "--seed-size", 0, "--test-size", -1],
     "--seed-size: 0 must be >= 1; --test-size: -1 must be >= 0"),
])
def test_bad_values_are_refused_naming_the_option(args, needle, tmp_path):
    res = invoke(*[tmp_path / a if a in ("q.json", "o.json", "d.jsonl", "o") else a for a in args])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert needle in out, out
    assert [ln for ln in res.output.splitlines() if ln.startswith("error:")] and "Traceback" not in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.json").exists()


def test_the_api_validates_the_same_options():
    recipe = spa_lite.load_recipe("smollm2-demo")
    with pytest.raises(SpaError, match="--limit: 0 must be >= 1"):
        spa_lite.evaluate(recipe, limit=0)
    with pytest.raises(SpaError, match=r"eval: unknown option limt \(known: pairs, fmt, limit"):
        spa_lite.evaluate(recipe, limt=5)
    with pytest.raises(SpaError, match="--quantization '8bit' is not one of 4bit, none"):
        spa_lite.plan(recipe, quantization="8bit")
    with pytest.raises(SpaError, match="--benchmark 'arena' is not one of alpaca-eval, mt-bench"):
        spa_lite.export_answers(recipe, "q.json", "o.json", benchmark="arena")
    with pytest.raises(SpaError, match="--seed-size: expected int, got 'many'"):
        spa_lite.split("d.jsonl", "o", seed_size="many")


def test_help_shows_the_bounds():
    res = invoke("split", "--help")
    flat = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code == 0 and "Gold seed pairs (paper: 2000). (allowed: >= 1)" in flat, flat


def test_values_are_coerced_like_recipe_overrides():
    """The command line's text and the API's Python values give the same options."""
    assert EvalOptions(methods="init, llm", lambdas="0.5,0.25") == EvalOptions(methods=["init", "llm"],
                                                                                 lambdas=[0.5, 0.25])
    assert EvalOptions(lambdas="").lambdas == [] and EvalOptions().methods == ["init", "prev", "none"]
    s = SplitOptions(data="d.jsonl", out="o", iter_sizes="5,6", seed="7")
    assert (s.iter_sizes, s.out, s.seed) == ([5, 6], Path("o"), 7)
    assert WinrateOptions(policy=2).policy == "2"
    assert PlanOptions(gpu_mem=80).gpu_mem == 80.0
    with pytest.raises(SpaError, match="--limit: 0 must be >= 1; --flip: 1.0 must be >= 0 and < 1"):
        EvalOptions(limit=0, flip=1)  # every problem at once
    with pytest.raises(SpaError, match="--pass-rate: expected bool, got 'maybe'"):
        EvalOptions(pass_rate="maybe")


def test_cli_imports_no_stage_and_no_computing_library_module():
    """cli.py parses and prints: its work goes through ``spa_lite.api``. It may import the options, the recipe's
    help texts and override parser, errors, the console and the lock release of its error boundary, nothing else
    of spa_lite; the old per-command task package is gone."""
    tree = ast.parse(Path(spa_lite.__file__).with_name("cli.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spa_lite"):
            found |= {node.module} if node.module != "spa_lite" else {f"spa_lite.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("spa_lite")}
    allowed = {"spa_lite.api", "spa_lite.options", "spa_lite.config", "spa_lite.errors", "spa_lite.ui",
               "spa_lite.locks"}
    assert "spa_lite.api" in found and found <= allowed, found - allowed
    assert not Path(spa_lite.__file__).with_name("tasks").exists()


# where each dataclass is read: (module file under spa_lite/, function, the parameter or local holding it)
READERS = {EvalOptions: ("stages/evaluate.py", "run", "opts"), SplitOptions: ("stages/split.py", "run", "opts"),
           WinrateOptions: ("winrate.py", None, "opts"), ExportAnswersOptions: ("api.py", "export_answers", "o"),
           PlanOptions: ("api.py", "plan", "o")}


def fields_read(source: str, function: str | None, var: str) -> set[str]:
    """The attributes read as ``<var>.<name>`` in ``function`` of ``source`` (the whole module when None)."""
    tree = ast.parse(source)
    if function is not None:
        (tree,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == var}


@pytest.mark.parametrize("cls", READERS, ids=lambda c: c.command)
def test_every_option_is_read_where_the_command_runs(cls):
    """A field added to an options dataclass but never read by its command fails here."""
    path, function, var = READERS[cls]
    source = (Path(spa_lite.__file__).parent / path).read_text(encoding="utf-8")
    unread = {f.name for f in dataclasses.fields(cls)} - fields_read(source, function, var)
    assert unread == set(), f"{cls.__name__} fields never read as {var}.<name> in spa_lite/{path}: {sorted(unread)}"


def test_unread_option_check_can_fail():
    src = "def run(opts):\n    return opts.limit + len(other.flip)\n"
    assert fields_read(src, "run", "opts") == {"limit"}


def test_eval_and_split_stages_take_their_options_whole():
    """The stage reads the dataclass itself, so a new option is one field plus the line that uses it."""
    from spa_lite.stages import evaluate, split

    assert list(inspect.signature(evaluate.run).parameters) == ["recipe", "opts", "policies"]
    assert inspect.signature(evaluate.run).parameters["policies"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(split.run).parameters) == ["opts"]


def test_an_empty_list_option_means_its_default_in_one_place():
    """`--methods ""` (or methods=[] from Python) is the default list, decided by the options, not by each stage;
    a list whose default is None stays None, and each instance gets its own copy of the default."""
    assert EvalOptions.build({"methods": ""}).methods == ["init", "prev", "none"]
    assert EvalOptions.build({"methods": []}).methods == ["init", "prev", "none"]
    assert EvalOptions.build({"methods": "llm"}).methods == ["llm"]
    assert EvalOptions.build({}).lambdas is None
    a = SplitOptions.build({"data": "x", "out": "o", "iter_sizes": ""})
    b = SplitOptions.build({"data": "x", "out": "o", "iter_sizes": []})
    assert a.iter_sizes == b.iter_sizes == [8000, 20000, 30000] and a.iter_sizes is not b.iter_sizes
