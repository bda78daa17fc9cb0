"""`spa-lite report RUN`: a Markdown report with PNG plots of one run, from the files its stages wrote.

    runs/<name>/report/report.md     tables with the numbers behind every plot
    runs/<name>/report/report.json   exactly the numbers plotted (tests check them against their sources)
    runs/<name>/report/*.png         training curves, refinement (flagged fraction, tau), confidence of D_i,
                                     response lengths, judge accuracy and pass rate per policy (per eval file)

Every section whose inputs are missing is skipped, and the Markdown says so. Only files are read: no model.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np

from spa_lite.errors import SpaError
from spa_lite.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, read_jsonl
from spa_lite.layout import Stage, data_path

CONF_BINS = [0.5 + 0.05 * k for k in range(11)]  # confidence = max(p, 1 - p) lies in [0.5, 1]
TRAIN_KEYS = ("loss", "reward_margin", "reward_acc", "confidence", "flagged_frac", "tau")


# ----------------------------------------------------------------------------------------------- collecting

def _num(x) -> float | None:
    """A finite float, or None (NaN, missing, non-numeric)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _iterations(run_path: Path) -> list[int]:
    its = []
    for d in run_path.glob("iter*"):
        m = re.fullmatch(r"iter(\d+)", d.name)
        if m and d.is_dir():
            its.append(int(m.group(1)))
    return sorted(its)


def _stages(run_path: Path) -> list[tuple[str, Path]]:
    """(label, training dir) of seed and each iteration, in order."""
    its = _iterations(run_path)
    return [("seed", run_path / Stage("seed", 0).key)] + [(f"iter{i}", run_path / Stage("train", i).key) for i in its]


def training_series(metrics_path: Path) -> dict:
    """Per-step series of a metrics.jsonl: step and TRAIN_KEYS (None where a value is NaN or absent)."""
    rows = sorted((r for _, r in read_jsonl(metrics_path)), key=lambda r: r["step"])
    out = {"step": [int(r["step"]) for r in rows]}
    for k in TRAIN_KEYS:
        out[k] = [_num(r.get(k)) for r in rows]
    out["refining"] = [bool(r.get("refining", False)) for r in rows]
    return out


def flags_summary(flags_path: Path) -> dict:
    """Pairs seen and pairs flagged at least once in a flags.jsonl."""
    seen, flagged = set(), set()
    for _, r in read_jsonl(flags_path):
        key = r.get("row", r.get("pair"))
        seen.add(key)
        if r.get("flagged"):
            flagged.add(key)
    return {"pairs_seen": len(seen), "pairs_ever_flagged": len(flagged),
            "frac_ever_flagged": len(flagged) / len(seen) if seen else None}


def expand_summary(data_path: Path) -> dict:
    """Confidence histogram and response lengths of one D_i."""
    rows = [r for _, r in read_jsonl(data_path)]
    conf = [float(r["confidence"]) for r in rows if _num(r.get("confidence")) is not None]
    # a confidence of exactly 1.0 falls in the last bin (numpy's last bin is closed); clip rounding below 0.5
    counts = np.histogram(np.clip(conf, CONF_BINS[0], CONF_BINS[-1]), bins=CONF_BINS)[0] if conf else np.zeros(10)
    lc = [float(r["len_chosen"]) for r in rows if _num(r.get("len_chosen")) is not None]
    lr = [float(r["len_rejected"]) for r in rows if _num(r.get("len_rejected")) is not None]
    both = [(float(r["len_chosen"]), float(r["len_rejected"])) for r in rows
            if _num(r.get("len_chosen")) is not None and _num(r.get("len_rejected")) is not None]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {
        "confidence": {"n": len(conf), "mean": mean(conf), "median": float(np.median(conf)) if conf else None,
                       "bins": list(CONF_BINS), "counts": [int(c) for c in counts]},
        "lengths": {"n": len(both), "mean_len_chosen": mean(lc), "mean_len_rejected": mean(lr),
                    "frac_chosen_longer": mean([float(c > r) for c, r in both])},
    }


