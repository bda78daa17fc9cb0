"""Wasserstein distributionally robust DPO loss (pure math, no model code).

For a batch of N preference pairs with logits ``z_i = beta * margin_i`` let
``xi_i = clamp(sigmoid(z_i), xi_min, 1)`` and ``l(xi) = -log(xi)``.  ``l`` is replaced by
the envelope ``L(x) = max_k (a_k x + b_k)`` of K tangents of ``-log`` and the worst case of
``E_Q[L]`` over the type-1 Wasserstein ball of radius ``epsilon`` around the empirical
distribution is computed *exactly* with the finite LP of Mohajerin Esfahani & Kuhn (2018).
Because ``L`` is convex and decreasing on ``[xi_min, 1]`` that LP is a fractional knapsack:
move mass of the atoms with the best gain per unit of transport all the way down to
``xi_min`` until the budget is spent.  The training loss is the expected true loss
``-log`` under the worst-case distribution, with the LP solution held fixed (Danskin).
See docs/dro.md for the derivation and the gradient convention.

Everything in the solver is float64 numpy; the returned ``alpha`` and ``q`` are numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DROSolution", "tangent_pieces", "solve_wasserstein_lp", "dro_dpo_loss"]


@dataclass
class DROSolution:
    """Optimal solution of the Wasserstein LP (numpy float64 arrays).

    The worst-case distribution puts mass ``alpha[i, k] / N`` on the atom
    ``xi[i] - q[i, k] / alpha[i, k]`` (entries with ``alpha == 0`` carry no mass).
    """

    value: float  # optimal LP value: worst-case expected envelope loss
    empirical: float  # (1/N) sum_i max_k l_k(xi_i)
    alpha: np.ndarray  # [N, K] mass fractions, rows sum to 1
    q: np.ndarray  # [N, K] displacement * mass, atom = xi - q/alpha (q >= 0 here)
    budget_used: float  # (1/N) sum |q| / epsilon  (0 when epsilon == 0)
    pairs_moved: int  # number of pairs with any mass moved


def _check_args(epsilon: float, pieces: int, xi_min: float) -> None:
    if isinstance(pieces, bool) or not isinstance(pieces, (int, np.integer)):
        raise ValueError(f"pieces must be an integer >= 2, got {pieces!r}")
    if pieces < 2:
        raise ValueError(f"pieces must be >= 2, got {pieces}")
    if not (np.isfinite(xi_min) and 0.0 < xi_min < 1.0):
        raise ValueError(f"xi_min must satisfy 0 < xi_min < 1, got {xi_min!r}")
    if not (np.isfinite(epsilon) and epsilon >= 0.0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")


def tangent_pieces(pieces: int, xi_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Slopes a_k and intercepts b_k of l_k(x) = a_k x + b_k, tangents of -log.

    The tangent points are geometrically spaced, ``t_k = xi_min ** (1 - k/(K-1))``, so
    ``t_0 = xi_min`` and ``t_{K-1} = 1``.  The tangent of ``-log`` at ``t`` is
    ``-x/t + 1 - log t``.  Pieces are ordered from steepest (k=0, active at xi_min) to
    flattest (k=K-1, active at 1); hence ``L(xi_min) = -log xi_min`` and ``L(1) = 0``.
    """
    _check_args(0.0, pieces, xi_min)
    frac = np.arange(pieces, dtype=np.float64) / (pieces - 1)
    log_t = (1.0 - frac) * np.log(xi_min)
    t = np.exp(log_t)
    t[0], t[-1] = xi_min, 1.0
    log_t[0], log_t[-1] = np.log(xi_min), 0.0
    return -1.0 / t, 1.0 - log_t


