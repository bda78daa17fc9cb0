"""SPA's training objective: DPO (Eq. 3), self-refinement (Eq. 10) and de-coupled noise detection (Eq. 11-12),
and the choice between the DPO and the Wasserstein-DRO loss (``preference_loss``)."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from spa_lite.dro import dro_dpo_loss


def dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> torch.Tensor:
    """beta * [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)]: the argument of the DPO sigmoid (Eq. 3)."""
    return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def pair_logits(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``dpo_logits`` of a pair batch's log-probs: rows [0, B) are the chosen responses, [B, 2B) the rejected."""
    n = policy.shape[0] // 2
    return dpo_logits(policy[:n], policy[n:], ref[:n], ref[n:], beta)


def label_smoothing_weights(flagged: torch.Tensor, alpha: float, floor: float = 0.0,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """s = alpha z per pair (Eq. 10, z = 1 for a flagged pair), at least ``floor`` (cDPO's constant smoothing)."""
    return torch.clamp(alpha * flagged.to(dtype), min=floor)


def refined_dpo_loss(logits: torch.Tensor, flagged: torch.Tensor, alpha: float,
                     label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair Eq. 10: -[(1 - s) log sigma(m) + s log sigma(-m)] with s = alpha z, z in {0, 1}.

    z = 0 is the plain DPO loss -log sigma(m) (TRL's ``sigmoid`` loss); z = 1 is label smoothing by alpha,
    which pulls a pair the model doubts toward "either order is possible" instead of trusting its label.
    ``label_smoothing`` is a floor on s for every pair (cDPO), 0 in the paper.
    """
    s = label_smoothing_weights(flagged, alpha, label_smoothing, logits.dtype)
    return -(1.0 - s) * F.logsigmoid(logits) - s * F.logsigmoid(-logits)


def preference_loss(logits: torch.Tensor, flagged: torch.Tensor, spec) -> tuple[torch.Tensor, dict[str, float]]:
    """The sum over pairs of the training loss ``spec.loss`` names, and its statistics.

    "dpo": Eq. 10 per pair (plain DPO for unflagged pairs, label smoothing by ``spec.alpha`` for flagged ones, at
    least ``spec.label_smoothing``). "dro": Eq. 10 = -log sigma(m) + s * [log sigma(m) - log sigma(-m)] with the
    first term replaced by its worst case over the Wasserstein ball (``spa_lite.dro``), so epsilon = 0 is exactly
    the refined loss; with several processes each solves the worst case over its own share of the micro-batch.

    Args:
        logits: beta * DPO margin per pair, [B]; flagged: pairs the refinement doubts, [B] bool.
        spec: the loop's settings (``loss``, ``alpha``, ``label_smoothing``, ``dro_epsilon``, ``dro_pieces``,
            ``dro_xi_min``), e.g. a ``spa_lite.training.LoopSpec``.
    """
    if spec.loss == "dro":
        worst, stats = dro_dpo_loss(logits, spec.dro_epsilon, spec.dro_pieces, spec.dro_xi_min)
        smoothing = label_smoothing_weights(flagged, spec.alpha, spec.label_smoothing, logits.dtype)
        n = logits.shape[0]
        return worst * n + (smoothing * (F.logsigmoid(logits) - F.logsigmoid(-logits))).sum(), stats
    if spec.loss != "dpo":
        raise ValueError(f"unknown loss {spec.loss!r}: dpo or dro")
    return refined_dpo_loss(logits, flagged, spec.alpha, spec.label_smoothing).sum(), {}


class ConfidenceWindow:
    """tau = the K-th percentile of the last ``size`` per-pair confidences (Sec. 4.2 of the paper).

    The window holds confidences of single pairs, not of micro-batch means as the official code does;
    with several processes, callers gather confidences from all of them before ``push``.
    """

    def __init__(self, size: int = 50, k_percent: float = 10.0):
        if not 0 < k_percent < 100:
            raise ValueError(f"k_percent must be in (0, 100), got {k_percent}")
        self.size, self.k_percent = size, k_percent
        self.values: deque[float] = deque(maxlen=size)

    def push(self, confidences: torch.Tensor | list[float]) -> float:
        """Add this batch's confidences and return the new threshold tau."""
        vals = confidences.detach().float().cpu().tolist() if torch.is_tensor(confidences) else list(confidences)
        self.values.extend(vals)
        return self.tau

    @property
    def tau(self) -> float:
        return float(np.percentile(np.asarray(self.values), self.k_percent)) if self.values else float("-inf")

    def state_dict(self) -> dict:
        return {"size": self.size, "k_percent": self.k_percent, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.k_percent = state["size"], state["k_percent"]
        self.values = deque(state["values"], maxlen=self.size)


def lambda_for_iteration(i: int, schedule: list[float] | None = None) -> float:
    """Extrapolation strength of Eq. 12 for iteration i (1-based): 1/2, 1/4, 1/8, then halving."""
    if schedule and i <= len(schedule):
        return float(schedule[i - 1])
    last = schedule[-1] if schedule else 0.5
    start = len(schedule) if schedule else 1
    return float(last) / (2 ** (i - start))