def eval_summary(ev: dict) -> dict:
    """Judge accuracy, pass rate and noise-detection AUROC per policy of one eval JSON."""
    policies = list(ev.get("policies") or [])
    out: dict = {"policies": policies}
    ja = ev.get("judge_accuracy") or {}
    if ja:
        methods = []
        for v in ja.values():
            methods += [m for m in v if m not in methods]
        canon = ["init", "prev", "none", "llm"]
        methods = [m for m in canon if m in methods] + [m for m in methods if m not in canon]
        out["judge_accuracy"] = {
            "methods": methods,
            "by_policy": {pol: {m: {k: v[m].get(k) for k in ("n", "accuracy", "ci_low", "ci_high")} for m in v}
                          for pol, v in ja.items()},
        }
    pr = ev.get("pass_rate") or {}
    if pr:
        out["pass_rate"] = {pol: {k: v.get(k) for k in ("n", "pass_rate", "ci_low", "ci_high", "mean_tokens")}
                            for pol, v in pr.items()}
    nd = (ev.get("noise_detection") or {}).get("by_policy") or {}
    if nd:
        out["noise_detection"] = {
            "flip": ev["noise_detection"].get("flip"),
            "by_policy": {pol: {d: {k: v[d].get(k) for k in ("auroc", "precision_at_20pct")}
                                for d in v if isinstance(v[d], dict)} for pol, v in nd.items()},
        }
    sln = ev.get("self_label_noise") or {}
    if sln:
        out["self_label_noise"] = sln
    return out


def collect(run_path: Path) -> dict:
    """Every number the report shows, read from the run's files; ``missing`` lists sections skipped and why."""
    run_path = Path(run_path)
    if not run_path.is_dir():
        raise SpaError(f"{run_path} is not a run directory")
    data: dict = {"run": str(run_path), "training": {}, "flags": {}, "expand": {}, "eval": {}, "missing": []}
    for label, d in _stages(run_path):
        if (d / "metrics.jsonl").exists():
            s = training_series(d / "metrics.jsonl")
            if s["step"]:
                data["training"][label] = s
        if (d / "flags.jsonl").exists():
            data["flags"][label] = flags_summary(d / "flags.jsonl")
    for i in _iterations(run_path):
        p = data_path(run_path, i)
        if p.exists():
            data["expand"][f"iter{i}"] = expand_summary(p)
    evals = sorted((run_path / "eval").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    for p in evals:  # oldest first: the last one is the newest
        data["eval"][p.stem] = eval_summary(read_json(p))
    data["missing"] = _missing(data)
    return data


def _refined(training: dict) -> dict:
    """The iterations of ``training`` (series by stage label) trained with self-refinement (tau or flags)."""
    return {k: s for k, s in training.items() if k != "seed" and
            (any(v is not None for v in s["tau"]) or any(s["flagged_frac"]))}


def _missing(data: dict) -> list[str]:
    """The report's sections whose inputs ``collect`` did not find, and why."""
    missing = []
    if not data["training"]:
        missing.append("training curves: no seed/metrics.jsonl or iter*/train/metrics.jsonl")
    if not _refined(data["training"]):
        missing.append("refinement (flagged fraction, tau): no iteration trained with self-refinement")
    if not data["expand"]:
        missing.append("confidence and lengths of D_i: no iter*/expand/data.jsonl")
    if not data["eval"]:
        missing.append("judge accuracy and pass rate: no eval/*.json (run `spa-lite eval`)")
    return missing


# ----------------------------------------------------------------------------------------------- plotting

def _figure(nrows: int = 1, ncols: int = 1, size=(6.4, 4.0)):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SpaError("the report needs matplotlib: pip install 'spa-lite[report]'") from None
    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)  # Figure without pyplot renders with Agg
    atomic_write_bytes(path, buf.getvalue())  # 0644 like report.md


def _nan(xs):
    return [np.nan if x is None else x for x in xs]


def _plot_training(tr: dict, path: Path) -> None:
    fig, ax = _figure(1, 2, (11, 4))
    for label, s in tr.items():
        ax[0, 0].plot(s["step"], _nan(s["loss"]), label=label)
        ax[0, 1].plot(s["step"], _nan(s["reward_margin"]), label=label)
    for a, t in ((ax[0, 0], "DPO loss"), (ax[0, 1], "reward margin (chosen - rejected)")):
        a.set_title(t)
        a.set_xlabel("optimizer step")
        a.legend(fontsize=8)
    _save_png(fig, path)


