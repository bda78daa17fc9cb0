"""Signs that a D_i's self-labels are poor, read without a verifier (issue 19, point 5).

A judge can label its own policy's samples at chance while every summary number looks healthy
(bench/judge_quality.py measured it on the demo task). The signs below need no gold label, only D_i and the gold
seed pairs D0. Each is one line printed by ``expand`` and kept in its manifest (``summary.label_signs``); the
README's "Signs of bad self-labels" says what each means and what to try. Their thresholds come from the dev
sweep of bench/judge_quality.py (bench/RESULTS.md, "judge quality"), not from the evaluation prompts.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence

log = logging.getLogger("spa_lite")

# chosen-longer share of D_i more than this far from the gold pairs' own share: the judge leans on length
LENGTH_LEAN = 0.2
# more than this share of pairs judged with confidence under FLAT_BELOW: the labels are mostly coin flips
FLAT_SHARE, FLAT_BELOW = 0.5, 0.55
# two judges (expand.judge: logprob+reward) pick the same response in fewer than this share of pairs
AGREE_MIN = 0.6


def chosen_longer_share(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Share of (chosen, rejected) text pairs whose chosen response has more characters."""
    return statistics.fmean(len(c) > len(r) for c, r in pairs) if pairs else None


def label_signs(d_pairs: Sequence[tuple[str, str]], confidences: Sequence[float],
                gold_pairs: Sequence[tuple[str, str]], judge_probs: Sequence[tuple[float, float]] = ()) -> list[dict]:
    """The signs present in one D_i.

    Args:
        d_pairs: D_i's (chosen, rejected) texts.
        confidences: D_i's max(p, 1 - p) per pair.
        gold_pairs: D0's (chosen, rejected) texts (the pairs seed DPO was trained on).
        judge_probs: (p_logprob, p_reward) per pair when two judges labelled D_i, else empty.

    Returns:
        one dict per sign present: ``sign``, ``value``, ``threshold`` and a one-line ``message``.
    """
    out = []
    d_share, g_share = chosen_longer_share(d_pairs), chosen_longer_share(gold_pairs)
    if d_share is not None and g_share is not None and abs(d_share - g_share) > LENGTH_LEAN:
        out.append({"sign": "length_lean", "value": round(d_share, 4), "gold": round(g_share, 4),
                    "threshold": LENGTH_LEAN,
                    "message": f"the chosen response is the longer one in {d_share:.0%} of pairs, against {g_share:.0%} "
                               "in the gold pairs: the judge may be ranking by length (try expand.length_penalty or "
                               "expand.judge: reward)"})
    if confidences:
        flat = statistics.fmean(c < FLAT_BELOW for c in confidences)
        if flat > FLAT_SHARE:
            out.append({"sign": "flat_confidence", "value": round(flat, 4), "threshold": FLAT_SHARE,
                        "message": f"{flat:.0%} of pairs are judged with confidence under {FLAT_BELOW}: most labels are "
                                   "near coin flips (audit a sample with `spa-lite inspect`, or try more gold pairs)"})
    if judge_probs:
        agree = statistics.fmean((a > 0.5) == (b > 0.5) for a, b in judge_probs)
        if agree < AGREE_MIN:
            out.append({"sign": "judges_disagree", "value": round(agree, 4), "threshold": AGREE_MIN,
                        "message": f"Eq. 7 and the reward adapter choose the same response in {agree:.0%} of pairs: "
                                   "at least one of them is close to chance here"})
    return out


def warn_signs(signs: Sequence[dict], where: str) -> None:
    """One warning line per sign."""
    for s in signs:
        log.warning("%s: %s", where, s["message"])
