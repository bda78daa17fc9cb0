"""The commands that act on a finished policy, through the CLI on the tiny model: `winrate`, `export-answers`,
`export`, and winrate through the Python API; and the recipe options every command shares
(``spa_lite.cli.RecipeArgs``).

One module-scoped seed-dpo run gives pi_0; each test reads it.
"""

from __future__ import annotations

import json

import pytest
from conftest import invoke, ok, tiny_overrides, write_recipe

import spa_lite
from spa_lite.cli import RecipeArgs
from spa_lite.config import load_recipe
from spa_lite.errors import SpaError


def flat(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    ov = tiny_overrides(tiny_model_dir, tiny_data, root / "runs", threads=1, **{"seed_dpo.epochs": 1})
    rec = write_recipe(root / "tiny.yaml", ov)
    ok(invoke("seed-dpo", "--recipe", rec))
    return {"root": root, "recipe": rec, "run": root / "runs" / "tiny"}


def test_winrate_verifier_writes_its_result(run):
    res = ok(invoke("winrate", "--recipe", run["recipe"], "--policy", "0", "--reference", "init",
                    "--judge", "verifier", "--prompts", "demo:eval_prompts", "--limit", 3))
    path = run["run"] / "eval" / "winrate_pi_0_vs_pi_init_verifier.json"
    out = json.loads(path.read_text())
    assert out["n"] == 3 and len(out["items"]) == 3
    assert out["wins"] + out["ties"] + out["losses"] == 3
    assert f"pi_0 vs pi_init (verifier judge, n=3): win rate {out['win_rate']:.3f}" in flat(res)


def test_winrate_refuses_bad_judges_and_policies(run):
    rec = run["recipe"]
    res = invoke("winrate", "--recipe", rec, "--judge", "http", "--prompts", "demo:eval_prompts", "--limit", 1)
    assert res.exit_code == 2 and "--judge http needs --judge-url and --judge-model" in flat(res)
    res = invoke("winrate", "--recipe", rec, "--policy", "1", "--prompts", "demo:eval_prompts")
    assert res.exit_code == 2 and "pi_1 is not complete" in flat(res)
    res = invoke("winrate", "--recipe", rec, "--policy", "best", "--prompts", "demo:eval_prompts")
    assert res.exit_code == 2 and "policy 'best' must be init, last or an integer" in flat(res)
    res = invoke("winrate", "--recipe", rec, "--judge", "verifier", "--limit", 2)  # the tiny recipe has no eval prompts
    assert res.exit_code == 2 and "no prompts: give --prompts" in flat(res)
    res = invoke("winrate", "--recipe", rec, "--judge", "oracle", "--prompts", "demo:eval_prompts", "--limit", 1)
    assert res.exit_code == 2 and "--judge 'oracle' is not one of verifier, local, http" in flat(res)


def test_winrate_through_the_api_is_the_cli_result(run):
    """``spa_lite.policy_win_rate`` is what `spa-lite winrate` runs: the same options give the same file."""
    ok(invoke("winrate", "--recipe", run["recipe"], "--policy", "0", "--prompts", "demo:eval_prompts", "--limit", 2))
    path = run["run"] / "eval" / "winrate_pi_0_vs_pi_init_verifier.json"
    cli = json.loads(path.read_text())
    path.unlink()
    res = spa_lite.policy_win_rate(load_recipe(run["recipe"]), policy=0, prompts="demo:eval_prompts", limit=2)
    assert (res["candidate"], res["reference"], res["n"]) == ("pi_0", "pi_init", 2)
    assert json.loads(path.read_text()) == cli
    assert {k: res[k] for k in cli} == cli
    with pytest.raises(SpaError, match="--limit: 0 must be >= 1"):
        spa_lite.policy_win_rate(load_recipe(run["recipe"]), limit=0)
    with pytest.raises(SpaError, match="unknown option judge_uri"):
        spa_lite.policy_win_rate(load_recipe(run["recipe"]), judge_uri="http://h")


def test_export_answers_alpaca_eval(run):
    questions = run["root"] / "alpaca.json"
    questions.write_text(json.dumps([{"instruction": f"Name a colour ({i}).", "dataset": "t"} for i in range(3)]))
    out = run["root"] / "outputs.json"
    res = ok(invoke("export-answers", questions, "--out", out, "--policy", "last", "--recipe", run["recipe"],
                    "--max-new-tokens", 4, "--limit", 2, "--batch-size", 2))
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == ["Name a colour (0).", "Name a colour (1)."]
    assert all(r["generator"] == "tiny-pi_0" and r["dataset"] == "t" and isinstance(r["output"], str) for r in rows)
    assert f"2 answers by tiny-pi_0 written to {out}" in flat(res)
    res = invoke("export-answers", questions, "--out", out, "--benchmark", "arena", "--recipe", run["recipe"])
    assert res.exit_code == 2 and "--benchmark 'arena' is not one of alpaca-eval, mt-bench" in flat(res)


def test_export_adapter_and_refusals(run):
    out = run["root"] / "pi0"
    res = ok(invoke("export", "--iter", 0, "--out", out, "--adapter", "--recipe", run["recipe"]))
    assert (out / "adapter_model.safetensors").is_file() and "exported pi_0 to" in flat(res)
    res = invoke("export", "--iter", 1, "--out", run["root"] / "pi1", "--recipe", run["recipe"])
    assert res.exit_code == 2 and "pi_1 is not complete" in flat(res)
    res = invoke("export", "--iter", 0, "--out", run["root"] / "m", "--dtype", "int8", "--recipe", run["recipe"])
    assert res.exit_code == 2 and "--dtype 'int8' is not bfloat16, float16 or float32" in flat(res)


def test_recipe_args_load_and_shell(tmp_path):
    args = RecipeArgs("smollm2-demo", ["train.lr=0.001", "expand.judge_ref=prev"], "my run", str(tmp_path),
                      {"train.refine": False, "train.loss": None, "report_to": "tensorboard"})
    r = args.load()
    assert (r.train.lr, r.expand.judge_ref, r.train.refine, r.train.loss) == (0.001, "prev", False, "dpo")
    assert (r.name, r.run_dir, r.report_to) == ("my run", str(tmp_path), ["tensorboard"])
    # report_to and flags not given stay out of the commands an error message suggests
    assert args.shell() == (f"smollm2-demo --name 'my run' --run-dir {tmp_path} --set train.lr=0.001 "
                            "--set expand.judge_ref=prev --set train.refine=false")
    # one parser of --set: the CLI's recipe is the API's from the same overrides
    assert r == spa_lite.load_recipe("smollm2-demo", ["train.lr=0.001", "expand.judge_ref=prev", "train.refine=false"],
                                     name="my run", run_dir=tmp_path, report_to="tensorboard")
    assert r.rerun_args == args.shell() and spa_lite.load_recipe("smollm2-demo").rerun_args == "RECIPE"


def test_spa_lite_plan_stays_the_api_function():
    """`spa_lite.plan` is the API's planner function, though importing the API loads the module spa_lite/plan.py
    (a submodule import binds the package attribute of its name)."""
    import importlib

    import spa_lite
    import spa_lite.api

    importlib.import_module("spa_lite.plan")
    assert spa_lite.plan is spa_lite.api.plan and callable(spa_lite.plan)