def solve_wasserstein_lp(xi: np.ndarray, epsilon: float, pieces: int, xi_min: float) -> DROSolution:
    """Solve max_{alpha, q} (1/N) sum_ik alpha_ik l_k(xi_i - q_ik/alpha_ik) exactly.

    Constraints: alpha >= 0, sum_k alpha_ik = 1, (1/N) sum |q| <= epsilon and atoms in
    [xi_min, 1].  ``xi`` must already lie in [xi_min, 1] (values outside are clamped).
    Fractional knapsack: atom i can move at most its whole mass 1/N down to xi_min at cost
    (xi_i - xi_min)/N with gain rate g_i = (L(xi_min) - L(xi_i)) / (xi_i - xi_min), the best
    rate any move of atom i can achieve; atoms are filled in order of decreasing g_i.
    """
    _check_args(epsilon, pieces, xi_min)
    x = np.clip(np.asarray(xi, dtype=np.float64).reshape(-1), xi_min, 1.0)
    n = x.shape[0]
    if n == 0:
        raise ValueError("xi must contain at least one element")
    a, b = tangent_pieces(pieces, xi_min)
    vals = x[:, None] * a[None, :] + b[None, :]  # [N, K]
    k_star = np.argmax(vals, axis=1)  # active piece at xi_i
    env = vals[np.arange(n), k_star]  # L(xi_i)
    l_min = a[0] * xi_min + b[0]  # L(xi_min) = -log(xi_min); piece 0 is active there

    alpha = np.zeros((n, pieces), dtype=np.float64)
    q = np.zeros((n, pieces), dtype=np.float64)
    alpha[np.arange(n), k_star] = 1.0

    dist = x - xi_min  # transport distance of a full move, >= 0
    cap = dist / n  # transport cost of moving the whole atom
    if epsilon > 0.0:
        movable = dist > 0.0
        gain = np.zeros(n)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain[movable] = (l_min - env[movable]) / dist[movable]
        # On piece 0 the envelope is linear down to xi_min: the rate is exactly -a_0.
        gain[movable & (k_star == 0)] = -a[0]
        order = np.argsort(-gain, kind="stable")
        order = order[movable[order]]
        c = cap[order]
        before = np.cumsum(c) - c
        spent = np.clip(epsilon - before, 0.0, c)  # transport cost given to each atom
        frac = np.where(c > 0.0, spent / np.where(c > 0.0, c, 1.0), 0.0)
        frac = np.where(spent >= c, 1.0, frac)  # full moves exactly 1
        for i, f in zip(order[frac > 0.0], frac[frac > 0.0]):
            k = k_star[i]
            if k == 0:
                # Same linear piece at xi_i and xi_min: the LP cannot hold two atoms on one
                # piece, so the moved fraction is expressed by shifting the single atom.
                alpha[i, 0] = 1.0
                q[i, 0] = f * dist[i]
            else:
                alpha[i, k] = 1.0 - f
                alpha[i, 0] = f
                q[i, 0] = f * dist[i]  # atom xi_i - q/alpha = xi_min

    empirical = float(env.mean())
    used = float(np.abs(q).sum() / n / epsilon) if epsilon > 0.0 else 0.0
    moved = int(np.count_nonzero(np.any(q != 0.0, axis=1)))
    if moved:
        value = float(np.sum(a[None, :] * (alpha * x[:, None] - q) + b[None, :] * alpha) / n)
    else:
        value = empirical  # nothing moved: the LP value is the empirical envelope loss, bit for bit
    return DROSolution(value=value, empirical=empirical, alpha=alpha, q=q, budget_used=used, pairs_moved=moved)


def dro_dpo_loss(
    logits: torch.Tensor, epsilon: float, pieces: int = 8, xi_min: float = 1e-3
) -> tuple[torch.Tensor, dict[str, float]]:
    """logits = beta * DPO margin per pair, shape [N]. Returns (scalar loss, metrics) with metrics keys
    'dro_worst_case_loss', 'dro_empirical_loss', 'dro_budget_used', 'dro_pairs_moved'.

    The loss is E_Q[-log xi] under the worst-case distribution Q of the envelope LP, with
    (alpha, q) held fixed: unmoved mass contributes ``softplus(-z_i)``; moved mass sits at
    ``xi_i - q/alpha`` with the displacement fixed, so its gradient flows through
    ``xi_i = sigmoid(z_i)``.  With epsilon == 0 this is exactly ``mean(softplus(-z))``.
    """
    _check_args(epsilon, pieces, xi_min)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 1 or logits.numel() == 0:
        raise ValueError("logits must be a non-empty 1-D tensor of shape [N]")
    if not torch.is_floating_point(logits):
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    n = logits.shape[0]
    xi_np = torch.sigmoid(logits.detach().to(torch.float64)).clamp(xi_min, 1.0).cpu().numpy()
    sol = solve_wasserstein_lp(xi_np, epsilon, pieces, xi_min)

    unmoved_w = np.where(sol.q == 0.0, sol.alpha, 0.0).sum(axis=1)
    sp = F.softplus(-logits)
    if sol.pairs_moved == 0:
        loss = sp.mean()  # no reweighting at all: bit-identical to the plain sigmoid DPO loss
    else:
        w = torch.as_tensor(unmoved_w, dtype=logits.dtype, device=logits.device)
        loss = (w * sp).mean()
        rows, cols = np.nonzero(sol.q)
        mass = sol.alpha[rows, cols]
        atom = xi_np[rows] - sol.q[rows, cols] / mass  # fixed-displacement atom value
        atom = np.maximum(atom, xi_min)  # guard against rounding; equals xi_min for full moves
        idx = torch.as_tensor(rows, dtype=torch.long, device=logits.device)
        sig = torch.sigmoid(logits)[idx]
        # value = atom exactly; d(atom)/dz = d sigmoid(z_i)/dz (displacement held fixed)
        atom_t = torch.as_tensor(atom, dtype=logits.dtype, device=logits.device) + (sig - sig.detach())
        mass_t = torch.as_tensor(mass, dtype=logits.dtype, device=logits.device)
        loss = loss + (mass_t * -torch.log(atom_t)).sum() / n

    metrics = {
        "dro_worst_case_loss": sol.value,
        "dro_empirical_loss": sol.empirical,
        "dro_budget_used": sol.budget_used,
        "dro_pairs_moved": float(sol.pairs_moved),
    }
    return loss, metrics
