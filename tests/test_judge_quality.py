"""bench/judge_quality.py: the pair each judge picks, the metrics against the verifier, and the paired test,
checked against hand computations on made-up samples (the smoke test on the tiny model is in
test_bench_smoke.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import judge_quality as jq  # noqa: E402

INC = {"kind": "include_word", "params": {"word": "cat"}}


def sample(text: str, logp: float, tokens: int) -> dict:
    return {"text": text, "token_ids": [1] * tokens, "num_tokens": tokens, "truncated": False, "logp_pi0": logp}


def rows_and_scores():
    """Two prompts, 4 samples each; 'cat' in a response passes the verifier.

    Prompt q1: log-ratios (pi_0 - init) 5, 1, -2, 3 with passes T, F, F, T; lengths 10, 2, 4, 5.
    Prompt q2: log-ratios 0, 4, 4.5, -1 with passes F, T, F, T; sample 3 repeats sample 2's text.
    """
    r1 = {"id": "q0001-c00", "constraint": INC, "prompt": [{"role": "user", "content": "x"}],
          "samples": [sample("a cat", 5, 10), sample("b", 1, 2), sample("c", -2, 4), sample("cat d", 3, 5)]}
    r2 = {"id": "q0002-c00", "constraint": INC, "prompt": [{"role": "user", "content": "y"}],
          "samples": [sample("e", 0, 3), sample("cat f", 4, 6), sample("g", 4.5, 3), sample("g", -1, 3)]}
    init = [0.0] * 8  # log pi_init 0: the log-ratio is log pi_0
    return [r1, r2], {"logp_init": init, "reward": [1.0, 0.0, 2.0, -1.0, 0.5, 0.0, 3.0, 9.0]}


def test_single_score_judges_pick_best_vs_worst_and_the_metrics_follow():
    rows, scores = rows_and_scores()
    res = jq.evaluate(rows, scores, ["eq7", "reward", "shorter"], [2, 4], beta=0.1)
    # N = 2: q1 pair (0, 1): eq7 picks 0 (5 > 1) = pass over fail: correct. q2 pair (0, 1): picks 1 (4 > 0): correct
    e2 = res["eq7/N2"]
    assert (e2["decided"], e2["accuracy"]["accuracy"]) == (2, 1.0)
    assert [r["a"] for r in e2["_recs"]] == [0, 1]
    assert e2["_recs"][0]["conf"] == pytest.approx(1 / (1 + math.exp(-0.1 * 4)))
    # N = 4: q1 best 0 (5), worst 2 (-2): pass vs fail, correct. q2 candidates 0, 1, 2 (3 repeats 2):
    # best 2 (4.5, fail), worst 0 (0, fail): undecided
    e4 = res["eq7/N4"]
    assert [(r["a"], r["b"]) for r in e4["_recs"]] == [(0, 2), (2, 0)]
    assert (e4["pairs"], e4["decided"], e4["undecided_frac"]) == (2, 1, 0.5)
    assert e4["correct_minus_wrong_per_prompt"] == 0.5
    # reward N = 4: q1 best 2 (2.0, fail) worst 3 (-1, pass): wrong. q2: best 2 (3.0), worst 1 (0.0): 2 fails, 1
    # passes: wrong. The repeat (9.0) is not a candidate.
    r4 = res["reward/N4"]
    assert [(r["a"], r["b"]) for r in r4["_recs"]] == [(2, 3), (2, 1)]
    assert (r4["decided"], r4["accuracy"]["accuracy"], r4["correct_minus_wrong_per_prompt"]) == (2, 0.0, -1.0)
    # shorter N = 2: q1 picks 1 (2 tokens, fail) over 0: wrong; q2 picks 0 (3 tokens, fail) over 1: wrong
    s2 = res["shorter/N2"]
    assert s2["accuracy"]["accuracy"] == 0.0 and s2["chosen_longer_frac"] == 0.0


def test_truncation_fields_count_one_cut_pairs_and_score_the_uncut_ones():
    rows, scores = rows_and_scores()
    # q1: sample 0 (pass) cut; q2: samples 1 (pass) and 2 cut
    rows[0]["samples"][0]["truncated"] = True
    rows[1]["samples"][1]["truncated"] = rows[1]["samples"][2]["truncated"] = True
    res = jq.evaluate(rows, scores, ["eq7", "reward"], [2, 4], beta=0.1)
    # eq7 N 2: q1 (0 cut) over 1: one cut, the cut one chosen; q2 (1 cut) over 0: the same. Both decided, cut.
    e2 = res["eq7/N2"]
    assert [r["cut"] for r in e2["_recs"]] == [(True, False), (True, False)]
    assert (e2["one_cut_pairs"], e2["cut_chosen_frac"], e2["accuracy_uncut"]) == (2, 1.0, None)
    # reward N 4: q1 (2, 3): neither cut, decided, wrong; q2 (2, 1): both cut, decided, wrong
    r4 = res["reward/N4"]
    assert [r["cut"] for r in r4["_recs"]] == [(False, False), (True, True)]
    assert (r4["one_cut_pairs"], r4["cut_chosen_frac"]) == (0, None)
    assert (r4["accuracy_uncut"]["n"], r4["accuracy_uncut"]["accuracy"]) == (1, 0.0)
    # eq7 N 4: q1 (0, 2): the cut one chosen, decided, right; q2 (2, 0): the cut one chosen, undecided
    e4 = res["eq7/N4"]
    assert (e4["one_cut_pairs"], e4["cut_chosen_frac"], e4["accuracy_uncut"]) == (2, 1.0, None)
    # reward N 2: q1 picks 0 (1.0 > 0.0, cut) over 1; q2 picks 0 (0.5 > 0.0, uncut) over 1 (cut): 1 of 2 chose cut
    r2 = res["reward/N2"]
    assert (r2["one_cut_pairs"], r2["cut_chosen_frac"]) == (2, 0.5)


def test_reward_eos_rescored_only_the_cut_samples_with_end_of_turn_appended_and_ranks_by_them():
    calls = []

    def score(prompts, resp):  # a stand-in reward: the response's last token plus its length
        calls.append((prompts, resp))
        return [r[-1] + len(r) for r in resp]

    got = jq.eos_rescored([1.0, 2.0, 3.0, 4.0], [False, True, False, True], [[7], [8], [9], [10]],
                          [[5, 6], [4], [3], [2, 1]], 99, score)
    assert got == [1.0, 99 + 2, 3.0, 99 + 3]
    assert calls == [([[8], [10]], [[4, 99], [2, 1, 99]])]
    assert jq.eos_rescored([1.0], [False], [[7]], [[5]], 99, score) == [1.0] and len(calls) == 1  # nothing cut
    rows, scores = rows_and_scores()
    # reward_eos ranks by its own scores: reversed from reward's, so the reward N 4 pairs turn round
    scores["reward_eos"] = [-x for x in scores["reward"]]
    res = jq.evaluate(rows, scores, ["reward", "reward_eos"], [4], beta=0.1)
    fwd = [(r["a"], r["b"]) for r in res["reward/N4"]["_recs"]]
    assert [(r["a"], r["b"]) for r in res["reward_eos/N4"]["_recs"]] == [(b, a) for a, b in fwd]


def test_ensemble_is_the_mean_of_both_probabilities_and_picks_its_argmax_pair():
    rows, scores = rows_and_scores()
    s = {"lr": [5, 1, -2, 3], "len": [10, 2, 4, 5], "r": [1.0, 0.0, 2.0, -1.0]}
    brute = max(((a, b) for a in range(4) for b in range(4) if a != b),
                key=lambda ab: 0.5 * (1 / (1 + math.exp(-0.1 * (s["lr"][ab[0]] - s["lr"][ab[1]])))
                                      + 1 / (1 + math.exp(-(s["r"][ab[0]] - s["r"][ab[1]])))))
    a, b, p = jq.judge_pair("ensemble", [0, 1, 2, 3], s, 0.1)
    assert (a, b) == brute
    res = jq.evaluate(rows, scores, ["ensemble"], [4], beta=0.1)
    assert (res["ensemble/N4"]["_recs"][0]["a"], res["ensemble/N4"]["_recs"][0]["b"]) == brute
    assert p == pytest.approx(jq.pref("ensemble", a, b, s, 0.1))


def test_sigmoid_is_stable_at_extremes():
    assert jq._sig(-1000.0) == 0.0 and jq._sig(1000.0) == 1.0 and jq._sig(0.0) == 0.5


def test_paired_difference_is_bootstrapped_over_questions():
    def rec(q, correct, decided=True):
        return {"q": q, "pair": True, "decided": decided, "correct": correct}

    a = [rec(1, True), rec(1, True), rec(2, False), rec(3, True, decided=False)]
    b = [rec(1, False), rec(1, True), rec(2, False), rec(3, False)]
    out = jq.paired_vs(a, b, n_boot=2000)
    # pairs decided by both: the first three; differences 1, 0, 0 -> mean 1/3
    assert out["n"] == 3 and out["questions"] == 2
    assert out["diff"] == pytest.approx(1 / 3, abs=1e-4)
    # question 1 alone gives 1/2, question 2 alone gives 0: every resample lies in [0, 1/2]
    assert 0.0 <= out["ci_low"] <= out["diff"] <= out["ci_high"] <= 0.5


def test_confidence_quintiles_partition_the_decided_pairs():
    recs = [{"q": i, "pair": True, "decided": True, "correct": i % 2 == 0, "conf": 0.5 + i / 100, "longer": False}
            for i in range(25)]
    s = jq.summarize(recs, 25)
    assert sum(x["n"] for x in s["by_conf_quintile"]) == 25
    assert [x["conf_min"] for x in s["by_conf_quintile"]] == sorted(x["conf_min"] for x in s["by_conf_quintile"])
    assert np.isclose(s["accuracy"]["accuracy"], 13 / 25)


def test_decision_rule_needs_a_lower_bound_above_chance_then_prefers_the_cheaper_setting():
    # 60/100: Wilson lower bound 0.502, eligible; 7/10 (0.70) has 0.40: not eligible, despite its accuracy
    stats = {"G64/eq7/N2": (60, 100), "G64/eq7_tok/N8": (7, 10), "G128/reward/N2": (605, 1000)}
    assert jq.choose(stats) == "G64/eq7/N2"  # the reward adapter is 0.005 better: a tie, and Eq. 7 is cheaper
    stats["G128/reward/N2"] = (630, 1000)
    assert jq.choose(stats) == "G128/reward/N2"  # a clear winner is taken although it costs more
    stats["G64/eq7/N4"] = (635, 1000)
    assert jq.choose(stats) == "G128/reward/N2"  # tie within 0.01: smaller N first
    # nobody's bound above 0.5: the highest point estimate
    assert jq.choose({"G64/eq7/N2": (6, 10), "G64/eq7_tok/N2": (7, 10)}) == "G64/eq7_tok/N2"


def test_selection_check_finds_no_optimism_when_one_setting_is_right_everywhere_and_some_when_all_are_chance():
    rng = np.random.default_rng(1)
    qs = list(range(40))

    def recs(p_correct):
        return [{"q": q, "pair": True, "decided": True, "correct": bool(rng.random() < p_correct)} for q in qs
                for _ in range(3)]
    good = {"G64/eq7/N2": [dict(r, correct=True) for r in recs(1.0)], "G64/eq7_tok/N2": recs(0.5)}
    out = jq.selection_check(good, splits=50)
    assert out["chosen_on_all"] == "G64/eq7/N2" and out["out_half_mean"] == 1.0 and out["optimism"] == 0.0
    # twenty coin-flip judges: the winner on one half is, on average, better there than on the other half
    noise = {f"G64/j{i}/N2": recs(0.5) for i in range(20)}
    out = jq.selection_check(noise, splits=200)
    assert out["optimism"] > 0.02 and abs(out["out_half_mean"] - 0.5) < 0.05


def test_length_controlled_eq7_takes_the_within_prompt_slope_of_a_least_squares_fit_with_prompt_effects():
    rows, scores = rows_and_scores()
    res = jq.evaluate(rows, scores, ["eq7_lc"], [2, 4], beta=0.1)
    # an independent fit: log-ratio on tokens plus one intercept per prompt (numpy's least squares), over the
    # candidates: all 4 of q1, the first 3 of q2 (its 4th repeats the 3rd) at N = 4; the first 2 of each at N = 2
    for n, cands in ((4, ([0, 1, 2, 3], [0, 1, 2])), (2, ([0, 1], [0, 1]))):
        lr = ([5, 1, -2, 3], [0, 4, 4.5, -1])
        tok = ([10, 2, 4, 5], [3, 6, 3, 3])
        u = [lr[p][k] for p in (0, 1) for k in cands[p]]
        x = np.array([[tok[p][k], p == 0, p == 1] for p in (0, 1) for k in cands[p]], dtype=float)
        slope = np.linalg.lstsq(x, np.array(u, dtype=float), rcond=None)[0][0]
        got = res[f"eq7_lc/N{n}"]
        assert got["lc_slope_per_token"] == pytest.approx(slope, abs=1e-6)
        for p, rec in enumerate(got["_recs"]):
            resid = {k: lr[p][k] - slope * tok[p][k] for k in cands[p]}
            best, worst = max(resid, key=resid.get), min(resid, key=resid.get)
            assert (rec["a"], rec["b"]) == (best, worst)
            assert rec["conf"] == pytest.approx(1 / (1 + math.exp(-0.1 * (resid[best] - resid[worst]))), rel=1e-9)
    # the slope is not zero here, so the length control changes a choice summed Eq. 7 makes: at N = 4 summed
    # Eq. 7 takes q1's sample 0 (the longest, 10 tokens) over sample 2
    assert res["eq7_lc/N4"]["lc_slope_per_token"] > 0.3
    summed = jq.evaluate(rows, scores, ["eq7"], [4], beta=0.1)["eq7/N4"]["_recs"][0]
    assert (summed["a"], summed["b"]) == (0, 2) and res["eq7_lc/N4"]["_recs"][0]["a"] != 0


def test_length_controlled_reward_eos_fits_its_own_slope_and_ranks_without_beta():
    rows, scores = rows_and_scores()
    # reward_eos grows with length by 0.5 a token plus a per-sample part; the length control should take the slope
    # off the reward_eos scores (not the log-ratios) and rank by what is left
    tok = ([10, 2, 4, 5], [3, 6, 3, 3])
    own = ([0.3, 1.0, -0.4, 0.2], [0.0, -0.6, 0.9, 5.0])
    scores["reward_eos"] = [0.5 * tok[p][k] + own[p][k] for p in (0, 1) for k in range(4)]
    res = jq.evaluate(rows, scores, ["reward_eos", "reward_eos_lc", "eq7_lc"], [2, 4], beta=0.1)
    for n, cands in ((4, ([0, 1, 2, 3], [0, 1, 2])), (2, ([0, 1], [0, 1]))):
        r = [scores["reward_eos"][4 * p + k] for p in (0, 1) for k in cands[p]]
        x = np.array([[tok[p][k], p == 0, p == 1] for p in (0, 1) for k in cands[p]], dtype=float)
        slope = np.linalg.lstsq(x, np.array(r), rcond=None)[0][0]
        got = res[f"reward_eos_lc/N{n}"]
        assert got["lc_slope_per_token"] == pytest.approx(slope, abs=5e-7)  # stored rounded to 6 places
        assert got["lc_slope_per_token"] != res[f"eq7_lc/N{n}"]["lc_slope_per_token"]
        for p, rec in enumerate(got["_recs"]):
            resid = {k: scores["reward_eos"][4 * p + k] - slope * tok[p][k] for k in cands[p]}
            best, worst = max(resid, key=resid.get), min(resid, key=resid.get)
            assert (rec["a"], rec["b"]) == (best, worst)
            # a reward margin is a logit already: no beta
            assert rec["conf"] == pytest.approx(1 / (1 + math.exp(-(resid[best] - resid[worst]))), rel=1e-9)
    # at N 4 plain reward_eos takes q1's longest sample (0: 10 tokens, 5.3); with the slope off it does not
    assert res["reward_eos/N4"]["_recs"][0]["a"] == 0 and res["reward_eos_lc/N4"]["_recs"][0]["a"] != 0


def test_reward_eos_lp_ranks_by_reward_less_a_times_tokens_per_a_and_the_choice_of_a_follows_the_registration():
    rows, scores = rows_and_scores()
    tok = ([10, 2, 4, 5], [3, 6, 3, 3])
    scores["reward_eos"] = [0.3, 1.0, -0.4, 0.2, 0.0, -0.6, 0.9, 5.0]
    lps = (0.0, -0.2, -1.0)
    res = jq.evaluate(rows, scores, ["reward_eos", "reward_eos_lp"], [4], beta=0.1, lps=lps)
    assert {k for k in res if k.startswith("reward_eos_lp")} == {f"reward_eos_lp{a:+g}/N4" for a in lps}
    # a = 0 is reward_eos itself
    assert ([(r["a"], r["b"]) for r in res["reward_eos_lp+0/N4"]["_recs"]]
            == [(r["a"], r["b"]) for r in res["reward_eos/N4"]["_recs"]])
    for a in lps:  # brute force over every ordered pair of candidates: the largest margin of r - a * tokens
        for p, cands in enumerate(([0, 1, 2, 3], [0, 1, 2])):
            v = {k: scores["reward_eos"][4 * p + k] - a * tok[p][k] for k in cands}
            best = max(((x, y) for x in cands for y in cands if x != y), key=lambda xy: v[xy[0]] - v[xy[1]])
            rec = res[f"reward_eos_lp{a:+g}/N4"]["_recs"][p]
            assert (rec["a"], rec["b"]) == best
            assert rec["conf"] == pytest.approx(1 / (1 + math.exp(-(v[best[0]] - v[best[1]]))), rel=1e-9)
    # a negative a favours the longer sample: at a = -1, q1 takes its 10-token sample 0 over 2-token sample 1
    assert (res["reward_eos_lp-1/N4"]["_recs"][0]["a"], res["reward_eos_lp-1/N4"]["_recs"][0]["b"]) == (0, 1)
    # the registered choice: chosen-longer share nearest the target, ties to the a nearer 0
    table = {f"reward_eos_lp{a:+g}/N4": {"chosen_longer_frac": f} for a, f in ((0.0, 0.30), (-0.2, 0.36), (-0.4, 0.42),
                                                                             (-0.6, 0.50))}
    assert jq.closest_lp(table, [0.0, -0.2, -0.4, -0.6], 4, 0.39) in (-0.2, -0.4)  # 0.03 away either side
    assert jq.closest_lp(table, [0.0, -0.2, -0.4, -0.6], 4, 0.39) == -0.2  # the tie goes to the a nearer 0
    assert jq.closest_lp(table, [0.0, -0.2, -0.4, -0.6], 4, 0.49) == -0.6
    assert jq.closest_lp(table, [0.0, -0.2, -0.4, -0.6], 4, 0.10) == 0.0
    table["reward_eos_lp-0.2/N4"]["chosen_longer_frac"] = None  # no pair at this N: never the choice
    assert jq.closest_lp(table, [0.0, -0.2, -0.4, -0.6], 4, 0.37) == -0.4
    # the decision rule prices every reward_eos variant as the reward adapter: in a tie, before a costlier setting
    tie = {"G512/unpriced/N2": (70, 100), "G512/reward_eos_lp-0.006/N2": (70, 100)}
    assert jq.choose(tie) == "G512/reward_eos_lp-0.006/N2"
    assert jq.choose({"G512/reward_eos_lc/N2": (70, 100), "G512/eq7_lc/N2": (70, 100)}) == "G512/eq7_lc/N2"


def test_consensus_picks_the_sample_most_like_the_others_against_the_least_and_skips_two_samples():
    inc = {"kind": "include_word", "params": {"word": "cat"}}
    texts = ["the cat sat on the mat", "The cat sat on a mat.", "a dog ran", "the cat sat"]
    row = {"id": "q0001-c00", "constraint": inc, "prompt": [{"role": "user", "content": "x"}],
           "samples": [sample(t, 0.0, 3) for t in texts]}
    res = jq.evaluate([row], {"logp_init": [0.0] * 4}, ["consensus"], [2, 4], beta=0.1)
    assert "consensus/N2" not in res  # N = 2: both samples score alike
    # an independent count: unigram and bigram sets by hand, Jaccard, mean over the other three
    grams = [{"the", "cat", "sat", "on", "mat", ("the", "cat"), ("cat", "sat"), ("sat", "on"), ("on", "the"),
              ("the", "mat")},
             {"the", "cat", "sat", "on", "a", "mat", ("the", "cat"), ("cat", "sat"), ("sat", "on"), ("on", "a"),
              ("a", "mat")},
             {"a", "dog", "ran", ("a", "dog"), ("dog", "ran")},
             {"the", "cat", "sat", ("the", "cat"), ("cat", "sat")}]
    score = [np.mean([len(grams[i] & grams[j]) / len(grams[i] | grams[j]) for j in range(4) if j != i])
             for i in range(4)]
    assert [jq.word_grams(t) for t in texts] == grams
    rec = res["consensus/N4"]["_recs"][0]
    # sample 1 edges out sample 0 by the unigram "a" it shares with sample 2 (0.379 against 0.372)
    assert (rec["a"], rec["b"]) == (int(np.argmax(score)), int(np.argmin(score))) == (1, 2)
    assert rec["conf"] == pytest.approx(0.5 + (score[1] - score[2]) / 2, rel=1e-12)
    # verifier: sample 1 has 'cat', sample 2 does not: a decided pair, labelled right
    assert rec["decided"] and rec["correct"]


def test_consensus_gives_no_pair_when_every_candidate_scores_alike_and_wordless_texts_share_nothing():
    inc = {"kind": "include_word", "params": {"word": "cat"}}
    # N = 4 with two distinct candidates (the rest repeat): Jaccard is symmetric, so both score alike
    two = {"id": "q0001-c00", "constraint": inc, "prompt": [{"role": "user", "content": "x"}],
           "samples": [sample(t, 0.0, 3) for t in ["a cat", "a dog", "a cat", "a dog"]]}
    # four wordless candidates: no grams, so no similarity either way (all 0.0, a tie: no pair)
    wordless = {"id": "q0002-c00", "constraint": inc, "prompt": [{"role": "user", "content": "y"}],
                "samples": [sample(t, 0.0, 3) for t in ["!!", "?", "...", ":)"]]}
    res = jq.evaluate([two, wordless], {"logp_init": [0.0] * 8}, ["consensus"], [4], beta=0.1)
    assert [r["pair"] for r in res["consensus/N4"]["_recs"]] == [False, False]
    assert res["consensus/N4"]["pairs"] == 0
    assert jq.jaccard(set(), set()) == 0.0 and jq.jaccard({"a"}, set()) == 0.0
    assert jq.jaccard({"a", "b"}, {"b", "c"}) == pytest.approx(1 / 3)


def test_length_matched_judge_picks_the_largest_gap_among_pairs_within_the_ratio():
    """reward_eos_lm (expand.max_length_ratio in the dev benchmark): brute force over every ordered pair of
    candidates whose token counts are within the factor; a prompt without one has no pair."""
    rows, scores = rows_and_scores()
    tok = ([10, 2, 4, 5], [3, 6, 3, 3])
    scores["reward_eos"] = [0.3, 1.0, -0.4, 0.2, 0.0, -0.6, 0.9, 5.0]
    for ratio in (1.0, 1.25, 2.0, 100.0):  # 1.0: the benchmark allows equal lengths only; expand needs > 1
        res = jq.evaluate(rows, scores, ["reward_eos", "reward_eos_lm"], [4], beta=0.1, max_length_ratio=ratio)
        for p, cands in enumerate(([0, 1, 2, 3], [0, 1, 2])):
            v = {k: scores["reward_eos"][4 * p + k] for k in cands}
            ok = [(x, y) for x in cands for y in cands
                  if x != y and max(tok[p][x], tok[p][y]) <= ratio * min(tok[p][x], tok[p][y])]
            rec = res["reward_eos_lm/N4"]["_recs"][p]
            if not ok:
                assert rec == {"q": rec["q"], "pair": False}
                continue
            best = max(ok, key=lambda xy: v[xy[0]] - v[xy[1]])
            assert (rec["a"], rec["b"]) == best
            assert rec["tok_diff"] == tok[p][best[0]] - tok[p][best[1]]
    # at 1.25 the first prompt (10, 2, 4, 5 tokens) keeps only 4 vs 5; reward_eos takes 1 over 2 (2 vs 4 tokens)
    res = jq.evaluate(rows, scores, ["reward_eos", "reward_eos_lm"], [4], beta=0.1, max_length_ratio=1.25)
    assert {res["reward_eos_lm/N4"]["_recs"][0]["a"], res["reward_eos_lm/N4"]["_recs"][0]["b"]} == {2, 3}
    assert (res["reward_eos/N4"]["_recs"][0]["a"], res["reward_eos/N4"]["_recs"][0]["b"]) == (1, 2)
    # at a huge ratio it is reward_eos itself
    res = jq.evaluate(rows, scores, ["reward_eos", "reward_eos_lm"], [4], beta=0.1, max_length_ratio=100.0)
    assert ([(r["a"], r["b"]) for r in res["reward_eos_lm/N4"]["_recs"]]
            == [(r["a"], r["b"]) for r in res["reward_eos/N4"]["_recs"]])
    assert res["reward_eos_lm/N4"]["pairs_frac"] == 1.0
