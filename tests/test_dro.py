"""Tests for spa_lite.dro: exactness against scipy's LP solver, epsilon=0 reduction, gradients."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import spa_lite  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spa_lite.dro import DROSolution, dro_dpo_loss, solve_wasserstein_lp, tangent_pieces


def _scipy_lp_value(xi: np.ndarray, epsilon: float, pieces: int, xi_min: float) -> float:
    """Independent LP in variables alpha_ik, s_ik = alpha_ik * atom_ik, t_ik >= |alpha_ik xi_i - s_ik|.

    max (1/N) sum_ik a_k s_ik + b_k alpha_ik
    s.t. sum_k alpha_ik = 1, xi_min alpha_ik <= s_ik <= alpha_ik, (1/N) sum t_ik <= epsilon,
         t_ik >= alpha_ik xi_i - s_ik, t_ik >= s_ik - alpha_ik xi_i, alpha >= 0.
    """
    scipy_opt = pytest.importorskip("scipy.optimize")
    from scipy.sparse import lil_matrix

    n, k = len(xi), pieces
    a = np.array([-1.0 / t for t in _tangent_points(pieces, xi_min)])
    b = np.array([1.0 - np.log(t) for t in _tangent_points(pieces, xi_min)])
    m = n * k
    ia, is_, it = 0, m, 2 * m  # variable blocks: alpha, s, t
    c = np.zeros(3 * m)
    for i in range(n):
        for j in range(k):
            c[ia + i * k + j] = -b[j] / n
            c[is_ + i * k + j] = -a[j] / n
    rows = 4 * m + 1
    A = lil_matrix((rows, 3 * m))
    ub = np.zeros(rows)
    r = 0
    for i in range(n):
        for j in range(k):
            p = i * k + j
            A[r, is_ + p], A[r, ia + p] = -1.0, xi_min  # xi_min alpha - s <= 0
            r += 1
            A[r, is_ + p], A[r, ia + p] = 1.0, -1.0  # s - alpha <= 0
            r += 1
            A[r, ia + p], A[r, is_ + p], A[r, it + p] = xi[i], -1.0, -1.0  # alpha xi - s - t <= 0
            r += 1
            A[r, ia + p], A[r, is_ + p], A[r, it + p] = -xi[i], 1.0, -1.0  # s - alpha xi - t <= 0
            r += 1
    for p in range(m):
        A[r, it + p] = 1.0 / n
    ub[r] = epsilon
    Aeq = lil_matrix((n, 3 * m))
    for i in range(n):
        for j in range(k):
            Aeq[i, ia + i * k + j] = 1.0
    bounds = [(0, None)] * m + [(None, None)] * m + [(0, None)] * m
    res = scipy_opt.linprog(
        c, A_ub=A.tocsr(), b_ub=ub, A_eq=Aeq.tocsr(), b_eq=np.ones(n), bounds=bounds, method="highs"
    )
    assert res.status == 0, res.message
    return -res.fun


def _tangent_points(pieces: int, xi_min: float) -> list[float]:
    return [xi_min ** (1.0 - j / (pieces - 1)) for j in range(pieces)]


def _instances():
    rng = np.random.default_rng(1234)
    out = []
    for case in range(22):
        n = int(rng.choice([1, 2, 5, 16, 40, 64]))
        k = int(rng.choice([2, 3, 8, 16]))
        xi_min = float(rng.choice([1e-3, 1e-2, 0.05]))
        eps = float(rng.choice([0.0, 1e-6, 1e-3, 0.01, 0.05, 0.2, 1.0, 10.0]))
        kind = case % 3
        if kind == 0:
            xi = rng.uniform(xi_min, 1.0, n)
        elif kind == 1:  # near xi_min, some exactly on it
            xi = xi_min + rng.exponential(xi_min, n)
            xi[rng.random(n) < 0.2] = xi_min
        else:  # near 1, some exactly 1
            xi = 1.0 - rng.exponential(1e-3, n)
            xi[rng.random(n) < 0.2] = 1.0
        out.append((np.clip(xi, xi_min, 1.0), eps, k, xi_min))
    return out


INSTANCES = _instances()


def _check_feasible(sol: DROSolution, xi: np.ndarray, eps: float, xi_min: float) -> None:
    n = len(xi)
    assert np.all(sol.alpha >= 0.0)
    np.testing.assert_allclose(sol.alpha.sum(axis=1), 1.0, atol=1e-12)
    assert np.abs(sol.q).sum() / n <= eps + 1e-12
    assert np.all(sol.q[sol.alpha == 0.0] == 0.0)
    pos = sol.alpha > 0.0
    atoms = (xi[:, None] - np.where(pos, sol.q, 0.0) / np.where(pos, sol.alpha, 1.0))[pos]
    assert np.all(atoms >= xi_min - 1e-12) and np.all(atoms <= 1.0 + 1e-12)
    if eps > 0:
        assert 0.0 <= sol.budget_used <= 1.0 + 1e-9
    else:
        assert sol.budget_used == 0.0 and sol.pairs_moved == 0
    assert sol.pairs_moved == int(np.sum(np.any(sol.q != 0.0, axis=1)))


@pytest.mark.parametrize("idx", range(len(INSTANCES)))
def test_matches_scipy_linprog(idx):
    xi, eps, k, xi_min = INSTANCES[idx]
    sol = solve_wasserstein_lp(xi, eps, k, xi_min)
    _check_feasible(sol, xi, eps, xi_min)
    ref = _scipy_lp_value(xi, eps, k, xi_min)
    assert sol.value == pytest.approx(ref, abs=1e-6, rel=1e-8)
    # the returned (alpha, q) attains the returned value
    a, b = tangent_pieces(k, xi_min)
    obj = np.sum(a * (sol.alpha * xi[:, None] - sol.q) + b * sol.alpha) / len(xi)
    assert obj == pytest.approx(sol.value, abs=1e-12)
    assert sol.value >= sol.empirical - 1e-12


def test_tangent_pieces_envelope():
    for k, xi_min in [(2, 1e-3), (8, 1e-3), (16, 0.05)]:
        a, b = tangent_pieces(k, xi_min)
        assert a.shape == b.shape == (k,)
        assert np.all(np.diff(a) > 0) and np.all(a < 0)  # steepest first, all decreasing
        x = np.geomspace(xi_min, 1.0, 2001)
        env = np.max(a[None] * x[:, None] + b[None], axis=1)
        assert np.all(env <= -np.log(x) + 1e-12)  # tangents lie below a convex function
        assert np.all(np.diff(env) < 0)  # decreasing
        assert env[0] == pytest.approx(-np.log(xi_min), abs=1e-12)
        assert env[-1] == pytest.approx(0.0, abs=1e-12)
        pts = np.array(_tangent_points(k, xi_min))
        np.testing.assert_allclose(np.max(a[None] * pts[:, None] + b[None], axis=1), -np.log(pts), atol=1e-12)


def test_value_monotone_in_epsilon_and_saturates():
    rng = np.random.default_rng(7)
    xi_min = 1e-3
    xi = rng.uniform(xi_min, 1.0, 32)
    eps_grid = [0.0, 1e-5, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 5.0]
    vals = [solve_wasserstein_lp(xi, e, 8, xi_min).value for e in eps_grid]
    assert vals[0] == pytest.approx(solve_wasserstein_lp(xi, 0.0, 8, xi_min).empirical, abs=0)
    assert all(v2 >= v1 - 1e-12 for v1, v2 in zip(vals, vals[1:]))
    assert vals[1] > vals[0]
    # once the budget covers moving everything, all mass sits at xi_min
    assert vals[-1] == pytest.approx(-np.log(xi_min), abs=1e-9)
    big = solve_wasserstein_lp(xi, 5.0, 8, xi_min)
    assert big.pairs_moved == len(xi) and big.budget_used < 1.0


def test_knapsack_order_moves_worst_pairs_first():
    xi = np.array([0.9, 0.5, 0.02, 0.2])
    sol = solve_wasserstein_lp(xi, 0.004, 8, 1e-3)
    # the smallest xi (best gain per unit of transport) absorbs the whole small budget
    assert sol.pairs_moved == 1 and np.any(sol.q[2] > 0)
    assert sol.budget_used == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_epsilon_zero_is_dpo_sigmoid_loss(dtype):
    torch.manual_seed(0)
    z = (torch.randn(37, dtype=dtype) * 4).requires_grad_(True)
    with torch.no_grad():
        z[0], z[1] = -60.0, 60.0  # extreme logits, also below the xi_min clamp
    loss, metrics = dro_dpo_loss(z, 0.0, pieces=8, xi_min=1e-3)
    (g,) = torch.autograd.grad(loss, z)
    z2 = z.detach().clone().requires_grad_(True)
    ref = -F.logsigmoid(z2).mean()  # TRL's loss_type="sigmoid" with label_smoothing = 0
    (g_ref,) = torch.autograd.grad(ref, z2)
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=1e-7 if dtype == torch.float64 else 1e-6, atol=1e-12)
    torch.testing.assert_close(loss, F.softplus(-z2).mean(), rtol=0, atol=0)
    assert metrics["dro_pairs_moved"] == 0 and metrics["dro_budget_used"] == 0.0
    assert metrics["dro_worst_case_loss"] == metrics["dro_empirical_loss"]
    assert set(metrics) == {"dro_worst_case_loss", "dro_empirical_loss", "dro_budget_used", "dro_pairs_moved"}


def _frozen_loss(z: torch.Tensor, sol: DROSolution, xi_min: float) -> torch.Tensor:
    """E_Q[-log] with alpha and displacement d = q/alpha frozen; atom_ik = sigmoid(z_i) - d_ik."""
    n = z.shape[0]
    total = z.new_zeros(())
    for i in range(n):
        for k in range(sol.alpha.shape[1]):
            a = sol.alpha[i, k]
            if a == 0.0:
                continue
            d = sol.q[i, k] / a
            if d == 0.0:
                total = total + a * F.softplus(-z[i])
            else:
                total = total - a * torch.log(torch.sigmoid(z[i]) - d)
    return total / n


@pytest.mark.parametrize("eps", [1e-3, 0.02, 0.1, 0.5])
def test_gradient_follows_danskin_fixed_displacement(eps):
    torch.manual_seed(1)
    xi_min = 1e-2
    z = (torch.randn(24, dtype=torch.float64) * 2.5).requires_grad_(True)
    loss, metrics = dro_dpo_loss(z, eps, pieces=6, xi_min=xi_min)
    (g,) = torch.autograd.grad(loss, z)
    xi = torch.sigmoid(z.detach()).clamp(xi_min, 1.0).numpy()
    sol = solve_wasserstein_lp(xi, eps, 6, xi_min)
    assert sol.pairs_moved > 0
    assert metrics["dro_worst_case_loss"] == pytest.approx(sol.value)
    assert metrics["dro_worst_case_loss"] >= metrics["dro_empirical_loss"]
    # value: true -log expectation under the worst-case Q
    z0 = z.detach().clone()
    torch.testing.assert_close(loss.detach(), _frozen_loss(z0, sol, xi_min), rtol=1e-12, atol=1e-12)
    # gradient: autograd and central finite differences of the frozen-(alpha, q) loss
    zf = z0.clone().requires_grad_(True)
    (g_frozen,) = torch.autograd.grad(_frozen_loss(zf, sol, xi_min), zf)
    torch.testing.assert_close(g, g_frozen, rtol=1e-10, atol=1e-12)
    h = 1e-6
    fd = torch.zeros_like(z0)
    for i in range(len(z0)):
        e = torch.zeros_like(z0)
        e[i] = h
        fd[i] = (_frozen_loss(z0 + e, sol, xi_min) - _frozen_loss(z0 - e, sol, xi_min)) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-7)
    # moved mass at xi_min pulls harder than unmoved mass: grad = -(alpha/N) sigma'(z)/atom
    moved_rows = np.flatnonzero(np.any(sol.q > 0, axis=1))
    sp_grad = -(1 - torch.sigmoid(z0)) / len(z0)
    assert torch.all(g[moved_rows] < sp_grad[moved_rows])


def test_loss_not_below_plain_dpo_and_float32_finite():
    torch.manual_seed(2)
    z = (torch.randn(64) * 3).requires_grad_(True)
    plain = F.softplus(-z.detach()).mean()
    prev = plain
    for eps in [1e-4, 1e-2, 0.1, 1.0]:
        loss, m = dro_dpo_loss(z, eps)
        assert torch.isfinite(loss)
        assert loss.detach() >= prev - 1e-5  # more budget, more mass at xi_min
        prev = loss.detach()
        (g,) = torch.autograd.grad(loss, z)
        assert torch.all(torch.isfinite(g))
        assert 0.0 <= m["dro_budget_used"] <= 1.0 + 1e-6


def test_argument_validation():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="epsilon"):
        dro_dpo_loss(z, -0.1)
    with pytest.raises(ValueError, match="pieces"):
        dro_dpo_loss(z, 0.1, pieces=1)
    with pytest.raises(ValueError, match="xi_min"):
        dro_dpo_loss(z, 0.1, xi_min=0.0)
    with pytest.raises(ValueError, match="xi_min"):
        dro_dpo_loss(z, 0.1, xi_min=1.0)
    with pytest.raises(ValueError, match="logits"):
        dro_dpo_loss(torch.zeros(2, 2), 0.1)
    with pytest.raises(ValueError, match="epsilon"):
        solve_wasserstein_lp(np.array([0.5]), float("nan"), 4, 1e-3)
    with pytest.raises(ValueError, match="pieces"):
        tangent_pieces(1, 1e-3)
