"""Two processes (gloo on CPU) give the same D_i and the same training as one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_recipe
from safetensors.torch import load_file


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

def _free_port() -> str:
    """A port no one listens on now: fixed ports collide with a concurrent run (EADDRINUSE seen in CI)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])

def test_two_processes_match_one(tiny_model_dir, tiny_data, tmp_path):
    from spa_lite.config import load_recipe
    from spa_lite.stages import expand, seed_dpo, train

    flat = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs", **{
        "data.iter_prompts": [10, 8], "train.batch_size": 4, "train.grad_accum": 1, "train.warmup_ratio": 0.0,
        "train.epochs": 2, "train.refine_start": 0.0, "train.window": 6, "train.k_percent": 40.0,
    })
    path = write_recipe(tmp_path / "recipe.yaml", flat)
    one = load_recipe(path, {"name": "one"})
    seed_dpo.run(one)
    shutil.copytree(tmp_path / "runs" / "one", tmp_path / "runs" / "two")
    expand.run(one, 1)
    train.run(one, 1)

    env = {**os.environ, "SPA_LITE_QUIET": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(Path(__file__).parent / "dist_worker.py"), str(path), "two"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stderr[-3000:]

    a, b = tmp_path / "runs" / "one" / "iter1", tmp_path / "runs" / "two" / "iter1"
    # really two processes (accelerate's PartialState alone reports one process under torchrun on CPU)
    assert json.loads((b / "train/manifest.json").read_text())["summary"]["processes"] == 2
    assert (a / "expand/data.jsonl").read_bytes() == (b / "expand/data.jsonl").read_bytes()
    m1 = [json.loads(x) for x in (a / "train/metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (b / "train/metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) >= 4
    assert m1[-1]["loss"] != pytest.approx(m1[0]["loss"], abs=1e-6), "training moved the loss"
    for r1, r2 in zip(m1, m2):
        for k in ("loss", "reward_margin", "flagged_frac", "tau"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), (r1["step"], k)
    assert any(r["flagged_frac"] > 0 for r in m1), "refinement was exercised"
    w1 = load_file(str(a / "train/adapter/adapter_model.safetensors"))
    w2 = load_file(str(b / "train/adapter/adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:  # Adam turns summation-order differences in near-zero gradients into ~1% of one lr-sized step
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)
    f1 = sorted((r["step"], r["pair"], r["flagged"]) for r in map(json.loads, (a / "train/flags.jsonl").read_text().splitlines()))
    f2 = sorted((r["step"], r["pair"], r["flagged"]) for r in map(json.loads, (b / "train/flags.jsonl").read_text().splitlines()))
    assert f1 == f2


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_fsdp_two_processes_match_one(tiny_model_dir, tiny_data, tmp_path):
    """seed-dpo and train with the base sharded over 2 processes (FSDP2, gloo) match one unsharded process,
    including a train stage killed after 2 steps and resumed from its gathered checkpoint.

    Refinement starts at step 3: at step 1 pi_theta == pi_ref, every confidence is 0.5 up to rounding, and
    which of those ties falls under tau depends on summation order (the sharded run uses the logits path,
    the single process the fused one)."""
    from spa_lite.config import load_recipe
    from spa_lite.stages import expand, seed_dpo, train

    flat = tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs", **{
        "data.iter_prompts": [10, 8], "seed_dpo.batch_size": 3, "seed_dpo.grad_accum": 2, "seed_dpo.save_every": 2,
        "train.batch_size": 3, "train.grad_accum": 1, "train.warmup_ratio": 0.0, "train.epochs": 2,
        "train.refine_start": 0.25, "train.window": 6, "train.k_percent": 40.0, "train.save_every": 1,
    })
    path = write_recipe(tmp_path / "recipe.yaml", flat)
    one = load_recipe(path, {"name": "one"})
    seed_dpo.run(one)
    expand.run(one, 1)
    train.run(one, 1)
    # the sharded run takes the same D_1 (expand does not shard), then trains its own pi_0 and pi_1
    (tmp_path / "runs" / "two" / "iter1").mkdir(parents=True)
    shutil.copytree(tmp_path / "runs" / "one" / "iter1" / "expand", tmp_path / "runs" / "two" / "iter1" / "expand")

    env = {**os.environ, "SPA_LITE_QUIET": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           str(Path(__file__).parent / "dist_worker.py"), str(path), "two", "seed", "train-resume"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parent)
    assert res.returncode == 0, res.stderr[-3000:]

    a, b = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    for stage in ("seed", "iter1/train"):
        m1, m2 = _read_metrics(a / stage / "metrics.jsonl"), _read_metrics(b / stage / "metrics.jsonl")
        assert len(m1) == len(m2) >= 4, stage
        assert m1[-1]["loss"] != pytest.approx(m1[0]["loss"], abs=1e-6), "training moved the loss"
        for r1, r2 in zip(m1, m2):
            for k in ("loss", "reward_margin", "grad_norm") + (("flagged_frac", "tau") if stage != "seed" else ()):
                assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), (stage, r1["step"], k)
        w1 = load_file(str(a / stage / "adapter/adapter_model.safetensors"))
        w2 = load_file(str(b / stage / "adapter/adapter_model.safetensors"))
        assert w1.keys() == w2.keys() and w1
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)
    m2 = json.loads((b / "iter1/train/manifest.json").read_text())
    assert m2["summary"]["resumed_from"] == 2 and m2["summary"]["processes"] == 2 and m2["summary"]["fsdp"] is True
    assert json.loads((a / "iter1/train/manifest.json").read_text())["summary"]["fsdp"] is False
    assert any(r["flagged_frac"] > 0 for r in _read_metrics(a / "iter1/train/metrics.jsonl")), "refinement exercised"
    f1, f2 = (sorted((r["step"], r["pair"], r["flagged"])
                     for r in map(json.loads, (d / "iter1/train/flags.jsonl").read_text().splitlines()))
              for d in (a, b))
    assert f1 == f2


def test_accelerate_configs_parse(monkeypatch):
    import yaml

    root = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
    cfgs = {p.stem: yaml.safe_load(p.read_text()) for p in root.glob("*.yaml")}
    assert {"multi_gpu", "cpu_2proc", "fsdp"} <= set(cfgs)
    assert cfgs["fsdp"]["distributed_type"] == "FSDP" and cfgs["fsdp"]["fsdp_config"]["fsdp_version"] == 2
    assert cfgs["multi_gpu"]["distributed_type"] == "MULTI_GPU" and cfgs["cpu_2proc"]["use_cpu"] is True
    from spa_lite.fsdp import fsdp_requested

    assert fsdp_requested("on") and not fsdp_requested("off")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_requested("auto")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    assert fsdp_requested("auto")
