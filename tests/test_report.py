"""`write_report`: valid PNGs, report.json holds exactly the synthetic inputs' numbers, missing parts are skipped."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from spa_lite.report import write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN is written as NaN, as training does


def _metrics(n: int, refine: bool, rng: random.Random) -> list[dict]:
    rows = []
    for s in range(1, n + 1):
        r = {"step": s, "loss": 0.7 - 0.01 * s + rng.random() * 0.01, "reward_chosen": 0.1, "reward_rejected": -0.1,
             "reward_margin": rng.random(), "reward_acc": rng.random(), "confidence": 0.5 + rng.random() / 2,
             "tau": (0.5 + rng.random() / 4) if refine else float("nan"),
             "flagged_frac": (rng.choice([0.0, 0.25, 0.5]) if refine and s > 2 else 0.0),
             "lr": 1e-4, "grad_norm": 1.0, "refining": refine and s > 2, "elapsed_s": float(s)}
        rows.append(r)
    return rows


def _data(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for k in range(n):
        p = rng.random()
        rows.append({"prompt": [{"role": "user", "content": f"q{k}"}], "chosen": "a", "rejected": "b", "p_y1": p,
                     "confidence": max(p, 1 - p), "chosen_is_y1": p >= 0.5, "len_chosen": rng.randint(1, 60),
                     "len_rejected": rng.randint(1, 60), "logratio_chosen": 0.1, "logratio_rejected": 0.0})
    rows[0]["confidence"] = 1.0  # edge of the last bin
    rows[1]["confidence"] = 0.5  # edge of the first bin
    return rows


def _ci(acc: float) -> dict:
    return {"n": 50, "accuracy": acc, "ci_low": acc - 0.1, "ci_high": min(1.0, acc + 0.1)}


@pytest.fixture
def run(tmp_path) -> Path:
    rng = random.Random(0)
    r = tmp_path / "runs" / "synth"
    _jsonl(r / "seed" / "metrics.jsonl", _metrics(5, False, rng))
    for i, n in ((1, 7), (2, 9)):
        _jsonl(r / f"iter{i}" / "train" / "metrics.jsonl", _metrics(n, True, rng))
        _jsonl(r / f"iter{i}" / "expand" / "data.jsonl", _data(20 + 5 * i, rng))
    _jsonl(r / "iter1" / "train" / "flags.jsonl",
           [{"step": 1, "pair": 0, "row": 3, "confidence": 0.4, "flagged": True},
            {"step": 1, "pair": 1, "row": 4, "confidence": 0.9, "flagged": False},
            {"step": 2, "pair": 0, "row": 3, "confidence": 0.4, "flagged": True}])
    ev = {"policies": ["pi_init", "pi_0", "pi_1", "pi_2"],
          "judge_accuracy": {"pi_init": {"none": _ci(0.6), "llm": _ci(0.55)},
                             **{f"pi_{k}": {"init": _ci(0.6 + k / 20), "prev": _ci(0.65 + k / 20),
                                            "none": _ci(0.5), "llm": _ci(0.55)} for k in range(3)}},
          "noise_detection": {"flip": 0.2, "lambdas": [0.5], "by_policy": {
              "pi_1": {"flipped": 10, "n": 50, "eq9": {"auroc": 0.7, "precision_at_20pct": 0.4},
                       "dnd_0.5": {"auroc": 0.75, "precision_at_20pct": 0.5}}}},
          "pass_rate": {p: {"n": 40, "pass_rate": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "mean_tokens": 30.0}
                        for p, v in (("pi_init", 0.2), ("pi_0", 0.3), ("pi_1", 0.4), ("pi_2", 0.5))}}
    (r / "eval").mkdir()
    (r / "eval" / "gold.json").write_text(json.dumps(ev))
    return r


def _read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _no_nan(name):
    raise AssertionError(f"report.json holds {name}")


def _valid_png(p: Path) -> bool:
    b = p.read_bytes()
    if not b.startswith(PNG_MAGIC) or b[12:16] != b"IHDR" or not b.rstrip().endswith(b"IEND\xaeB`\x82"):
        return False
    w, h = int.from_bytes(b[16:20], "big"), int.from_bytes(b[20:24], "big")
    return w > 50 and h > 50


def test_report_pngs_and_numbers(run):
    md = write_report(run)
    assert md == run / "report" / "report.md"
    out = md.parent
    rep = json.loads((out / "report.json").read_text(), parse_constant=_no_nan)  # strict JSON: NaN became null
    assert set(rep["plots"]) == {"training", "refinement", "confidence", "lengths", "eval/gold/judge_accuracy",
                                 "eval/gold/pass_rate"}
    for name in rep["plots"].values():
        assert _valid_png(out / name), name
        assert f"]({name})" in md.read_text()
    assert rep["missing"] == []

    # training curves and refinement series, recomputed from the metrics files
    for label, path in (("seed", run / "seed"), ("iter1", run / "iter1" / "train"), ("iter2", run / "iter2" / "train")):
        rows = _read_jsonl(path / "metrics.jsonl")
        s = rep["training"][label]
        assert s["step"] == [r["step"] for r in rows]
        assert s["loss"] == [r["loss"] for r in rows]
        assert s["reward_margin"] == [r["reward_margin"] for r in rows]
        assert s["flagged_frac"] == [r["flagged_frac"] for r in rows]
        assert s["tau"] == [None if math.isnan(r["tau"]) else r["tau"] for r in rows]
    assert all(t is None for t in rep["training"]["seed"]["tau"])
    assert rep["flags"]["iter1"] == {"pairs_seen": 2, "pairs_ever_flagged": 1, "frac_ever_flagged": 0.5}

    # confidence histograms and lengths of each D_i
    edges = [0.5 + 0.05 * k for k in range(11)]
    for i in (1, 2):
        rows = _read_jsonl(run / f"iter{i}" / "expand" / "data.jsonl")
        conf = [r["confidence"] for r in rows]
        c = rep["expand"][f"iter{i}"]["confidence"]
        assert c["n"] == len(rows)
        assert c["mean"] == pytest.approx(sum(conf) / len(conf), abs=1e-12)
        counts = [0] * 10
        for x in conf:
            counts[min(int((x - 0.5) / 0.05 + 1e-9), 9)] += 1
        assert c["counts"] == counts and sum(counts) == len(rows)
        assert c["bins"] == pytest.approx(edges)
        ln = rep["expand"][f"iter{i}"]["lengths"]
        assert ln["mean_len_chosen"] == pytest.approx(sum(r["len_chosen"] for r in rows) / len(rows))
        assert ln["mean_len_rejected"] == pytest.approx(sum(r["len_rejected"] for r in rows) / len(rows))
        assert ln["frac_chosen_longer"] == pytest.approx(
            sum(r["len_chosen"] > r["len_rejected"] for r in rows) / len(rows))

    # evaluation: the numbers of the eval file, per policy and method
    ev = json.loads((run / "eval" / "gold.json").read_text())
    e = rep["eval"]["gold"]
    assert e["judge_accuracy"]["methods"] == ["init", "prev", "none", "llm"]
    assert e["judge_accuracy"]["by_policy"] == ev["judge_accuracy"]
    assert e["pass_rate"] == ev["pass_rate"]
    assert [e["pass_rate"][p]["pass_rate"] for p in ev["policies"]] == [0.2, 0.3, 0.4, 0.5]
    assert e["noise_detection"]["by_policy"]["pi_1"] == {"eq9": {"auroc": 0.7, "precision_at_20pct": 0.4},
                                                         "dnd_0.5": {"auroc": 0.75, "precision_at_20pct": 0.5}}
    text = md.read_text()
    assert "| pi_2 | 40 | 0.500 |" in text  # pass-rate table
    assert "0.750 [0.65, 0.85]" in text  # pi_2 prev accuracy with its CI (0.65 + 2/20 = 0.75)


def test_report_skips_missing_sections(tmp_path):
    r = tmp_path / "runs" / "seedonly"
    _jsonl(r / "seed" / "metrics.jsonl", _metrics(3, False, random.Random(1)))
    out = tmp_path / "elsewhere"
    md = write_report(r, out)
    assert md == out / "report.md"
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["plots"]) == {"training"} and _valid_png(out / "training.png")
    assert not (out / "confidence.png").exists() and not (out / "refinement.png").exists()
    text = md.read_text()
    assert text.count("_Skipped") == 4  # refinement, confidence, lengths, evaluation
    assert len(rep["missing"]) == 3 and rep["expand"] == {} and rep["eval"] == {}


def test_report_not_a_run(tmp_path):
    from spa_lite.errors import SpaError

    with pytest.raises(SpaError):
        write_report(tmp_path / "nope")
