"""Wasserstein-DRO DPO trains end to end on the tiny model, in seed-dpo and in train with refinement on,
and epsilon = 0 reproduces the plain (refined) DPO run step for step."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_overrides, write_recipe
from safetensors.torch import load_file
from typer.testing import CliRunner

from spa_lite.cli import app


def _metrics(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("dro")
    ov = tiny_overrides(tiny_model_dir, tiny_data, root / "runs", **{"data.iter_prompts": [6, 6],
                        "train.refine_start": 0.0, "train.window": 4, "train.k_percent": 50.0,
                        "train.warmup_ratio": 0.0, "train.grad_accum": 1, "seed_dpo.warmup_ratio": 0.0})
    recipe = write_recipe(root / "r.yaml", ov)
    runner = CliRunner()
    out = {}
    for name, eps in {"dro": 0.05, "eps0": 0.0, "dpo": None}.items():
        # every stage sees the same settings (the seed's loss is part of the lineage expand and train check)
        sets = [] if eps is None else [a for kv in ("seed_dpo.loss=dro", f"seed_dpo.dro_epsilon={eps}",
                                                    "train.loss=dro", f"train.dro_epsilon={eps}") for a in ("--set", kv)]
        for cmd in (["seed-dpo"], ["expand", "--iter", "1"], ["train", "--iter", "1"]):
            res = runner.invoke(app, [*cmd, *sets, "--recipe", str(recipe), "--name", name])
            assert res.exit_code == 0, res.output
        out[name] = root / "runs" / name
    return out


def test_dro_trains_seed_and_refined_iteration(runs):
    seed = _metrics(runs["dro"] / "seed" / "metrics.jsonl")
    it1 = _metrics(runs["dro"] / "iter1" / "train" / "metrics.jsonl")
    for rows in (seed, it1):
        assert all({"dro_worst_case_loss", "dro_empirical_loss", "dro_budget_used", "dro_pairs_moved"} <= r.keys() for r in rows)
        assert all(r["dro_worst_case_loss"] >= r["dro_empirical_loss"] - 1e-9 for r in rows)
        assert any(r["dro_pairs_moved"] > 0 for r in rows)
    assert any(r["flagged_frac"] > 0 for r in it1), "refinement was on and flagged pairs"
    a = load_file(str(runs["dro"] / "seed" / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and float(v.abs().max()) > 0 for k, v in a.items()), "seed adapter trained"


def test_dro_epsilon_zero_equals_dpo(runs):
    for stage in ("seed", "iter1/train"):
        m0 = _metrics(runs["eps0"] / stage / "metrics.jsonl")
        md = _metrics(runs["dpo"] / stage / "metrics.jsonl")
        assert len(m0) == len(md)
        for a, b in zip(m0, md):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
            assert a["flagged_frac"] == b["flagged_frac"]
    w0 = load_file(str(runs["eps0"] / "iter1" / "train" / "adapter" / "adapter_model.safetensors"))
    wd = load_file(str(runs["dpo"] / "iter1" / "train" / "adapter" / "adapter_model.safetensors"))
    for k in wd:
        assert (w0[k] - wd[k]).abs().max() < 1e-5
