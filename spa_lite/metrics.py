"""Evaluation metric math (numpy only).

Confidence intervals, ranking metrics for noise detectors, label flipping for
synthetic-noise experiments and small summary helpers.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "wilson_interval",
    "accuracy_with_ci",
    "bootstrap_ci",
    "auroc",
    "precision_at_k_percent",
    "flip_labels",
    "pass_rate_with_ci",
    "win_rate",
    "summarize",
    "paired_difference",
    "confidence_histogram",
]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z=1.96).

    With p = k/n::

        centre = (p + z^2/(2n)) / (1 + z^2/n)
        half   = z * sqrt(p(1-p)/n + z^2/(4n^2)) / (1 + z^2/n)

    Worked example, 8/10, z=1.96 (z^2 = 3.8416): denominator 1.38416,
    centre = 0.99208/1.38416 = 0.716738, half = 1.96*sqrt(0.025604)/1.38416
    = 0.226581, so the interval is (0.490157, 0.943319).

    ``n == 0`` gives ``(nan, nan)``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _proportion_with_ci(flags: Sequence[bool], key: str) -> dict:
    arr = np.asarray(flags, dtype=bool).ravel()
    n = int(arr.size)
    k = int(arr.sum())
    low, high = wilson_interval(k, n)
    return {"n": n, key: (k / n if n else math.nan), "ci_low": low, "ci_high": high}


def accuracy_with_ci(correct: Sequence[bool]) -> dict:
    """Accuracy with a Wilson 95% CI: keys ``n, accuracy, ci_low, ci_high``."""
    return _proportion_with_ci(correct, "accuracy")


def pass_rate_with_ci(passed: Sequence[bool]) -> dict:
    """Pass rate with a Wilson 95% CI: keys ``n, pass_rate, ci_low, ci_high``."""
    return _proportion_with_ci(passed, "pass_rate")


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(1 - alpha)`` CI of ``stat``; deterministic for a seed.

    Empty input gives ``(nan, nan)``.
    """
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        return (math.nan, math.nan)
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    samples = arr[idx]
    if stat is np.mean:
        boots = samples.mean(axis=1)
    else:
        boots = np.array([float(stat(s)) for s in samples])
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (O(n log n))."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    run_ids = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(x.size, dtype=float)
    ranks[order] = avg[run_ids]
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """P(random positive scores higher than random negative), ties count 1/2.

    Computed from the Mann-Whitney U statistic with average ranks.
    Raises ``ValueError`` if only one class is present.
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC is undefined with only one class present (positives={n_pos}, negatives={n_neg})"
        )
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_at_k_percent(
    scores: Sequence[float],
    labels: Sequence[bool],
    k_percent: float,
    lowest: bool = True,
) -> float:
    """Precision among the ``k_percent``% of items with the lowest (or highest) scores.

    ``lowest=True`` selects the lowest scores (noise detectors flag
    low-confidence pairs). The count is ``round(k_percent/100 * n)``, at least 1.
    Ties are broken by a stable sort (earlier index first).
    """
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}")
    if s.size == 0:
        raise ValueError("precision_at_k_percent needs at least one item")
    if not 0.0 < k_percent <= 100.0:
        raise ValueError(f"k_percent must be in (0, 100], got {k_percent}")
    k = min(s.size, max(1, int(round(k_percent / 100.0 * s.size))))
    key = s if lowest else -s
    top = np.argsort(key, kind="stable")[:k]
    return float(y[top].mean())


def flip_labels(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of length ``n`` with exactly ``round(fraction*n)`` True entries.

    Indices are drawn without replacement with ``np.random.default_rng(seed)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * n))
    mask = np.zeros(n, dtype=bool)
    if k:
        rng = np.random.default_rng(seed)
        mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def win_rate(outcomes: Sequence[float]) -> dict:
    """Win rate over outcomes 1 (win), 0 (loss), 0.5 (tie) with a bootstrap CI (seed 0).

    Keys ``n, win_rate, ci_low, ci_high``; empty input gives nans.
    """
    arr = np.asarray(outcomes, dtype=float).ravel()
    bad = ~np.isin(arr, (0.0, 0.5, 1.0))
    if bad.any():
        raise ValueError(f"outcomes must be 0, 0.5 or 1; got {arr[bad][:5].tolist()}")
    n = int(arr.size)
    low, high = bootstrap_ci(arr, seed=0)
    return {
        "n": n,
        "win_rate": float(arr.mean()) if n else math.nan,
        "ci_low": low,
        "ci_high": high,
    }


def summarize(values: Sequence[float]) -> dict:
    """Keys ``n, mean, std, median, min, max`` (std is population, ddof=0); empty gives n=0 and nans."""
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        nan = math.nan
        return {"n": 0, "mean": nan, "std": nan, "median": nan, "min": nan, "max": nan}
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    clusters: Sequence | None = None,
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Mean of ``a - b`` over paired units (the same prompts, decoded the same way) with a percentile
    bootstrap ``(1 - alpha)`` interval.

    With ``clusters`` (e.g. the question each prompt was built from), whole clusters are resampled, so
    prompts that share a question are not counted as independent evidence; the statistic is the pooled
    mean difference of the resampled units. Returns ``diff, ci_low, ci_high, n, n_clusters, n_boot``.
    """
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.asarray(a).shape != np.asarray(b).shape or x.ndim != 1:
        raise ValueError(f"paired_difference: a and b must be 1-d and of equal length, got {np.shape(a)} and {np.shape(b)}")
    if x.size == 0:
        return {"diff": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "n_clusters": 0, "n_boot": n_boot}
    keys = np.arange(x.size) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    if keys.shape != x.shape:
        raise ValueError(f"paired_difference: {len(keys)} cluster labels for {x.size} units")
    n_c = int(keys.max()) + 1
    sums = np.bincount(keys, weights=x, minlength=n_c)
    counts = np.bincount(keys, minlength=n_c).astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_c, size=(n_boot, n_c))
    boots = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"diff": float(x.mean()), "ci_low": float(low), "ci_high": float(high), "n": int(x.size),
            "n_clusters": n_c, "n_boot": n_boot}


def confidence_histogram(conf: list[float], bins: int = 10) -> dict:
    """Counts of judged confidences max(p, 1-p) in ``bins`` equal bins over [0.5, 1] (the last bin closed)."""
    edges = [round(0.5 + 0.5 * k / bins, 4) for k in range(bins + 1)]
    counts = [0] * bins
    for c in conf:
        counts[min(bins - 1, max(0, int((c - 0.5) * 2 * bins)))] += 1
    return {"edges": edges, "counts": counts}
