"""Crash and resume: an expand killed after a shard, and a training loop stopped after some steps, resume to
exactly what an uninterrupted run gives; atomic writers leave no partial file behind when they fail."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from inject import crash_after_shards, crash_at_step
from safetensors.torch import load_file

from spa_lite.config import load_recipe
from spa_lite.io import atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text
from spa_lite.stages import common, expand, seed_dpo, train


def recipe(tiny_model_dir, tiny_data, runs: Path, name: str, **extra):
    # threads=1: two torch threads on 2 shared cores are ~100x slower for these tiny matmuls
    return load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, runs, threads=1, name=name, **extra))


def clone_stages(src: Path, dst: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        shutil.copytree(src / key, dst / key)


def adapter(run: Path, key: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / key / "adapter" / "adapter_model.safetensors"))


def metric_rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in path.read_text().splitlines()]


def assert_rows_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6, nan_ok=True), k
            else:
                assert ra[k] == rb[k], k


@pytest.fixture(scope="module")
def base_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """A seed stage and D_1 that the resume tests copy from."""
    runs = tmp_path_factory.mktemp("resume") / "runs"
    r = recipe(tiny_model_dir, tiny_data, runs, "base")
    seed_dpo.run(r)
    expand.run(r, 1)
    return runs


def test_expand_resumes_to_identical_data(tiny_model_dir, tiny_data, base_run):
    runs = base_run
    # uninterrupted reference: the base run's D_1 (3 shards of 3, 3, 2 prompts)
    ref = runs / "base" / "iter1" / "expand"
    r = recipe(tiny_model_dir, tiny_data, runs, "crashed-expand")
    clone_stages(runs / "base", runs / "crashed-expand", ("seed",))
    with crash_after_shards(1), pytest.raises(KeyboardInterrupt, match="crash after 1 shards"):
        expand.run(r, 1)
    d = runs / "crashed-expand" / "iter1" / "expand"
    assert sorted(p.name for p in (d / "shards").iterdir()) == ["00000.json"]
    assert not (d / "data.jsonl").exists() and not (d / "manifest.json").exists()
    assert not (d / "LOCK").exists(), "the interrupted stage kept its lock"
    assert not list(d.rglob("*.tmp"))
    first = (d / "shards" / "00000.json").stat().st_mtime_ns
    # a later stage refuses the partial stage
    from spa_lite.errors import StageOrderError

    with pytest.raises(StageOrderError, match="not complete"):
        train.run(r, 1)
    m = expand.run(r, 1)
    assert m["status"] == "complete"
    assert (d / "shards" / "00000.json").stat().st_mtime_ns == first, "a finished shard was redone"
    assert (d / "data.jsonl").read_bytes() == (ref / "data.jsonl").read_bytes()
    for k in range(3):
        assert json.loads((d / "shards" / f"{k:05d}.json").read_text()) == json.loads(
            (ref / "shards" / f"{k:05d}.json").read_text())
    assert m["summary"] == json.loads((ref / "manifest.json").read_text())["summary"]
    assert m["config_hash"] == json.loads((ref / "manifest.json").read_text())["config_hash"]


def test_expand_resume_refuses_partial_from_other_config(tiny_model_dir, tiny_data, base_run):
    from spa_lite.errors import StageOrderError

    runs = base_run
    clone_stages(runs / "base", runs / "other-expand", ("seed",))
    with crash_after_shards(1), pytest.raises(KeyboardInterrupt):
        expand.run(recipe(tiny_model_dir, tiny_data, runs, "other-expand"), 1)
    other = recipe(tiny_model_dir, tiny_data, runs, "other-expand", **{"expand.temperature": 1.0})
    with pytest.raises(StageOrderError, match="partial"):
        expand.run(other, 1)
    assert expand.run(other, 1, force=True)["status"] == "complete"


@pytest.mark.parametrize("stage", ["train", "seed"])
def test_training_resumes_to_identical_weights(tiny_model_dir, tiny_data, base_run, stage):
    runs = base_run
    # 2 epochs: iter1 has 4 optimizer steps (save_every 1: killed at step 3, before its checkpoint), seed 12
    # (save_every 2: killed at step 5, between checkpoints); the killed step's metrics row is cut on resume
    extra = {"train.epochs": 2} if stage == "train" else {}
    key, copy, crash, stop = (("iter1/train", ("seed", "iter1/expand"), 3, 2) if stage == "train"
                              else ("seed", (), 5, 4))

    def run_stage(r):
        return train.run(r, 1) if stage == "train" else seed_dpo.run(r)

    ref_r = recipe(tiny_model_dir, tiny_data, runs, f"{stage}-whole", **extra)
    clone_stages(runs / "base", runs / f"{stage}-whole", copy)
    # some unrelated use of torch's RNG between runs must not matter
    torch.rand(17)
    ref_m = run_stage(ref_r)
    r = recipe(tiny_model_dir, tiny_data, runs, f"{stage}-killed", **extra)
    clone_stages(runs / "base", runs / f"{stage}-killed", copy)
    with crash_at_step(common, "run_dpo_loop", crash), pytest.raises(KeyboardInterrupt, match="crash at step"):
        run_stage(r)
    d = runs / f"{stage}-killed" / key
    assert (d / "checkpoint" / "state.json").exists()
    assert json.loads((d / "checkpoint" / "state.json").read_text())["step"] == stop
    assert not (d / "adapter").exists() and not (d / "manifest.json").exists()
    assert not (d / "LOCK").exists(), "the interrupted stage kept its lock"
    assert len((d / "metrics.jsonl").read_text().splitlines()) == crash
    torch.rand(5)
    m = run_stage(r)
    assert m["status"] == "complete" and m["summary"]["resumed_from"] == stop
    assert m["summary"]["steps"] == ref_m["summary"]["steps"] > stop
    a, b = adapter(runs / f"{stage}-killed", key), adapter(runs / f"{stage}-whole", key)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert_rows_close(metric_rows(d / "metrics.jsonl"), metric_rows(runs / f"{stage}-whole" / key / "metrics.jsonl"))
    assert_rows_close(metric_rows(d / "flags.jsonl"), metric_rows(runs / f"{stage}-whole" / key / "flags.jsonl"))
    for k in ("loss", "reward_margin"):
        assert m["summary"]["last10"][k] == pytest.approx(ref_m["summary"]["last10"][k], rel=1e-5, abs=1e-6)


def test_resume_drops_torn_metric_line(tiny_model_dir, tiny_data, base_run):
    """A crash mid-write leaves a torn metrics line after the checkpoint; the resumed run drops it."""
    runs = base_run
    r = recipe(tiny_model_dir, tiny_data, runs, "torn", **{"train.epochs": 2})
    clone_stages(runs / "base", runs / "torn", ("seed", "iter1/expand"))
    with crash_at_step(common, "run_dpo_loop", 2), pytest.raises(KeyboardInterrupt):
        train.run(r, 1)
    d = runs / "torn" / "iter1" / "train"
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')
    train.run(r, 1)
    steps = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- atomic writes


class Boom(RuntimeError):
    pass


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def test_atomic_write_text_failure_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "data.jsonl"
    atomic_write_text(target, "old\n")

    def fail(fd):
        raise Boom("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(Boom):
        atomic_write_text(target, "new and much longer content\n" * 1000)
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path, {"data.jsonl"}) == []


def test_atomic_write_text_failure_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "manifest.json"

    def fail(src, dst):
        raise Boom("rename failed")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(Boom):
        atomic_write_json(target, {"status": "complete"})
    assert not target.exists()
    assert _leftovers(target.parent, set()) == []


def test_atomic_write_jsonl_bad_row_leaves_no_file(tmp_path):
    target = tmp_path / "rows.jsonl"
    atomic_write_jsonl(target, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise Boom("generator failed mid-way")

    with pytest.raises(Boom):
        atomic_write_jsonl(target, rows())
    with pytest.raises(TypeError):
        atomic_write_jsonl(target, [{"a": 3}, {"b": object()}])
    assert target.read_text() == '{"a": 1}\n'
    assert _leftovers(tmp_path, {"rows.jsonl"}) == []


def test_atomic_dir_failure_keeps_old_dir(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"old")
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise Boom("killed while saving")
    assert (target / "adapter_model.safetensors").read_bytes() == b"old"
    assert _leftovers(tmp_path, {"adapter"}) == []
    with atomic_dir(target) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"new")
    assert (target / "adapter_model.safetensors").read_bytes() == b"new"
    assert _leftovers(tmp_path, {"adapter"}) == []


def test_failed_adapter_save_leaves_no_adapter(tiny_model_dir, tiny_data, base_run, monkeypatch):
    """A crash while saving the final adapter leaves no adapter folder and no manifest; a rerun completes."""
    runs = base_run
    r = recipe(tiny_model_dir, tiny_data, runs, "save-crash")
    clone_stages(runs / "base", runs / "save-crash", ("seed", "iter1/expand"))
    from spa_lite import stack as stack_mod

    real = stack_mod.save_adapter

    def crash(model, name, out_dir, *rest):
        def boom(*a, **k):
            raise Boom("killed during save_pretrained")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model, "save_pretrained", boom)
            return real(model, name, out_dir, *rest)

    monkeypatch.setattr(stack_mod, "save_adapter", crash)
    with pytest.raises(Boom):
        train.run(r, 1)
    d = runs / "save-crash" / "iter1" / "train"
    assert not (d / "adapter").exists() and not (d / "manifest.json").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(stack_mod, "save_adapter", real)
    assert train.run(r, 1)["status"] == "complete"
    assert (d / "adapter" / "adapter_model.safetensors").is_file()