def _plot_refinement(tr: dict, path: Path) -> None:
    fig, ax = _figure(1, 2, (11, 4))
    for label, s in tr.items():
        ax[0, 0].plot(s["step"], _nan(s["flagged_frac"]), label=label)
        ax[0, 1].plot(s["step"], _nan(s["tau"]), label=label)
    for a, t in ((ax[0, 0], "flagged fraction (refined pairs)"), (ax[0, 1], "tau (confidence threshold)")):
        a.set_title(t)
        a.set_xlabel("optimizer step")
        a.legend(fontsize=8)
    _save_png(fig, path)


def _plot_confidence(ex: dict, path: Path) -> None:
    fig, ax = _figure(1, 1)
    for label, s in ex.items():
        c = s["confidence"]
        ax[0, 0].stairs(c["counts"], c["bins"], label=f"D_{label[4:]} (n={c['n']})")
    ax[0, 0].set_title("judged confidence max(p, 1-p) per iteration (Eq. 7)")
    ax[0, 0].set_xlabel("confidence")
    ax[0, 0].set_ylabel("pairs")
    ax[0, 0].legend(fontsize=8)
    _save_png(fig, path)


def _plot_lengths(ex: dict, path: Path) -> None:
    fig, ax = _figure(1, 1)
    labels = list(ex)
    x = np.arange(len(labels))
    ch = _nan([ex[k]["lengths"]["mean_len_chosen"] for k in labels])
    rj = _nan([ex[k]["lengths"]["mean_len_rejected"] for k in labels])
    ax[0, 0].bar(x - 0.2, ch, 0.4, label="chosen")
    ax[0, 0].bar(x + 0.2, rj, 0.4, label="rejected")
    ax[0, 0].set_xticks(x, [f"D_{k[4:]}" for k in labels])
    ax[0, 0].set_ylabel("mean tokens")
    ax[0, 0].set_title("response length, chosen vs rejected")
    ax[0, 0].legend(fontsize=8)
    _save_png(fig, path)


def _plot_judge(ja: dict, path: Path) -> None:
    fig, ax = _figure(1, 1, (8, 4))
    pols, methods = list(ja["by_policy"]), ja["methods"]
    x = np.arange(len(pols))
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        acc, lo, hi = [], [], []
        for p in pols:
            v = ja["by_policy"][p].get(m)
            a = np.nan if v is None or v["accuracy"] is None else v["accuracy"]
            acc.append(a)
            lo.append(0.0 if v is None or v["ci_low"] is None else a - v["ci_low"])
            hi.append(0.0 if v is None or v["ci_high"] is None else v["ci_high"] - a)
        ax[0, 0].bar(x - 0.4 + w * (j + 0.5), acc, w, yerr=[lo, hi], capsize=2, label=m)
    ax[0, 0].set_xticks(x, pols)
    ax[0, 0].set_ylim(0, 1.05)
    ax[0, 0].set_ylabel("accuracy vs gold labels")
    ax[0, 0].set_title("judge accuracy per policy and method (95% CI)")
    ax[0, 0].legend(fontsize=8)
    _save_png(fig, path)


def _plot_pass_rate(pr: dict, path: Path) -> None:
    fig, ax = _figure(1, 1)
    pols = list(pr)
    y = [pr[p]["pass_rate"] for p in pols]
    lo = [y[i] - pr[p]["ci_low"] for i, p in enumerate(pols)]
    hi = [pr[p]["ci_high"] - y[i] for i, p in enumerate(pols)]
    ax[0, 0].errorbar(np.arange(len(pols)), y, yerr=[lo, hi], marker="o", capsize=3)
    ax[0, 0].set_xticks(np.arange(len(pols)), pols)
    ax[0, 0].set_ylim(0, 1.05)
    ax[0, 0].set_ylabel("verifier pass rate")
    ax[0, 0].set_title("alignment curve: pass rate per policy (95% CI)")
    _save_png(fig, path)


