"""Tests for spa_lite.metrics against independent references (sklearn, scipy, brute force)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

try:
    import spa_lite  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spa_lite.metrics import (
    accuracy_with_ci,
    auroc,
    bootstrap_ci,
    flip_labels,
    pass_rate_with_ci,
    precision_at_k_percent,
    summarize,
    wilson_interval,
    win_rate,
)

# ---------------------------------------------------------------- Wilson

def test_wilson_worked_example_8_of_10():
    # Hand-derived in the wilson_interval docstring: (0.490157, 0.943319).
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490157, abs=1e-6)
    assert high == pytest.approx(0.943319, abs=1e-6)


def test_wilson_empty_is_nan():
    low, high = wilson_interval(0, 0)
    assert math.isnan(low) and math.isnan(high)


def test_wilson_invalid_raises():
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


@pytest.mark.parametrize("k,n", [(0, 1), (0, 7), (1, 1), (3, 7), (8, 10), (50, 100), (99, 100), (1, 1000)])
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n, z=float(stats.norm.ppf(0.975)))
    assert low == pytest.approx(ref.low, abs=1e-9)
    assert high == pytest.approx(ref.high, abs=1e-9)


def test_accuracy_and_pass_rate_keys():
    flags = [True] * 8 + [False] * 2
    acc = accuracy_with_ci(flags)
    assert set(acc) == {"n", "accuracy", "ci_low", "ci_high"}
    assert acc["n"] == 10 and acc["accuracy"] == pytest.approx(0.8)
    assert (acc["ci_low"], acc["ci_high"]) == wilson_interval(8, 10)
    pr = pass_rate_with_ci(flags)
    assert set(pr) == {"n", "pass_rate", "ci_low", "ci_high"}
    assert pr["pass_rate"] == acc["accuracy"] and pr["ci_low"] == acc["ci_low"]
    empty = accuracy_with_ci([])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["ci_low"])


# ---------------------------------------------------------------- AUROC

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(seed, ties):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 300
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 0.8 * labels
    if ties:
        scores = np.round(scores * 2) / 2  # many tied values, across classes
    assert auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_small_cases():
    assert auroc([0.1, 0.9], [0, 1]) == 1.0
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    # pairwise brute force with ties at 1/2
    s = np.array([1, 2, 2, 3, 3, 3, 4.0])
    y = np.array([0, 1, 0, 1, 0, 1, 1], bool)
    pos, neg = s[y], s[~y]
    brute = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert auroc(s, y) == pytest.approx(brute)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0]])
def test_auroc_one_class_raises(labels):
    with pytest.raises(ValueError, match="one class"):
        auroc([0.1, 0.2, 0.3], labels)


# ---------------------------------------------------------------- precision@k%

def _brute_precision(scores, labels, k_percent, lowest):
    n = len(scores)
    k = max(1, int(round(k_percent / 100 * n)))
    items = sorted(range(n), key=lambda i: (scores[i] if lowest else -scores[i], i))
    return sum(bool(labels[i]) for i in items[:k]) / k


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k_percent", [0.1, 5, 10, 33.3, 50, 100])
@pytest.mark.parametrize("lowest", [True, False])
def test_precision_at_k_matches_brute_force(seed, k_percent, lowest):
    rng = np.random.default_rng(seed)
    n = 97
    scores = np.round(rng.normal(size=n), 1)  # ties present
    labels = rng.random(n) < 0.4
    got = precision_at_k_percent(scores, labels, k_percent, lowest=lowest)
    assert got == pytest.approx(_brute_precision(scores.tolist(), labels.tolist(), k_percent, lowest))


def test_precision_at_k_direction_and_min_one():
    scores = [0.1, 0.2, 0.8, 0.9]
    labels = [1, 1, 0, 0]
    assert precision_at_k_percent(scores, labels, 50) == 1.0
    assert precision_at_k_percent(scores, labels, 50, lowest=False) == 0.0
    assert precision_at_k_percent(scores, labels, 1) == 1.0  # rounds to 0 -> at least one item
    # stable tie-break: equal scores, earlier index wins
    assert precision_at_k_percent([0.5, 0.5], [0, 1], 50) == 0.0
    assert precision_at_k_percent([0.5, 0.5], [0, 1], 50, lowest=False) == 0.0


# ---------------------------------------------------------------- flip_labels

@pytest.mark.parametrize("n,fraction", [(0, 0.3), (10, 0.0), (10, 0.25), (101, 0.2), (1000, 0.333), (7, 1.0)])
def test_flip_labels_count_and_determinism(n, fraction):
    a = flip_labels(n, fraction, seed=3)
    assert a.dtype == bool and a.shape == (n,)
    assert int(a.sum()) == round(fraction * n)
    np.testing.assert_array_equal(a, flip_labels(n, fraction, seed=3))


def test_flip_labels_seed_changes_selection():
    assert not np.array_equal(flip_labels(1000, 0.2, seed=0), flip_labels(1000, 0.2, seed=1))


# ---------------------------------------------------------------- bootstrap / win rate / summarize

def test_bootstrap_contains_mean_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(loc=2.0, scale=1.0, size=5000)
    low, high = bootstrap_ci(x, seed=7)
    assert low < x.mean() < high
    assert high - low < 0.2  # ~ 2*1.96/sqrt(5000) = 0.055
    assert bootstrap_ci(x, seed=7) == (low, high)
    assert bootstrap_ci(x, seed=8) != (low, high)


def test_bootstrap_custom_stat():
    x = np.arange(101, dtype=float)
    low, high = bootstrap_ci(x, stat=np.median, n_boot=300, seed=0)
    assert low <= 50 <= high


def test_win_rate():
    out = [1, 1, 0, 0.5, 1, 0, 1, 0.5]
    wr = win_rate(out)
    assert set(wr) == {"n", "win_rate", "ci_low", "ci_high"}
    assert wr["n"] == 8 and wr["win_rate"] == pytest.approx(np.mean(out))
    assert 0.0 <= wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"] <= 1.0
    assert (wr["ci_low"], wr["ci_high"]) == bootstrap_ci(out, seed=0)
    with pytest.raises(ValueError):
        win_rate([1, 2])


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, 10.0])
    assert s == pytest.approx({"n": 4, "mean": 4.0, "std": float(np.std([1, 2, 3, 10])),
                               "median": 2.5, "min": 1.0, "max": 10.0})
    e = summarize([])
    assert e["n"] == 0 and all(math.isnan(e[k]) for k in ("mean", "std", "median", "min", "max"))


def test_paired_difference_identical_policies_is_zero():
    from spa_lite.metrics import paired_difference

    a = np.random.default_rng(0).integers(0, 2, 300)
    r = paired_difference(a, a)
    assert r["diff"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0 and r["n"] == 300


def test_paired_difference_matches_scipy_paired_bootstrap():
    """Unclustered: the same percentile interval as scipy's paired bootstrap (independent implementation)."""
    from scipy import stats

    from spa_lite.metrics import paired_difference

    rng = np.random.default_rng(1)
    a = (rng.random(500) < 0.55).astype(float)
    b = np.where(rng.random(500) < 0.7, a, (rng.random(500) < 0.45).astype(float))
    ours = paired_difference(a, b, n_boot=20000, seed=3)
    ref = stats.bootstrap((a, b), lambda x, y: np.mean(x - y), paired=True, vectorized=False, n_resamples=20000,
                          method="percentile", random_state=4).confidence_interval
    assert ours["diff"] == pytest.approx(float(np.mean(a - b)))
    assert ours["ci_low"] == pytest.approx(ref.low, abs=0.006)
    assert ours["ci_high"] == pytest.approx(ref.high, abs=0.006)


def test_paired_difference_clusters_resample_whole_questions():
    """Clusters of k identical copies carry the evidence of one unit: the clustered interval equals the
    unclustered interval of the cluster means, and is wider than treating the copies as independent."""
    from spa_lite.metrics import paired_difference

    rng = np.random.default_rng(2)
    d = rng.normal(0.05, 0.5, 60)
    k = 8
    x = np.repeat(d, k)
    cl = np.repeat(np.arange(60), k)
    clustered = paired_difference(x, np.zeros_like(x), clusters=cl, n_boot=20000, seed=5)
    means = paired_difference(d, np.zeros_like(d), n_boot=20000, seed=5)
    naive = paired_difference(x, np.zeros_like(x), n_boot=20000, seed=5)
    assert clustered["n_clusters"] == 60 and clustered["n"] == 480
    assert clustered["ci_low"] == pytest.approx(means["ci_low"], abs=1e-12)
    assert clustered["ci_high"] == pytest.approx(means["ci_high"], abs=1e-12)
    assert (clustered["ci_high"] - clustered["ci_low"]) > 2 * (naive["ci_high"] - naive["ci_low"])
    with pytest.raises(ValueError, match="equal length"):
        paired_difference([1, 0], [1])
