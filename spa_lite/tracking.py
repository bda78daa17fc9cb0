"""Experiment tracking with the ecosystem's convention: ``report_to: [tensorboard, wandb, trackio]`` (none by default).

What is logged, and under which names, so that the stages and iterations of a run line up in the tracker:

- one tracker run per stage, named ``<run name>/<stage key>`` (``demo/seed``, ``demo/iter1/expand``,
  ``demo/iter1/train``, ``demo/eval/<tag>``), grouped by the run name (W&B ``group``; TensorBoard: one log
  folder per stage under ``runs/<name>/tensorboard/``, so ``tensorboard --logdir runs/<name>/tensorboard``
  overlays the iterations);
- seed-dpo and train: every optimizer step's row of metrics.jsonl as ``train/<key>`` at step ``step`` (loss,
  reward_margin, flagged_frac, tau, lr, grad_norm, ...), the same names for every iteration;
- every stage's summary (the manifest's) as ``summary/<key>`` at step = the iteration (seed: 0); expand adds
  the judged-confidence histogram of D_i as ``expand/confidence``;
- eval: each result as ``eval/<section>/<method>`` at step = the policy's position (pi_init 0, pi_0 1, ...).

Each stage run owns its tracker (``spa_lite.runs.StageRun``: opened on first use, closed when the stage ends,
however it ends, so an interrupted stage keeps what it logged); there is no registry of open trackers.
Only the main process logs. A tracker that is not installed is reported before a stage starts, naming the
pip install. W&B honours WANDB_MODE (``offline`` writes runs/<name>/wandb/ and uploads nothing), WANDB_PROJECT
(default ``spa-lite``) and its usual login; trackio logs locally by default (TRACKIO_PROJECT, default spa-lite).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from typing import Any

import numpy as np

from spa_lite.distributed import get_dist
from spa_lite.errors import SpaError
from spa_lite.io import read_jsonl
from spa_lite.layout import data_path

TRACKERS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
            "wandb": ("wandb", "pip install wandb"),
            "trackio": ("trackio", "pip install trackio")}


def requested(recipe) -> list[str]:
    return [t for t in getattr(recipe, "report_to", []) or [] if t != "none"]


def require(recipe) -> None:
    """Raise a clear error for a requested tracker that is not installed (before any work is done)."""
    missing = [t for t in requested(recipe) if importlib.util.find_spec(TRACKERS[t][0]) is None]
    if missing:
        raise SpaError("report_to: " + "; ".join(f"{t} is not installed ({TRACKERS[t][1]})" for t in missing)
                       + ", or drop it from report_to / --report-to")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested mapping as {"a/b/c": value} (booleans as 0/1, numeric lists as a/b/0, a/b/1, ...)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, bool):
            out[key] = float(v)
        elif _num(v):
            out[key] = v
        elif isinstance(v, list) and v and all(_num(x) for x in v):
            out.update({f"{key}/{i}": x for i, x in enumerate(v)})
    return out


class _TensorBoard:
    def __init__(self, recipe, stage_key: str):
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(recipe.run_path / "tensorboard" / stage_key.replace("/", "-")),
                               flush_secs=10)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.w.add_scalar(k, v, global_step=step)

    def histogram(self, name: str, values: list[float], step: int) -> None:
        self.w.add_histogram(name, np.asarray(values, dtype=float), global_step=step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.log(metrics, step)

    def close(self) -> None:
        self.w.close()


class _WandB:
    module = "wandb"

    def __init__(self, recipe, stage_key: str):
        self.m = importlib.import_module(self.module)
        self.run = self._init(recipe, stage_key)

    def _init(self, recipe, stage_key: str):
        recipe.run_path.mkdir(parents=True, exist_ok=True)
        return self.m.init(project=os.environ.get("WANDB_PROJECT", "spa-lite"), name=f"{recipe.name}/{stage_key}",
                           group=recipe.name, job_type=stage_key.split("/")[-1], dir=str(recipe.run_path),
                           config=recipe.to_dict(), reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def histogram(self, name: str, values: list[float], step: int) -> None:
        self.run.log({name: self.m.Histogram(values)}, step=step)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


class _Trackio(_WandB):
    module = "trackio"

    def _init(self, recipe, stage_key: str):
        return self.m.init(project=os.environ.get("TRACKIO_PROJECT", "spa-lite"), name=f"{recipe.name}/{stage_key}",
                           group=recipe.name, config=recipe.to_dict())

    def histogram(self, name: str, values: list[float], step: int) -> None:
        pass  # trackio logs scalars; the histogram's counts are in the summary (summary/confidence_hist/...)

    def summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}


class StageTracker:
    """The trackers of one stage; a no-op with an empty report_to or off the main process."""

    def __init__(self, recipe, stage_key: str):
        self.stage_key = stage_key
        names = requested(recipe) if get_dist().main else []
        if names:
            require(recipe)
        self.backends = [_BACKENDS[n](recipe, stage_key) for n in names]
        self.last_step = 0

    def log_step(self, row: dict) -> None:
        """A metrics.jsonl row as train/<key> at its step."""
        if not self.backends:
            return
        step = int(row["step"])
        metrics = {f"train/{k}": v for k, v in flatten(row).items() if k != "step"}
        for b in self.backends:
            b.log(metrics, step)
        self.last_step = max(self.last_step, step)

    def log_summary(self, summary: dict, step: int, confidences: list[float] | None = None) -> None:
        if not self.backends:
            return
        step = max(step, self.last_step)  # W&B refuses a step below one already logged
        metrics = {f"summary/{k}": v for k, v in flatten(summary).items()}
        for b in self.backends:
            if confidences:
                b.histogram("expand/confidence", confidences, step)
            b.summary(metrics, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for b in self.backends:
            b.log(metrics, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def log_stage_summary(tracker: StageTracker, recipe, stage, summary: dict) -> None:
    """A finished stage's summary (``StageRun.finish`` calls this with the stage run's tracker); expand adds the
    judged-confidence histogram of D_i."""
    if not tracker.backends:
        return
    confidences = None
    if stage.kind == "expand":
        data = data_path(recipe.run_path, stage.iteration)
        confidences = [r["confidence"] for _, r in read_jsonl(data) if _num(r.get("confidence"))] if data.exists() else None
    tracker.log_summary(summary, stage.iteration, confidences)


def eval_metrics(report: dict) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) per policy of an eval report: step is the policy's position in report["policies"]
    (pi_init 0, pi_0 1, ...); self-labelling noise of D_i is logged at step i."""
    pols = report.get("policies", [])
    by_step: dict[int, dict[str, float]] = {}

    def put(step: int, prefix: str, value: dict) -> None:
        by_step.setdefault(step, {}).update({f"{prefix}/{k}": v for k, v in flatten(value).items()})

    for pol, v in (report.get("judge_accuracy") or {}).items():
        put(pols.index(pol) if pol in pols else 0, "eval/judge_accuracy", v)
    for pol, v in ((report.get("noise_detection") or {}).get("by_policy") or {}).items():
        put(pols.index(pol) if pol in pols else 0, "eval/noise_detection", v)
    for pol, v in (report.get("pass_rate") or {}).items():
        put(pols.index(pol) if pol in pols else 0, "eval/pass_rate", v)
    for d, v in (report.get("self_label_noise") or {}).items():
        put(int(d.split("_")[-1]) if d.split("_")[-1].isdigit() else 0, "eval/self_label_noise", v)
    return sorted(by_step.items())


def log_eval(recipe, tag: str, report: dict) -> None:
    """An eval report as tracker run ``<name>/eval/<tag>``."""
    if not requested(recipe):
        return
    t = StageTracker(recipe, f"eval/{tag}")
    try:
        for step, metrics in eval_metrics(report):
            t.log_metrics(metrics, step)
    finally:
        t.close()
