"""``stage_run``: a stage run owns its lock, peak-memory meter, tracker and manifest, and gives them back when it
ends, however it ends (an error, Ctrl-C); nothing about a stage is kept in a module registry, so a second stage
in the same process after a failure starts clean."""

from __future__ import annotations

import json
import os

import pytest

from spa_lite.errors import DataError, StageLockedError
from spa_lite.layout import Stage, read_manifest
from spa_lite.locks import LOCK_NAME, StageLock
from spa_lite.runs import stage_run


class Boom(RuntimeError):
    pass


def _another_process_can_lock(d) -> bool:
    """Whether a live process other than this one (the parent: it outlives the test) could take ``d``'s lock."""
    try:
        StageLock(d, pid=os.getppid()).acquire().release()
    except StageLockedError:
        return False
    return True


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_a_stage_that_raises_leaves_no_lock_and_no_complete_manifest(tiny_recipe, exc):
    r = tiny_recipe()
    stage = Stage("seed", 0)
    with pytest.raises(exc):
        with stage_run(r, stage) as st:
            assert st.done is None and st.peak is not None
            info = json.loads((st.dir / LOCK_NAME).read_text())
            assert info["pid"] == os.getpid()
            assert not _another_process_can_lock(st.dir), "the lock is held while the stage runs"
            raise exc("failed mid-stage")
    d = r.run_path / stage.key
    assert not (d / LOCK_NAME).exists(), "the failed stage kept its lock"
    assert read_manifest(r, stage) is None
    assert _another_process_can_lock(d)
    # a second stage run in the same process takes the lock and completes
    with stage_run(r, stage) as st:
        assert st.done is None and (d / LOCK_NAME).exists()
        m = st.finish({"steps": 0}, {})
    assert not (d / LOCK_NAME).exists()
    assert read_manifest(r, stage)["status"] == "complete" == m["status"]
    assert m["memory"]["peak_rss_gb"] is not None and "peak_is_stage" in m["memory"]
    with stage_run(r, stage) as st:  # complete with this config: handed back, nothing prepared
        assert st.done["config_hash"] == m["config_hash"] and st.done["status"] == "complete" and st.peak is None


def test_a_stage_refused_on_its_data_releases_its_lock(tiny_recipe):
    from spa_lite.stages import seed_dpo

    r = tiny_recipe(**{"model.truncation": "skip", "model.max_length": 4, "model.max_prompt_length": 2})
    with pytest.raises(DataError, match="model.truncation is skip"):
        seed_dpo.run(r)
    d = r.run_path / "seed"
    assert not (d / LOCK_NAME).exists() and read_manifest(r, Stage("seed", 0)) is None
    assert _another_process_can_lock(d)


def test_a_stage_locked_by_another_process_is_refused_before_any_change(tiny_recipe):
    r = tiny_recipe()
    d = r.run_path / "seed"
    with StageLock(d, pid=os.getppid()):
        with pytest.raises(StageLockedError, match="in use"):
            with stage_run(r, Stage("seed", 0)):
                pytest.fail("entered a stage another process holds")
        assert json.loads((d / LOCK_NAME).read_text())["pid"] == os.getppid(), "the other holder's lock was touched"
        assert sorted(p.name for p in d.iterdir()) == [LOCK_NAME]


def test_the_tracker_is_the_stage_runs_and_closed_on_error(tiny_recipe, monkeypatch):
    from spa_lite import runs, tracking

    opened = []

    class Backend:
        def __init__(self, recipe, stage_key):
            self.key, self.rows, self.closed = stage_key, [], False
            opened.append(self)

        def log(self, metrics, step):
            self.rows.append((step, metrics))

        def close(self):
            self.closed = True

    for module in (runs, tracking):  # the fake needs no package
        monkeypatch.setattr(module, "require", lambda recipe: None)
    monkeypatch.setitem(tracking._BACKENDS, "tensorboard", Backend)
    r = tiny_recipe(report_to=["tensorboard"])
    for key in ("seed", "reward"):
        with pytest.raises(Boom):
            with stage_run(r, Stage(key, 0)) as st:
                st.log_step({"step": 1, "loss": 0.5})
                raise Boom
    assert [(b.key, b.rows, b.closed) for b in opened] == [
        (key, [(1, {"train/loss": 0.5})], True) for key in ("seed", "reward")], "one tracker per stage run, closed"
