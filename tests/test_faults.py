"""Fault injection through the `spa-lite` command line on the tiny model (issue 12).

Each case feeds one fault and checks three things: the exit code (2 for an expected failure), the one line
that names what went wrong and where, and that nothing was marked complete or lost. A module-scoped run
(seed + D_1, made through the CLI) is copied into a fresh run directory by each case that needs upstream stages.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model_dir, invoke, ok, tiny_overrides, write_pairs, write_recipe


def refused(result, *needles: str) -> str:
    """An expected failure: exit 2, exactly one `error:` line holding every needle, no traceback."""
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}\n{out}\n{result.exception!r}"
    assert "Traceback" not in out, out
    errs = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1, out
    for n in needles:
        assert n in errs[0], f"{n!r} not in {errs[0]!r}"
    return errs[0]


def strict_rows(path: Path) -> list:
    """Parse JSON(L) refusing the NaN/Infinity tokens that are not JSON."""
    def no_constants(tok):
        raise AssertionError(f"{path}: non-JSON token {tok}")

    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(x, parse_constant=no_constants) for x in text.splitlines() if x.strip()]
    return [json.loads(text, parse_constant=no_constants)]


@pytest.fixture(scope="module")
def env(tiny_model_dir, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    ov = tiny_overrides(tiny_model_dir, tiny_data, root / "runs")
    recipe = write_recipe(root / "tiny.yaml", ov)
    ok(invoke("seed-dpo", "--recipe", recipe))
    ok(invoke("expand", "--iter", 1, "--recipe", recipe))
    return {"root": root, "runs": root / "runs", "recipe": recipe, "base": root / "runs" / "tiny", "ov": ov}


def clone(env, name: str, *keys: str) -> Path:
    run = env["runs"] / name
    for key in keys:
        shutil.copytree(env["base"] / key, run / key)
    return run


def stage_files(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------ finite or fail


@pytest.mark.parametrize("lr", ["1e30", "1e10"])
def test_divergence_is_not_saved_as_success(env, lr):
    """lr 1e30 leaves weights ~1e30 (NaN logits); lr 1e10 a dead adapter (gradient 0). Neither is complete."""
    name = f"div{lr}"
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", name, "--set", f"seed_dpo.lr={lr}",
               "--set", "seed_dpo.epochs=0.5")
    refused(r, "seed", "diverged")
    d = env["runs"] / name / "seed"
    assert not (d / "manifest.json").exists()
    assert not (d / "adapter").exists()
    for p in d.glob("*.jsonl"):
        strict_rows(p)


def test_nan_mid_training_names_the_step_and_keeps_the_checkpoint(env):
    # 6 steps; step 1 is at warmup lr 0, step 2 moves the weights to ~1e30, step 3's loss is NaN
    name = "nan-mid"
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", name, "--set", "seed_dpo.lr=1e30",
               "--set", "seed_dpo.save_every=1")
    refused(r, "step 3", "not finite")
    d = env["runs"] / name / "seed"
    assert not (d / "manifest.json").exists() and not (d / "adapter").exists()
    assert json.loads((d / "checkpoint" / "state.json").read_text())["step"] == 2
    metrics = strict_rows(d / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["loss"] is None  # NaN is written as null
    strict_rows(d / "flags.jsonl")


def test_divergence_guard(env, monkeypatch):
    """A loss that rises to 4x its start (injected from step 3 on) is stopped by diverge_factor 2, and only by it."""
    import spa_lite.training as tr

    real, calls = tr.pair_loss, []

    def rising(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) > 4:  # grad_accum 2: steps 3.. of 6
            out.loss = out.loss * 4.0
        return out

    monkeypatch.setattr(tr, "pair_loss", rising)
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", "guard", "--set", "seed_dpo.diverge_factor=2")
    refused(r, "seed DPO diverged", "step 3", "diverge_factor 2")
    assert not (env["runs"] / "guard" / "seed" / "manifest.json").exists()
    calls.clear()
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "guard-off"))
    refused(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "guard", "--set", "seed_dpo.diverge_factor=0.5"),
            "seed_dpo.diverge_factor")


def test_strict_json_round_trip(tmp_path):
    from spa_lite.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl

    atomic_write_jsonl(tmp_path / "a.jsonl", [{"x": float("nan"), "y": [float("inf"), 1.0]}])
    atomic_write_json(tmp_path / "b.json", {"x": float("nan")})
    assert strict_rows(tmp_path / "a.jsonl") == [{"x": None, "y": [None, 1.0]}]
    assert strict_rows(tmp_path / "b.json") == [{"x": None}]
    assert read_json(tmp_path / "b.json") == {"x": None}
    assert [r for _, r in read_jsonl(tmp_path / "a.jsonl")] == [{"x": None, "y": [None, 1.0]}]


def test_progress_line_formats_missing_values():
    from spa_lite.stages.common import progress_info

    assert progress_info({"loss": None, "reward_margin": None, "flagged_frac": None}, refine=True) == \
        "loss nan margin nan flagged nan"
    assert progress_info({"loss": 0.5, "reward_margin": 0.25}, refine=False) == "loss 0.5000 margin +0.250"


# ------------------------------------------------------------------------------------ identity of inputs


def test_base_replaced_at_the_same_path_is_noticed(env, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(env["ov"]["model.name_or_path"], model)
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "rebased", "--set", f"model.name_or_path={model}"))
    m = json.loads((env["runs"] / "rebased" / "seed" / "manifest.json").read_text())
    assert m["identity"]["base"] and m["identity"]["adapter"]
    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    r = invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "rebased", "--set",
               f"model.name_or_path={model}")
    refused(r, "base model", "seed-dpo")
    assert not (env["runs"] / "rebased" / "iter1" / "expand" / "data.jsonl").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "replaced"])
def test_damaged_upstream_adapter_is_named(env, damage):
    name = f"adapter-{damage}"
    run = clone(env, name, "seed")
    f = run / "seed" / "adapter" / "adapter_model.safetensors"
    if damage == "missing":
        f.unlink()
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    else:  # a valid file with other weights: only the hash tells
        from safetensors.torch import load_file, save_file

        w = load_file(str(f))
        save_file({k: v * 2 for k, v in w.items()}, str(f))
    r = invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", name)
    refused(r, "adapter_model.safetensors", "seed-dpo")
    assert not (run / "iter1" / "expand" / "manifest.json").exists()


# ------------------------------------------------------------------------------------ one writer per stage


@pytest.fixture
def other_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def _hold(stage_dir: Path, pid: int) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "LOCK").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "spa-lite expand"}))


def test_second_writer_is_refused(env, other_process):
    run = clone(env, "locked", "seed", "iter1/expand")
    d = run / "iter1" / "expand"
    (d / "manifest.json").unlink()
    (d / "data.jsonl").unlink()
    before = stage_files(run)
    _hold(d, other_process.pid)
    for extra in ((), ("--force",)):
        r = invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "locked", *extra)
        refused(r, "in use", f"pid {other_process.pid}")
        after = stage_files(run)
        assert {k: v for k, v in after.items() if k != "iter1/expand/LOCK"} == \
            {k: v for k, v in before.items() if k != "iter1/expand/LOCK"}, "a locked stage was changed"
    run2 = clone(env, "locked2", "seed", "iter1/expand")
    _hold(run2 / "iter1" / "train", other_process.pid)
    refused(invoke("train", "--iter", 1, "--recipe", env["recipe"], "--name", "locked2"), "in use")
    assert [p.name for p in (run2 / "iter1" / "train").iterdir()] == ["LOCK"]


def test_stale_lock_of_a_dead_process_is_taken_over(env):
    run = clone(env, "stale", "seed", "iter1/expand")
    d = run / "iter1" / "expand"
    (d / "manifest.json").unlink()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _hold(d, p.pid)
    ok(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "stale"))
    assert json.loads((d / "manifest.json").read_text())["status"] == "complete"
    assert not (d / "LOCK").exists(), "the lock outlived the stage"


def test_lock_primitive(tmp_path):
    from spa_lite.errors import StageLockedError
    from spa_lite.locks import StageLock

    with StageLock(tmp_path / "s") as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(StageLockedError, match="in use"):
            StageLock(tmp_path / "s", pid=os.getpid() + 1).acquire()  # another live holder: this process
    assert not (tmp_path / "s" / "LOCK").exists()


# ------------------------------------------------------------------------------------ rows refused


def test_identical_seed_pairs_are_dropped_and_counted(env, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]
    rows[5]["rejected"] = [{"role": "assistant", "content": rows[5]["chosen"][0]["content"]}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "ident", "--set", f"data.seed_pairs={pairs}"))
    s = json.loads((env["runs"] / "ident" / "seed" / "manifest.json").read_text())["summary"]
    assert s["pairs_used"] == 10
    assert s["pairs_dropped"] == {"identical": 2}


@pytest.mark.parametrize("setting,key", [
    ("data.seed_limit=-3", "data.seed_limit"), ("data.seed_limit=0", "data.seed_limit"),
    ("seed_dpo.save_every=0", "seed_dpo.save_every"), ("train.save_every=0", "train.save_every"),
    ("expand.shard_size=0", "expand.shard_size"), ("model.lora_r=0", "model.lora_r"),
    ("expand.max_new_tokens=0", "expand.max_new_tokens"), ("expand.batch_size=0", "expand.batch_size"),
    ("expand.top_p=0", "expand.top_p"), ("expand.temperature=-1", "expand.temperature"),
    ("train.window=0", "train.window"), ("seed_dpo.max_grad_norm=0", "seed_dpo.max_grad_norm"),
    ("seed_dpo.lr=.nan", "seed_dpo.lr"), ("train.lr=.inf", "train.lr"), ("data.iter_prompts=[8,0]", "data.iter_prompts"),
    ("model.lora_dropout=1", "model.lora_dropout"), ("train.refine_start=2", "train.refine_start"),
    ("seed_dpo.warmup_ratio=-0.1", "seed_dpo.warmup_ratio"), ("threads=0", "threads"),
    ("expand.judge_batch_size=0", "expand.judge_batch_size"), ("train.lambdas=[-1]", "train.lambdas"),
])
def test_out_of_range_settings_are_refused(env, setting, key):
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", "ranges", "--set", setting)
    refused(r, key)
    assert not (env["runs"] / "ranges").exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", ".", "", "x\\y"])
def test_run_names_stay_inside(env, name):
    outside = env["root"] / "escaped"
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", name, "--force") if name else \
        invoke("seed-dpo", "--recipe", env["recipe"], "--set", "name=")
    refused(r, "name")
    assert not outside.exists()


@pytest.mark.parametrize("tag", ["../../x", "a/b", ".."])
def test_eval_tags_stay_inside(env, tag):
    r = invoke("eval", "--recipe", env["recipe"], "--tag", tag, "--no-pass-rate", "--flip", "0")
    refused(r, "tag")
    assert not (env["runs"] / "x.json").exists() and not (env["base"] / "eval").exists()


# ------------------------------------------------------------------------------------ named errors


def _seed_with(env, name: str, path: Path, *extra: str):
    return invoke("seed-dpo", "--recipe", env["recipe"], "--name", name, "--set", f"data.seed_pairs={path}", *extra)


def test_non_utf8_bytes_name_file_and_line(env, tmp_path):
    p = write_pairs(tmp_path / "pairs.jsonl")
    lines = p.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"clear", b"cl\xff\xfear")
    p.write_bytes(b"".join(lines))
    refused(_seed_with(env, "utf8", p), f"{p}:4", "UTF-8")


def test_truncated_gzip_is_named_not_aborted(env, tmp_path):
    p = write_pairs(tmp_path / "pairs.jsonl")
    gz = tmp_path / "pairs.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes())[:-40])
    r = _seed_with(env, "gz", gz)
    assert "Aborted" not in r.output
    refused(r, str(gz), "truncated")


def test_non_string_content_is_named(env, tmp_path):
    p = write_pairs(tmp_path / "pairs.jsonl")
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    rows[2]["prompt"] = [{"role": "user", "content": {"text": "hi"}}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(_seed_with(env, "content", p), f"{p}:3", "prompt", "content")


def test_malformed_json_file_is_named(env, tmp_path):
    p = tmp_path / "pairs.json"
    p.write_text('[{"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "a", "chosen": ]\n')
    refused(_seed_with(env, "badjson", p), str(p), "malformed JSON")


def test_rerun_after_fixing_bad_seed_file_is_not_refused(env, tmp_path):
    p = write_pairs(tmp_path / "pairs.jsonl")
    good = p.read_text()
    p.write_text(good + "{not json\n")
    refused(_seed_with(env, "fixed", p), f"{p}:13")
    p.write_text(good)
    ok(_seed_with(env, "fixed", p))


def test_long_prompts_are_skipped_and_counted(env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"x{i}", "prompt": [{"role": "user", "content": f"Question number {i}?"}]} for i in range(8)]
    rows[1]["prompt"][0]["content"] = "word " * 3000
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clone(env, "long", "seed")
    ok(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "long", "--set", f"data.prompts={prompts}"))
    s = json.loads((env["runs"] / "long" / "iter1" / "expand" / "manifest.json").read_text())["summary"]
    assert s["prompt_too_long"] == 1
    assert s["prompts"] == 8


def test_missing_model_without_offline_mode(env, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    refused(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "nomodel", "--set",
                   f"model.name_or_path={tmp_path / 'no-such-model'}"), "no-such-model")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_disk_full_and_permission_denied_are_one_line(env, monkeypatch, err):
    from spa_lite import io

    run = clone(env, f"oserr{err}", "seed")
    before = stage_files(run)

    def fail(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(io.os, "fsync", fail)
    refused(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", f"oserr{err}"), os.strerror(err))
    monkeypatch.undo()
    after = stage_files(run)
    assert {k: v for k, v in before.items() if k in after} == before, "an artifact was lost"
    assert not (run / "iter1" / "expand" / "manifest.json").exists()


def test_config_mismatch_suggests_the_same_name_and_sets(env):
    clone(env, "mismatch", "seed")
    r = invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "mismatch", "--set", "seed_dpo.beta=0.2",
               "--judge-ref", "prev")
    line = refused(r, "another config")
    assert "--name mismatch" in line and "--set seed_dpo.beta=0.2" in line and "--set expand.judge_ref=prev" in line


def test_unexpected_error_keeps_the_traceback(env, monkeypatch):
    from spa_lite.stages import seed_dpo

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(seed_dpo, "run", boom)
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", "boom")
    assert r.exit_code == 1
    assert "Traceback" in r.output and "RuntimeError: boom" in r.output
    assert "unexpected" in r.output.splitlines()[-1]