# ----------------------------------------------------------------------------------------------- markdown

def _f(x, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return out + [""]


def _last(xs: list):
    """The last value of a curve that is not None (None if there is none)."""
    return next((v for v in reversed(xs) if v is not None), None)


def _safe(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)


def write_report(run_path: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, report.json and PNG plots for a run (default ``run_path/report``); returns report.md's path."""
    run_path = Path(run_path)
    out_dir = Path(out_dir) if out_dir is not None else run_path / "report"
    data = collect(run_path)
    plots: dict[str, str] = {}
    md = [f"# SPA run report: `{run_path.name}`", "", f"Run directory: `{run_path}`", ""]
    if data["missing"]:
        md += ["Skipped sections (inputs missing):", ""] + [f"- {m}" for m in data["missing"]] + [""]
    md += _training_section(data["training"], out_dir, plots)
    md += _refinement_section(data["training"], data["flags"], out_dir, plots)
    md += _expand_sections(data["expand"], out_dir, plots)
    md += ["## Evaluation", ""]
    if not data["eval"]:
        md += ["_Skipped: no eval/*.json found (run `spa-lite eval`)._", ""]
    for n, (tag, ev) in enumerate(reversed(list(data["eval"].items()))):
        md += _eval_section(tag, ev, n == 0, out_dir, plots)

    data["plots"] = plots
    atomic_write_json(out_dir / "report.json", json.loads(json.dumps(data)))
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(md).rstrip() + "\n")
    return path


# Each section below returns its Markdown lines, writes its PNGs into out_dir and names them in ``plots``.

def _training_section(tr: dict, out_dir: Path, plots: dict[str, str]) -> list[str]:
    md = ["## Training curves", ""]
    if not tr:
        return md + ["_Skipped: no metrics.jsonl found._", ""]
    _plot_training(tr, out_dir / "training.png")
    plots["training"] = "training.png"
    md += ["![training](training.png)", ""]
    rows = []
    for label, s in tr.items():
        first = next((v for v in s["loss"] if v is not None), None)
        rows.append([label, len(s["step"]), first, _last(s["loss"]), _last(s["reward_margin"]), _last(s["reward_acc"])])
    md += _table(["stage", "steps", "first loss", "last loss", "last reward margin", "last reward acc"], rows)
    return md + ["Per-step values of every curve are in `report.json` (`training`).", ""]


def _refinement_section(tr: dict, flags: dict, out_dir: Path, plots: dict[str, str]) -> list[str]:
    md = ["## Self-refinement: flagged fraction and tau", ""]
    refined = _refined(tr)
    if not refined:
        return md + ["_Skipped: no iteration trained with self-refinement (no tau / flagged fraction)._", ""]
    _plot_refinement(refined, out_dir / "refinement.png")
    plots["refinement"] = "refinement.png"
    md += ["![refinement](refinement.png)", ""]
    rows = []
    for label, s in refined.items():
        ff = [v for v in s["flagged_frac"] if v is not None]
        taus = [v for v in s["tau"] if v is not None]
        fl = flags.get(label, {})
        rows.append([label, len(s["step"]), float(np.mean(ff)) if ff else None, max(ff) if ff else None,
                     taus[-1] if taus else None, fl.get("pairs_ever_flagged"), fl.get("frac_ever_flagged")])
    return md + _table(["iteration", "steps", "mean flagged frac", "max flagged frac", "last tau",
                        "pairs ever flagged", "frac ever flagged"], rows)


def _expand_sections(ex: dict, out_dir: Path, plots: dict[str, str]) -> list[str]:
    """The judged confidence of each D_i and its response lengths."""
    md = ["## Judged confidence of D_i (Eq. 7)", ""]
    if not ex:
        return md + ["_Skipped: no iter*/expand/data.jsonl found._", "", "## Response lengths, chosen vs rejected",
                     "", "_Skipped: no iter*/expand/data.jsonl found._", ""]
    _plot_confidence(ex, out_dir / "confidence.png")
    plots["confidence"] = "confidence.png"
    md += ["![confidence](confidence.png)", ""]
    bins = CONF_BINS
    closing = [")"] * (len(bins) - 2) + ["]"]
    header = ["D_i", "n", "mean", "median"] + [f"[{bins[k]:.2f},{bins[k + 1]:.2f}{closing[k]}"
                                               for k in range(len(bins) - 1)]
    md += _table(header, [[f"D_{k[4:]}", v["confidence"]["n"], v["confidence"]["mean"], v["confidence"]["median"],
                           *v["confidence"]["counts"]] for k, v in ex.items()])
    md += ["## Response lengths, chosen vs rejected", ""]
    _plot_lengths(ex, out_dir / "lengths.png")
    plots["lengths"] = "lengths.png"
    md += ["![lengths](lengths.png)", ""]
    return md + _table(["D_i", "pairs", "mean len chosen", "mean len rejected", "frac chosen longer"],
                       [[f"D_{k[4:]}", v["lengths"]["n"], v["lengths"]["mean_len_chosen"],
                         v["lengths"]["mean_len_rejected"], v["lengths"]["frac_chosen_longer"]] for k, v in ex.items()])


def _eval_section(tag: str, ev: dict, newest: bool, out_dir: Path, plots: dict[str, str]) -> list[str]:
    """One eval file: judge accuracy and pass rate (tables and plots), noise detection, self-labelling noise."""
    md = [f"### `eval/{tag}.json`" + (" (newest)" if newest else ""), ""]
    ja = ev.get("judge_accuracy")
    if ja:
        name = f"eval_{_safe(tag)}_judge_accuracy.png"
        _plot_judge(ja, out_dir / name)
        plots[f"eval/{tag}/judge_accuracy"] = name
        md += ["#### Judge accuracy", "", f"![judge accuracy]({name})", ""]
        rows = [[p, *[(f"{v[m]['accuracy']:.3f} [{v[m]['ci_low']:.2f}, {v[m]['ci_high']:.2f}]" if m in v else "-")
                      for m in ja["methods"]]] for p, v in ja["by_policy"].items()]
        md += _table(["policy", *ja["methods"]], rows)
    else:
        md += ["_No judge accuracy in this file._", ""]
    pr = ev.get("pass_rate")
    if pr:
        name = f"eval_{_safe(tag)}_pass_rate.png"
        _plot_pass_rate(pr, out_dir / name)
        plots[f"eval/{tag}/pass_rate"] = name
        md += ["#### Verifier pass rate (alignment curve)", "", f"![pass rate]({name})", ""]
        md += _table(["policy", "n", "pass rate", "CI low", "CI high", "mean tokens"],
                     [[p, v["n"], v["pass_rate"], v["ci_low"], v["ci_high"], v["mean_tokens"]]
                      for p, v in pr.items()])
    else:
        md += ["_No pass rate in this file._", ""]
    return md + _noise_tables(ev)


def _noise_tables(ev: dict) -> list[str]:
    """Noise detection AUROC and self-labelling noise of one eval file (tables only; empty where absent)."""
    md: list[str] = []
    nd = ev.get("noise_detection")
    if nd:
        dets = []
        for v in nd["by_policy"].values():
            dets += [d for d in v if d not in dets]
        md += [f"#### Noise detection AUROC ({_f(nd['flip'], 2)} of labels flipped)", ""]
        md += _table(["policy", *dets], [[p, *[v.get(d, {}).get("auroc") for d in dets]]
                                         for p, v in nd["by_policy"].items()])
    sln = ev.get("self_label_noise")
    if sln:
        md += ["#### Self-labelling noise (verifier vs Eq. 7 labels)", ""]
        md += _table(["D_i", "n", "confirmed", "contradicted", "undetermined", "contradicted | flagged",
                      "contradicted | unflagged"],
                     [[d, v.get("n"), v.get("confirmed"), v.get("contradicted"), v.get("undetermined"),
                       v.get("contradicted_rate_flagged"), v.get("contradicted_rate_unflagged")]
                      for d, v in sln.items()])
    return md


__all__ = ["write_report", "collect", "training_series", "expand_summary", "eval_summary", "flags_summary"]
