"""The run layout (spa_lite.layout): the one owner of run paths, stage keys and policy names."""

from __future__ import annotations

import json

import pytest

from spa_lite import layout
from spa_lite.config import load_recipe
from spa_lite.errors import SpaError


@pytest.fixture
def recipe(tmp_path):
    return load_recipe(None, {"name": "r", "run_dir": str(tmp_path), "iterations": 3, "data.iter_prompts": [4, 4, 4]})


def complete(recipe, stage, status="complete"):
    d = layout.stage_dir(recipe, stage)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"status": status}))


def test_paths_and_keys(recipe, tmp_path):
    run = tmp_path / "r"
    assert layout.stage_keys(2) == ["seed", "iter1/expand", "iter1/train", "iter2/expand", "iter2/train"]
    assert layout.data_path(run, 2) == run / "iter2" / "expand" / "data.jsonl"
    assert layout.adapter_dir(recipe, 0) == run / "seed" / "adapter"
    assert layout.adapter_dir(recipe, 3) == run / "iter3" / "train" / "adapter"
    assert layout.eval_dir(recipe) == run / "eval"
    assert layout.Stage("expand", 1).upstream() == layout.Stage("seed", 0)
    assert layout.Stage("expand", 2).upstream() == layout.Stage("train", 1)
    assert layout.Stage("train", 2).command == "spa-lite train --iter 2"


def test_policy_names_and_labels():
    assert layout.policy_names(None) == [] and layout.policy_label(None) == "pi_init"
    assert layout.policy_names(2) == ["seed", "iter1", "iter2"] and layout.policy_label(2) == "pi_2"


def test_complete_policies_stop_at_the_first_gap_and_resolve(recipe):
    assert layout.complete_policies(recipe) == [] and layout.resolve_policy(recipe, "last") is None
    complete(recipe, layout.Stage("seed", 0))
    complete(recipe, layout.Stage("train", 1), status="running")
    complete(recipe, layout.Stage("train", 2))
    assert layout.complete_policies(recipe) == [0]
    assert layout.resolve_policy(recipe, "last") == 0 and layout.resolve_policy(recipe, "0") == 0
    assert layout.resolve_policy(recipe, "init") is None and layout.resolve_policy(recipe, None) is None
    with pytest.raises(SpaError, match=r"pi_2 is not complete in .* \(complete: \[0\]\); run its stages first"):
        layout.resolve_policy(recipe, 2)
    with pytest.raises(SpaError, match="policy 'best' must be init, last or an integer"):
        layout.resolve_policy(recipe, "best")
