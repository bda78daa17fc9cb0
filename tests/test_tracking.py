"""report_to: per-step training metrics, per-stage summaries and eval results reach the trackers under names that
line up across iterations, and the values read back with each tracker's own reader equal metrics.jsonl."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import tiny_overrides

import spa_lite
from spa_lite.errors import SpaError


def _metrics(run: Path, key: str) -> list[dict]:
    return [json.loads(x) for x in (run / key / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_missing_tracker_names_the_pip_install(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import importlib.util

    from spa_lite import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    recipe = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs"), report_to="trackio")
    with pytest.raises(SpaError, match=r"trackio is not installed \(pip install trackio\)"):
        spa_lite.run_stage(recipe, "seed-dpo")
    assert not (recipe.run_path / "seed").exists()  # refused before any work
    assert tracking.requested(spa_lite.load_recipe(None, report_to="none")) == []


def test_flatten_and_eval_steps():
    from spa_lite.tracking import eval_metrics, flatten

    assert flatten({"a": 1, "b": {"c": 2.5, "d": None, "e": True}, "h": {"counts": [3, 4]}, "s": "x"}) == {
        "a": 1, "b/c": 2.5, "b/e": 1.0, "h/counts/0": 3, "h/counts/1": 4}
    rep = {"policies": ["pi_init", "pi_0", "pi_1"],
           "judge_accuracy": {"pi_init": {"init": {"accuracy": 0.5}}, "pi_1": {"init": {"accuracy": 0.75}}},
           "self_label_noise": {"D_1": {"n": 4, "contradicted": 1}}}
    assert eval_metrics(rep) == [(0, {"eval/judge_accuracy/init/accuracy": 0.5}),
                                 (1, {"eval/self_label_noise/n": 4, "eval/self_label_noise/contradicted": 1}),
                                 (2, {"eval/judge_accuracy/init/accuracy": 0.75})]


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tiny_data, tmp_path_factory):
    trackers = [t for t in ("tensorboard", "wandb") if __import__("importlib").util.find_spec(t)]
    if not trackers:
        pytest.skip("neither tensorboard nor wandb is installed (pip install 'spa-lite[test]')")
    root = tmp_path_factory.mktemp("tracking")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DIR", str(root))
    recipe = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, root / "runs", iterations=2,
                                                       **{"data.eval_pairs": str(tiny_data["pairs"])}),
                                  report_to=trackers)
    spa_lite.run(recipe)
    report = spa_lite.evaluate(recipe, limit=8, methods=["init", "none"], flip=0.0, pass_rate=False, tag="gold")
    mp.undo()
    return recipe, trackers, report


def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    out = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    out["__histograms__"] = acc.Tags()["histograms"]
    return out


def test_tensorboard_values_equal_metrics_jsonl(tracked):
    recipe, trackers, report = tracked
    if "tensorboard" not in trackers:
        pytest.skip("tensorboard is not installed")
    tb = recipe.run_path / "tensorboard"
    assert sorted(p.name for p in tb.iterdir()) == ["eval-gold", "iter1-expand", "iter1-train", "iter2-expand",
                                                    "iter2-train", "seed"]
    for key in ("seed", "iter1/train", "iter2/train"):
        rows = _metrics(recipe.run_path, key)
        s = _tb_scalars(tb / key.replace("/", "-"))
        for name in ("loss", "reward_margin", "lr", "grad_norm"):
            assert [st for st, _ in s[f"train/{name}"]] == [r["step"] for r in rows]
            assert [v for _, v in s[f"train/{name}"]] == pytest.approx([r[name] for r in rows], rel=1e-6, abs=1e-7)
        summary = json.loads((recipe.run_path / key / "manifest.json").read_text())["summary"]
        assert s["summary/steps"][-1][1] == summary["steps"]
        assert s["summary/last10/loss"][-1][1] == pytest.approx(summary["last10"]["loss"], rel=1e-6)
    assert "train/flagged_frac" in _tb_scalars(tb / "iter1-train")
    for i in (1, 2):
        s = _tb_scalars(tb / f"iter{i}-expand")
        summary = json.loads((recipe.run_path / f"iter{i}/expand/manifest.json").read_text())["summary"]
        assert s["summary/pairs"] == [(i, summary["pairs"])]  # step = iteration: iterations line up
        assert s["summary/identical"] == [(i, summary["identical"])]
        assert s["summary/truncated"] == [(i, summary["truncated"])]
        assert sum(summary["confidence_hist"]["counts"]) == summary["pairs"]
        assert "expand/confidence" in s["__histograms__"]
    s = _tb_scalars(tb / "eval-gold")
    logged = dict(s["eval/judge_accuracy/init/accuracy"])
    expected = {pos: report["judge_accuracy"][pol]["init"]["accuracy"] for pos, pol in enumerate(report["policies"])
                if "init" in report["judge_accuracy"].get(pol, {})}
    assert expected and logged == pytest.approx(expected)  # step = the policy's position: pi_0 1, pi_1 2, ...


def _wandb_records(path: Path):
    """The records of an offline .wandb file: a 7-byte header, then LevelDB-log framed protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def test_wandb_offline_values_equal_metrics_jsonl(tracked):
    recipe, trackers, _ = tracked
    if "wandb" not in trackers:
        pytest.skip("wandb is not installed")
    runs = {}
    for f in (recipe.run_path / "wandb").glob("offline-run-*/run-*.wandb"):
        name, history, summary = None, [], {}
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                name, group = rec.run.display_name, rec.run.run_group
                assert group == recipe.name
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        runs[name] = (history, summary)
    assert sorted(runs) == sorted(f"tiny/{k}" for k in ("seed", "iter1/expand", "iter1/train", "iter2/expand",
                                                        "iter2/train", "eval/gold"))
    for key in ("seed", "iter1/train", "iter2/train"):
        rows = _metrics(recipe.run_path, key)
        history, summary = runs[f"tiny/{key}"]
        logged = [h for h in history if "train/loss" in h]
        assert [h["_step"] for h in logged] == [r["step"] for r in rows]
        assert [h["train/loss"] for h in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-9)
        assert [h["train/reward_margin"] for h in logged] == pytest.approx([r["reward_margin"] for r in rows], rel=1e-9)
        man = json.loads((recipe.run_path / key / "manifest.json").read_text())["summary"]
        assert summary["summary/steps"] == man["steps"]
    history, summary = runs["tiny/iter1/expand"]
    man = json.loads((recipe.run_path / "iter1/expand/manifest.json").read_text())["summary"]
    assert summary["summary/pairs"] == man["pairs"] and summary["summary/identical"] == man["identical"]
    (hist,) = [h for h in history if h.get("expand/confidence/_type") == "histogram"]
    assert sum(hist["expand/confidence/values"]) == man["pairs"] and hist["_step"] == 1


def test_cli_report_to(tiny_model_dir, tiny_data, tmp_path):
    from conftest import write_recipe
    from typer.testing import CliRunner

    from spa_lite.cli import app

    if __import__("importlib").util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    rec = write_recipe(tmp_path / "tiny.yaml", tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs",
                                                              **{"seed_dpo.epochs": 1}))
    bad = CliRunner().invoke(app, ["seed-dpo", "--recipe", str(rec), "--report-to", "tensorbored"])
    assert bad.exit_code == 2 and "report_to: tensorbored not among" in bad.output
    res = CliRunner().invoke(app, ["seed-dpo", "--recipe", str(rec), "--report-to", "tensorboard"])
    assert res.exit_code == 0, res.output
    rows = _metrics(tmp_path / "runs" / "tiny", "seed")
    s = _tb_scalars(tmp_path / "runs" / "tiny" / "tensorboard" / "seed")
    assert [v for _, v in s["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
