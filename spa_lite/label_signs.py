"""Signs that a D_i's self-labels are poor, read without a verifier (issue 19, point 5).

A judge can label its own policy's samples at chance while every summary number looks healthy
(bench/judge_quality.py measured it on the demo task). The signs below need no gold label, only D_i and the gold
seed pairs D0. Each is one line printed by ``expand`` and kept in its manifest (``summary.label_signs``); the
README's "Signs of bad self-labels" says what each means and what to try. Which signs are kept, and their
thresholds, come from the dev sweep of bench/judge_quality.py (bench/RESULTS.md, "Judge quality"), not from the
evaluation prompts. A confidence histogram piled at 0.5 is not a sign: in the sweep the flattest judge (per-token
Eq. 7, every confidence under 0.55) was the most accurate, and the reward adapter, far less flat, was at chance.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

# chosen-longer share of D_i (in characters) more than this above the gold pairs' own share: the judge leans on
# length. A rough sign, from the dev sweep (bench/RESULTS.md, "Judge quality", gold 64 and 128, N 2/4/8): of
# its 24 settings with a model judge, none of the 7 right on 0.60 or more of decided pairs chose the longer
# response more than 0.10 more often than the gold pairs do (per-token Eq. 7 leaned short), and 9 of the 17 at
# 0.46-0.56 did; the other 8 (the reward adapter and the ensemble at gold 128, two N = 2 settings) did not.
# Leaning short by as much is flagged too (`short_lean`): one step of it looked harmless on dev prompts, but in the
# gain run at the chosen setting (per-token Eq. 7, bench/RESULTS.md "SPA at the chosen judge") it compounded over
# two iterations into answers of one token (D_1 0.29 and D_2 0.21 chosen-longer against the gold pairs' 0.34).
LENGTH_LEAN = 0.1
# the policy's samples in D_i average fewer than this share of D_{i-1}'s tokens: its answers are collapsing. In
# that gain run D_2's samples averaged 11.0 tokens against D_1's 40.2 (0.27x), and pi_2 then answered 422 of 528
# held-out prompts with under 3 tokens. One run behind the value: a halving between two iterations is far outside
# what seed DPO or one healthy iteration did on the demo (pi_0's greedy answers: 0.5x pi_init's, but better).
LENGTH_DROP = 0.5
# two judges (expand.judge: logprob+reward) pick the same response in fewer than this share of pairs. If their
# errors are independent, agreement is acc1*acc2 + (1-acc1)(1-acc2): exactly 0.5 when either is at chance. In the
# sweep Eq. 7 and the reward adapter (at chance) agreed on 0.54-0.55 of pairs; Eq. 7 and per-token Eq. 7 on 0.75-0.85.
AGREE_MIN = 0.6
# among pairs where exactly one response was cut at expand.max_new_tokens, the judge chose the cut one in more than
# this share of at least TRUNC_MIN_PAIRS: it scores unfinished answers high, and SPA learns to run out of tokens.
# Added 2026-12-06 after the reward-adapter gain run (bench/judge_quality_protocol.md): the reward adapter at 512
# gold pairs chose the cut response in 182 of 193 such pairs of D_1 and 196 of 214 of D_2, and in 47 of 50 and 36 of
# 38 on two sets of dev samples; its answers grew to the token limit and it lost 9.5 points. 0.75 is halfway
# between no lean (0.5) and always (1.0), below that run's 0.92-0.95; not fitted, one run is behind it.
TRUNC_LEAN = 0.75
TRUNC_MIN_PAIRS = 20


def cut_chosen_share(cut: Sequence[tuple[bool, bool]]) -> tuple[int, float | None]:
    """Among (chosen was cut, rejected was cut) pairs where exactly one response was cut at the token limit: how
    many, and the share whose chosen response is the cut one (None when there are none)."""
    one = [c for c, r in cut if c != r]
    return len(one), (statistics.fmean(one) if one else None)


def chosen_longer_share(pairs: Sequence[tuple[str, str]]) -> float | None:
    """Share of (chosen, rejected) text pairs whose chosen response has more characters."""
    return statistics.fmean(len(c) > len(r) for c, r in pairs) if pairs else None


def label_signs(d_pairs: Sequence[tuple[str, str]], gold_pairs: Sequence[tuple[str, str]],
                judge_probs: Sequence[tuple[float, float]] = (),
                mean_tokens: tuple[float, float] | None = None, balanced: bool = False,
                cut: Sequence[tuple[bool, bool]] = ()) -> list[dict]:
    """The signs present in one D_i.

    Args:
        d_pairs: D_i's (chosen, rejected) texts.
        gold_pairs: D0's (chosen, rejected) texts (the pairs seed DPO was trained on).
        judge_probs: (p_logprob, p_reward) per pair when two judges labelled D_i, else empty.
        mean_tokens: (D_{i-1}, D_i) mean sampled tokens per response, from iteration 2 on; else None.
        balanced: ``expand.length_balance`` is on: d_pairs are the judged pairs before it evened D_i's lengths,
            and the lean signs say that it evened them in D_i (it evens the count, not the length gap: with it
            SPA's answers still collapsed, README "How right must the labels be?").
        cut: (chosen was cut, rejected was cut) at the token limit, per pair of D_i; empty when not known.

    Returns:
        one dict per sign present: ``sign``, ``value``, ``threshold`` and a one-line ``message``.
    """
    out = []
    note = ("; expand.length_balance evens the count (in tokens) in D_i, not the length gap" if balanced else "")
    d_share, g_share = chosen_longer_share(d_pairs), chosen_longer_share(gold_pairs)
    if d_share is not None and g_share is not None and d_share - g_share > LENGTH_LEAN:
        out.append({"sign": "length_lean", "value": round(d_share, 4), "gold": round(g_share, 4),
                    "threshold": LENGTH_LEAN,
                    "message": f"the chosen response is the longer one in {d_share:.0%} of pairs, against {g_share:.0%} "
                               "in the gold pairs: the judge may be ranking by length (audit a sample with `spa-lite inspect`; "
                               f"try expand.judge_norm: per_token or expand.length_penalty){note}"})
    if d_share is not None and g_share is not None and g_share - d_share > LENGTH_LEAN:
        out.append({"sign": "short_lean", "value": round(d_share, 4), "gold": round(g_share, 4),
                    "threshold": LENGTH_LEAN,
                    "message": f"the chosen response is the longer one in only {d_share:.0%} of pairs, against "
                               f"{g_share:.0%} in the gold pairs: the judge prefers short answers, and iterating on it "
                               "can shorten them to nothing (audit a sample with `spa-lite inspect`; try "
                               f"expand.judge_norm: sum or a negative expand.length_penalty){note}"})
    if mean_tokens and mean_tokens[0] > 0 and mean_tokens[1] < LENGTH_DROP * mean_tokens[0]:
        prev, cur = mean_tokens
        out.append({"sign": "length_drop", "value": round(cur / prev, 4), "threshold": LENGTH_DROP,
                    "message": f"the policy's samples average {cur:.1f} tokens, against {prev:.1f} one iteration "
                               "earlier: its answers are collapsing (read a few with `spa-lite inspect`; stop here "
                               "and keep the previous policy, or change the judge)"})
    n_one_cut, share = cut_chosen_share(cut)
    if n_one_cut >= TRUNC_MIN_PAIRS and share > TRUNC_LEAN:
        out.append({"sign": "truncation_lean", "value": round(share, 4), "pairs": n_one_cut,
                    "threshold": TRUNC_LEAN,
                    "message": f"where only one response was cut at the token limit, the judge chose the cut one in "
                               f"{share:.0%} of {n_one_cut} pairs: it may be scoring unfinished answers high, and "
                               "iterating on it runs the answers out of tokens (with a reward judge trained on finished "
                               "answers try expand.reward_cut_eos: true; otherwise expand.drop_truncated: true or a "
                               "larger expand.max_new_tokens)"})
    if judge_probs:
        agree = statistics.fmean((a > 0.5) == (b > 0.5) for a, b in judge_probs)
        if agree < AGREE_MIN:
            out.append({"sign": "judges_disagree", "value": round(agree, 4), "threshold": AGREE_MIN,
                        "message": f"Eq. 7 and the reward adapter choose the same response in {agree:.0%} of pairs: "
                                   "at least one of them is close to chance here"})
    return out


def warn_signs(signs: Sequence[dict], where: str) -> None:
    """One line per sign on the terminal (stderr), prefixed "label sign", like the stage summaries."""
    from spa_lite.ui import console

    for s in signs:
        console.print(f"label sign ({where}): {s['message']}", markup=False, highlight=False, soft_wrap=True)
