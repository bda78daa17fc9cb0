"""Crash at every boundary (issue 23): `spa-lite run` (seed-dpo, expand --iter 1, train --iter 1 on the tiny model)
is crashed at each durable write it makes, then rerun clean; the result must be byte-identical to an uninterrupted
run, and no stage may ever be marked complete with missing or partial files.

Durable writes are counted through hooks on every way spa-lite puts bytes on the disk: ``spa_lite.io``'s
``_durable_write`` (every atomic file: manifests, shards, D_i, checkpoint files, started.json, recipe.yaml),
``append_text`` (metrics.jsonl and flags.jsonl lines), safetensors' ``save_file`` as peft calls it (adapter
weights), ``torch.save`` to a path, and ``os.replace`` (each rename that publishes a file or folder). The crash
is injected *before* write k happens (so "after write k-1" is covered too), as an exception no handler of
spa-lite catches, like a process that dies there. A real ``kill -9`` of a CLI subprocess is made at a sample of
points.

The fast suite crashes at a spread sample of points; ``pytest -m bench tests/test_crash_points.py`` crashes at
every point and writes the count to bench/results/crash_points.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import CLI_ENV, tiny_overrides, write_recipe

ROOT = Path(__file__).resolve().parents[1]
FAST_POINTS = int(os.environ.get("SPA_LITE_CRASH_POINTS", "6"))


class Crash(BaseException):
    """The process dies here: not an Exception, so no `except Exception` of spa-lite or a library handles it."""


class WriteHooks:
    """Counts durable writes (kind, path) and raises Crash before the ``crash_at``-th one (1-based; 0: never)."""

    def __init__(self, crash_at: int = 0):
        self.crash_at = crash_at
        self.writes: list[tuple[str, str]] = []

    def hit(self, kind: str, path) -> None:
        self.writes.append((kind, str(path)))
        if len(self.writes) == self.crash_at:
            raise Crash(f"crash before write {self.crash_at}: {kind} {path}")

    def install(self, monkeypatch) -> None:
        import safetensors.torch
        import torch
        from peft import peft_model

        from spa_lite import io, training

        def wrap(kind, fn, path_arg):
            def hooked(*a, **k):
                target = a[path_arg] if len(a) > path_arg else None
                if kind != "torch.save" or isinstance(target, (str, os.PathLike)):
                    self.hit(kind, target)
                return fn(*a, **k)
            return hooked

        monkeypatch.setattr(io, "_durable_write", wrap("write", io._durable_write, 0))
        monkeypatch.setattr(training, "append_text", wrap("append", io.append_text, 2))
        monkeypatch.setattr(peft_model, "safe_save_file", wrap("safetensors", safetensors.torch.save_file, 1))
        monkeypatch.setattr(torch, "save", wrap("torch.save", torch.save, 1))
        monkeypatch.setattr(os, "replace", wrap("rename", os.replace, 1))


def _recipe(tiny_model_dir, tiny_data, runs: Path, name: str) -> Path:
    ov = tiny_overrides(tiny_model_dir, tiny_data, runs, name=name, iterations=1, **{
        "data.iter_prompts": [6], "seed_dpo.epochs": 1, "seed_dpo.save_every": 1, "expand.shard_size": 3,
        "train.grad_accum": 1, "train.save_every": 1})
    return write_recipe(runs.parent / f"{name}.yaml", ov)


def _run(recipe: Path):
    from typer.testing import CliRunner

    from spa_lite.cli import app

    return CliRunner().invoke(app, ["run", str(recipe)], env=CLI_ENV)


def _result(run: Path) -> dict[str, bytes]:
    """What must be byte-identical: D_1, each adapter's weights, metrics and flags (wall time left out)."""
    out = {}
    for rel in ("iter1/expand/data.jsonl", "seed/adapter/adapter_model.safetensors",
                "iter1/train/adapter/adapter_model.safetensors", "seed/flags.jsonl", "iter1/train/flags.jsonl"):
        out[rel] = (run / rel).read_bytes()
    for rel in ("seed/metrics.jsonl", "iter1/train/metrics.jsonl"):
        rows = [json.loads(x) for x in (run / rel).read_text().splitlines()]
        out[rel] = json.dumps([{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]).encode()
    return out


def _no_complete_stage_is_partial(run: Path) -> int:
    """Every stage whose manifest says complete has all the files it recorded, with the hashes it recorded;
    returns the number of complete stages."""
    from spa_lite.io import sha256_file

    complete = 0
    for manifest in run.rglob("manifest.json"):
        m = json.loads(manifest.read_text())
        if m.get("status") != "complete":
            continue
        complete += 1
        d = manifest.parent
        ident = m["identity"]
        for name, h in (ident.get("adapter") or {}).items():
            assert (d / "adapter" / name).is_file(), f"{d} complete without adapter/{name}"
            assert sha256_file(d / "adapter" / name) == h, f"{d}: adapter/{name} is partial or changed"
        if "data" in ident:
            assert sha256_file(d / "data.jsonl") == ident["data"], f"{d}: data.jsonl is partial"
        if d.name in {"seed", "train"}:
            assert "adapter" in ident, f"{d} complete without an adapter identity"
    return complete


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data, tmp_path_factory):
    """The uninterrupted run, with the list of its durable writes."""
    root = tmp_path_factory.mktemp("crash")
    recipe = _recipe(tiny_model_dir, tiny_data, root / "runs", "whole")
    mp = pytest.MonkeyPatch()
    hooks = WriteHooks()
    hooks.install(mp)
    try:
        r = _run(recipe)
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    return {"root": root, "result": _result(root / "runs" / "whole"), "writes": hooks.writes,
            "tiny": (tiny_model_dir, tiny_data)}


def crash_and_resume(reference, k: int) -> tuple[str, str]:
    """Crash before write k, check no stage is complete-but-partial, rerun clean, compare; returns the write."""
    tiny_model_dir, tiny_data = reference["tiny"]
    name = f"crash{k}"
    runs = reference["root"] / "runs"
    recipe = _recipe(tiny_model_dir, tiny_data, runs, name)
    mp = pytest.MonkeyPatch()
    hooks = WriteHooks(crash_at=k)
    hooks.install(mp)
    try:
        with pytest.raises(Crash):
            _run(recipe)
    finally:
        mp.undo()
    _no_complete_stage_is_partial(runs / name)
    r = _run(recipe)
    assert r.exit_code == 0, f"rerun after a crash before write {k} {hooks.writes[-1]}:\n{r.output}"
    assert _no_complete_stage_is_partial(runs / name) == 3
    got = _result(runs / name)
    for rel, want in reference["result"].items():
        assert got[rel] == want, f"{rel} differs after a crash before write {k} ({hooks.writes[-1]})"
    return hooks.writes[-1]


def _sample(n_writes: int, n: int) -> list[int]:
    """``n`` points spread over 1..n_writes (first and last included)."""
    if n >= n_writes:
        return list(range(1, n_writes + 1))
    return sorted({1 + round(i * (n_writes - 1) / (n - 1)) for i in range(n)})


def test_write_points_cover_every_kind(reference):
    kinds = {k for k, _ in reference["writes"]}
    assert {"write", "append", "safetensors", "rename"} <= kinds, kinds
    paths = " ".join(p for _, p in reference["writes"])
    for what in ("checkpoint", "shards", "data.jsonl", "manifest.json", "adapter", "metrics.jsonl"):
        assert what in paths, what


def test_crash_at_every_write_point(reference):
    """Fast suite: a spread sample of the write points (``SPA_LITE_CRASH_POINTS``); the bench run takes all."""
    for k in _sample(len(reference["writes"]), FAST_POINTS):
        crash_and_resume(reference, k)


@pytest.mark.bench
def test_crash_at_every_write_point_all(reference):
    t0 = time.time()
    covered = [crash_and_resume(reference, k) for k in range(1, len(reference["writes"]) + 1)]
    kinds: dict[str, int] = {}
    for kind, _ in covered:
        kinds[kind] = kinds.get(kind, 0) + 1
    out = {"write_points": len(reference["writes"]), "covered": len(covered), "by_kind": kinds,
           "wall_s": round(time.time() - t0, 1), "load": os.getloadavg(),
           "writes": [f"{kind} {Path(p).relative_to(reference['root']) if p.startswith(str(reference['root'])) else p}"
                      for kind, p in reference["writes"]]}
    path = ROOT / "bench" / "results" / "crash_points.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


# ------------------------------------------------------------------------------------ kill -9

_LAUNCHER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path[:0] = [{tests!r}]
    import pytest
    from test_crash_points import WriteHooks

    class Marker(WriteHooks):
        def hit(self, kind, path):
            self.writes.append((kind, str(path)))
            if len(self.writes) == {k}:
                Path({marker!r}).write_text(f"{{kind}} {{path}}")
                time.sleep(600)  # right here, before write {k}: the test kills this process with SIGKILL

    Marker().install(pytest.MonkeyPatch())
    from spa_lite.cli import main
    sys.argv = ["spa-lite", "run", {recipe!r}]
    main()
""")


def kill_9_at(reference, k: int, tmp_path: Path) -> str:
    tiny_model_dir, tiny_data = reference["tiny"]
    name = f"kill{k}"
    runs = reference["root"] / "runs"
    recipe = _recipe(tiny_model_dir, tiny_data, runs, name)
    marker = tmp_path / f"marker{k}"
    script = tmp_path / f"launch{k}.py"
    script.write_text(_LAUNCHER.format(tests=str(ROOT / "tests"), k=k, marker=str(marker), recipe=str(recipe)))
    env = {**os.environ, **CLI_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, f"exited {proc.returncode} before write {k}:\n{proc.stdout.read().decode()}"
            assert time.time() < deadline, "no marker"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.stdout.close()
    _no_complete_stage_is_partial(runs / name)
    r = _run(recipe)  # its stage lock names a dead pid on this host: taken over
    assert r.exit_code == 0, f"rerun after kill -9 before write {k}:\n{r.output}"
    assert _no_complete_stage_is_partial(runs / name) == 3
    got = _result(runs / name)
    for rel, want in reference["result"].items():
        assert got[rel] == want, f"{rel} differs after kill -9 before write {k} ({marker.read_text()})"
    return marker.read_text()


KILL_POINTS = {  # the first write of each kind named: a point inside each stage
    "seed-checkpoint": lambda kind, p: "seed" in p and "checkpoint" in p,
    "expand-shard": lambda kind, p: "shards" in p,
    "train-adapter": lambda kind, p: kind == "safetensors" and "train" in p,
}


@pytest.mark.parametrize("point", [pytest.param("seed-checkpoint", marks=pytest.mark.bench), "expand-shard",
                                   pytest.param("train-adapter", marks=pytest.mark.bench)])
def test_kill_9_at_sampled_write_points(reference, tmp_path, point):
    """A real SIGKILL of the CLI process before a write inside a stage (the fast suite: an expand shard; the
    bench run: seed-dpo's checkpoint and train's adapter too)."""
    k = next(i for i, (kind, p) in enumerate(reference["writes"], 1) if KILL_POINTS[point](kind, p))
    kill_9_at(reference, k, tmp_path)


def test_crash_between_checkpoint_renames_resumes_from_the_old_one(reference):
    """atomic_dir replaces a checkpoint in two renames (checkpoint -> .checkpoint.old, new -> checkpoint); killed
    between them, the run resumes from the previous checkpoint under its .old name instead of from step 0."""
    writes = reference["writes"]
    points = [i + 1 for i, (kind, p) in enumerate(writes) if kind == "rename" and p.endswith(".checkpoint.old")]
    assert len(points) == 2  # seed-dpo's and train's second checkpoint
    for k in points:
        crash_and_resume(reference, k + 1)  # crash before the second rename
        stage = "seed" if "/seed/" in writes[k][1] else "iter1/train"
        m = json.loads((reference["root"] / "runs" / f"crash{k + 1}" / stage / "manifest.json").read_text())
        assert m["summary"]["resumed_from"] == 1, m["summary"]
