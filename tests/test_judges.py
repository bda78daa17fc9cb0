"""Judges beyond the paper's pair: best vs worst of N samples (``expand.num_samples`` > 2) and single-response
scoring (``spa_lite.judge.score_responses``), checked against separately loaded, merged models scored one
unpadded sequence at a time (test_math's helpers)."""

from __future__ import annotations

import json
import math

import pytest
from test_math import PROMPTS, TOL, Y1, Y2, _merged, _naive_logp, _plain_base, adapters  # noqa: F401 (fixture)

from spa_lite.generation import encode_prompt, sample_responses
from spa_lite.judge import judge_logprob, score_responses
from spa_lite.logps import encode_response
from spa_lite.models import load_base_model
from spa_lite.stack import build_stack


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _stack(model_dir, adapters):
    base, tok = load_base_model(str(model_dir), quantization="none", dtype="float32", device="cpu")
    return build_stack(base, tok, [("seed", adapters["seed"])])


@pytest.fixture(scope="module")
def pi0_and_init(tiny_model_dir, adapters):
    return _merged(tiny_model_dir, adapters["seed"]), _plain_base(tiny_model_dir)


def _tol(*logps: float) -> float:
    # float32 sums of up to ~50 token log-probs: TOL plus 1e-6 of the magnitudes (as test_math)
    return TOL + 1e-6 * sum(abs(x) for x in logps)


def test_score_responses_matches_brute_force_and_judge_logprob(tiny_model_dir, adapters, pi0_and_init):
    stack = _stack(tiny_model_dir, adapters)
    tok = stack.tokenizer
    pol, ref = pi0_and_init
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in PROMPTS]
    xs, ys = prompts * 2, [encode_response(tok, t) for t in Y1 + Y2]
    beta, a = 0.1, 0.05
    got = score_responses(stack, ["seed"], [], xs, ys, beta=beta, length_penalty=a, batch_size=4)  # 2 batches
    for x, y, g in zip(xs, ys, got):
        p, q = _naive_logp(pol, x, y), _naive_logp(ref, x, y)
        assert g["len"] == len(y)
        assert g["logratio"] == pytest.approx(p - q, abs=_tol(p, q))
        assert g["reward"] == pytest.approx(beta * (p - q - a * len(y)), abs=beta * _tol(p, q))
    # no reference: r = beta * log pi_judge
    bare = score_responses(stack, ["seed"], None, xs, ys, beta=beta)
    assert [b["logratio"] for b in bare] == pytest.approx([_naive_logp(pol, x, y) for x, y in zip(xs, ys)], abs=1e-3)
    # the pair judge's p is sigmoid of the difference of these rewards
    rows = judge_logprob(stack, ["seed"], [], prompts, ys[:3], ys[3:], beta=beta, length_penalty=a)
    for i, row in enumerate(rows):
        assert row["p"] == pytest.approx(_sigmoid(got[i]["reward"] - got[3 + i]["reward"]), abs=TOL)
    # log-probs recorded while sampling: only the reference runs; a wrong recording fails the self-check
    known = [g["logratio"] + _naive_logp(ref, x, y) for g, x, y in zip(got, xs, ys)]
    check: dict = {}
    reused = score_responses(stack, ["seed"], [], xs, ys, beta=beta, length_penalty=a, judge_logps=known, check=check)
    assert check["reused"] and check["checked"] == 4 and check["max_abs_dev"] < 1e-3
    assert [r["reward"] for r in reused] == pytest.approx([g["reward"] for g in got], abs=1e-4)
    check = {}
    score_responses(stack, ["seed"], [], xs, ys, judge_logps=[k + 1.0 for k in known], check=check)
    assert check["reused"] is False and check["max_abs_dev"] == pytest.approx(1.0, abs=1e-3)


def _expand_recipe(tiny_recipe, n: int, **extra):
    # a hot temperature makes the N samples of a prompt differ
    return tiny_recipe(**{"expand.num_samples": n, "expand.temperature": 1.5, "expand.max_new_tokens": 6, **extra})


QUESTIONS = [{"id": f"q{i}", "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(PROMPTS + ["Give a tip."])]


@pytest.mark.parametrize("judge_logps", ["sampler", "forward"])
def test_best_vs_worst_of_n_is_argmax_argmin_of_brute_force_rewards(tiny_model_dir, adapters, pi0_and_init,
                                                                    tiny_recipe, judge_logps):
    from spa_lite.stages.expand import expand_shard

    n, beta, a = 5, 0.1, 0.02
    recipe = _expand_recipe(tiny_recipe, n, **{"expand.length_penalty": a, "expand.judge_logps": judge_logps})
    stack = _stack(tiny_model_dir, adapters)
    res = expand_shard(stack, recipe, QUESTIONS, seed=11)
    c = recipe.expand
    # the same draws, independently of expand: sampling is seeded by (seed, prompt, sample)
    with stack.use(["seed"]) as m:
        samples = sample_responses(m, stack.tokenizer, [q["prompt"] for q in QUESTIONS], num_samples=n,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                   seed=11, batch_size=c.batch_size)
    pol, ref = pi0_and_init
    counts = res["counts"]
    assert counts["samples"] == n * len(QUESTIONS)
    assert counts["sampled_tokens"] == sum(y.num_tokens for ss in samples for y in ss)
    rows = {r["id"]: r for r in res["rows"]}
    checked = 0
    for q, ss in zip(QUESTIONS, samples):
        distinct = list({y.text: y for y in reversed(ss) if y.text}.values())[::-1]  # first of each text
        if len(distinct) < 2:
            assert q["id"] not in rows
            continue
        x = encode_prompt(stack.tokenizer, q["prompt"])
        lps = [(_naive_logp(pol, x, y.token_ids), _naive_logp(ref, x, y.token_ids)) for y in distinct]
        r = [beta * (p - s - a * y.num_tokens) for (p, s), y in zip(lps, distinct)]
        best, worst = max(range(len(r)), key=r.__getitem__), min(range(len(r)), key=r.__getitem__)
        row = rows[q["id"]]
        assert (row["chosen"], row["rejected"]) == (distinct[best].text, distinct[worst].text)
        assert row["num_samples"] == n and row["candidates"] == len(distinct)
        assert row["reward_chosen"] == pytest.approx(r[best], abs=beta * _tol(*lps[best]))
        assert row["reward_rejected"] == pytest.approx(r[worst], abs=beta * _tol(*lps[worst]))
        assert row["confidence"] == pytest.approx(_sigmoid(r[best] - r[worst]), abs=1e-5)
        # (y1, y2) keep sampling order, so p_y1 is Eq. 7's p on them
        assert row["chosen_is_y1"] == (best < worst)
        assert row["p_y1"] == pytest.approx(_sigmoid((r[best] - r[worst]) * (1 if best < worst else -1)), abs=1e-5)
        checked += 1
    assert checked >= 3 and counts["judged_responses"] >= 2 * checked
    if judge_logps == "sampler":
        assert res["sampler_logps"]["reused"] and res["sampler_logps"]["max_abs_dev"] < 1e-3


def test_two_samples_stay_the_papers_pair(tiny_model_dir, adapters, tiny_recipe):
    """N = 2: the rows are samples 0 and 1 judged by ``judge_logprob`` (Eq. 7), with no best-vs-worst fields."""
    from spa_lite.stages.expand import _row, expand_shard

    recipe = _expand_recipe(tiny_recipe, 2, **{"expand.judge_logps": "forward"})
    stack = _stack(tiny_model_dir, adapters)
    rows = expand_shard(stack, recipe, QUESTIONS, seed=3)["rows"]
    c = recipe.expand
    with stack.use(["seed"]) as m:
        samples = sample_responses(m, stack.tokenizer, [q["prompt"] for q in QUESTIONS], num_samples=2,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=3,
                                   batch_size=c.batch_size)
    keep = [(q, a, b) for q, (a, b) in zip(QUESTIONS, samples) if a.text and b.text and a.text != b.text]
    judged = judge_logprob(stack, ["seed"], [], [encode_prompt(stack.tokenizer, q["prompt"]) for q, _, _ in keep],
                           [a.token_ids for _, a, _ in keep], [b.token_ids for _, _, b in keep], beta=c.beta,
                           batch_size=c.judge_batch_size)
    want = [_row(q, a, b, j) for (q, a, b), j in zip(keep, judged)]
    assert len(rows) >= 3 and json.dumps(rows) == json.dumps(want)
    assert not any(k in rows[0] for k in ("num_samples", "reward_chosen", "candidates"))


def test_num_samples_over_two_needs_a_scoring_judge(tiny_recipe):
    from spa_lite.errors import SpaError

    with pytest.raises(SpaError, match="expand.num_samples: 4 .* not 'llm'"):
        tiny_recipe(**{"expand.num_samples": 4, "expand.judge": "llm"})


def test_min_confidence_drops_and_counts_low_confidence_pairs(tiny_model_dir, adapters, tiny_recipe):
    from spa_lite.stages.expand import expand_shard

    stack = _stack(tiny_model_dir, adapters)
    every = expand_shard(stack, _expand_recipe(tiny_recipe, 2, **{"expand.judge_logps": "forward"}), QUESTIONS, seed=3)
    conf = sorted(r["confidence"] for r in every["rows"])
    assert "below_min_confidence" not in every["counts"] and len(conf) >= 3
    floor = max(0.5, (conf[0] + conf[1]) / 2)  # between the two least confident pairs
    kept = expand_shard(stack, _expand_recipe(tiny_recipe, 2, **{"expand.judge_logps": "forward",
                                                                "expand.min_confidence": floor}), QUESTIONS, seed=3)
    want = [r for r in every["rows"] if r["confidence"] >= floor]
    assert json.dumps(kept["rows"]) == json.dumps(want) and len(want) < len(every["rows"])
    assert kept["counts"]["below_min_confidence"] == len(every["rows"]) - len(want)


def test_runs_made_before_the_new_settings_keep_their_hash(tiny_recipe):
    """expand.min_confidence at 0 (off) is left out of expand's config, so D_i made before it existed is not
    refused as "made from another config"; set, it is part of D_i's identity."""
    from spa_lite.layout import Stage
    from spa_lite.runs import stage_config, stage_hash

    off, on = tiny_recipe(), tiny_recipe(**{"expand.min_confidence": 0.6})
    assert "min_confidence" not in stage_config(off, Stage("expand", 1))["expand"]
    assert stage_config(on, Stage("expand", 1))["expand"]["min_confidence"] == 0.6
    assert stage_hash(off, Stage("expand", 1)) != stage_hash(on, Stage("expand", 1))
    assert stage_hash(off, Stage("seed", 0)) == stage_hash(on, Stage("seed", 0))


def test_per_token_judge_divides_each_log_ratio_by_its_length(tiny_model_dir, adapters, pi0_and_init):
    """expand.judge_norm: per_token: r(y) = beta * (log pi_0(y) - log pi_init(y)) / |y| from separately loaded merged
    models, in score_responses and in the pair judge (a length penalty cancels there: it shifts every r by -beta*a)."""
    stack = _stack(tiny_model_dir, adapters)
    tok = stack.tokenizer
    pol, ref = pi0_and_init
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in PROMPTS]
    ys = [encode_response(tok, t) for t in Y1 + Y2]
    beta = 0.1
    got = score_responses(stack, ["seed"], [], prompts * 2, ys, beta=beta, per_token=True)
    for x, y, g in zip(prompts * 2, ys, got):
        p, q = _naive_logp(pol, x, y), _naive_logp(ref, x, y)
        assert g["reward"] == pytest.approx(beta * (p - q) / len(y), abs=beta * _tol(p, q) / len(y))
    for a in (0.0, 0.3):
        rows = judge_logprob(stack, ["seed"], [], prompts, ys[:3], ys[3:], beta=beta, length_penalty=a, per_token=True)
        for i, row in enumerate(rows):
            assert row["p"] == pytest.approx(_sigmoid(got[i]["reward"] - got[3 + i]["reward"]), abs=TOL)


def test_judge_norm_sum_keeps_old_hashes_and_per_token_changes_them(tiny_recipe):
    from spa_lite.layout import Stage
    from spa_lite.runs import stage_config, stage_hash

    base = tiny_recipe()
    assert "judge_norm" not in json.dumps(stage_config(base, Stage("expand", 1)))
    per = tiny_recipe(**{"expand.judge_norm": "per_token"})
    assert stage_hash(per, Stage("expand", 1)) != stage_hash(base, Stage("expand", 1))


def test_verifier_accuracy_one_keeps_old_hashes_and_noise_changes_them(tiny_recipe):
    """A noisy oracle is another D_i; the exact verifier (accuracy 1, the default) keeps every earlier run's hash."""
    from spa_lite.layout import Stage
    from spa_lite.runs import stage_config, stage_hash

    exact = tiny_recipe(**{"expand.judge": "verifier"})
    assert "verifier_accuracy" not in json.dumps(stage_config(exact, Stage("expand", 1)))
    noisy = tiny_recipe(**{"expand.judge": "verifier", "expand.verifier_accuracy": 0.7})
    assert stage_hash(noisy, Stage("expand", 1)) != stage_hash(exact, Stage("expand", 1))
    assert stage_hash(noisy, Stage("seed", 0)) == stage_hash(exact, Stage("seed", 0))
    assert "verifier_flip" not in json.dumps(stage_config(noisy, Stage("expand", 1)))
    short = tiny_recipe(**{"expand.judge": "verifier", "expand.verifier_accuracy": 0.7,
                           "expand.verifier_flip": "shorter"})
    assert stage_hash(short, Stage("expand", 1)) != stage_hash(noisy, Stage("expand", 1))
    assert "verifier_decided" not in json.dumps(stage_config(tiny_recipe(), Stage("expand", 1)))
    hybrid = tiny_recipe(**{"expand.verifier_decided": True})
    assert stage_hash(hybrid, Stage("expand", 1)) != stage_hash(tiny_recipe(), Stage("expand", 1))
    # undecided pairs dropped (the default) keeps the hash; kept with a coin's label is another D_i
    assert "verifier_undecided" not in json.dumps(stage_config(exact, Stage("expand", 1)))
    coin = tiny_recipe(**{"expand.judge": "verifier", "expand.verifier_undecided": "coin"})
    assert stage_hash(coin, Stage("expand", 1)) != stage_hash(exact, Stage("expand", 1))


def test_expand_with_the_coin_oracle_keeps_undecided_pairs_labelled_by_their_prompts_coin(tiny_model_dir, adapters,
                                                                                         tiny_recipe):
    """expand.verifier_undecided: coin through expand: a constraint no random tiny model meets leaves every pair
    undecided; the exact oracle drops them all, the coin oracle keeps them with y1 chosen exactly where
    coin_label(seed, prompt id) says."""
    from spa_lite.stages.expand import coin_label, expand_shard

    never = {"kind": "include_word", "params": {"word": "zqxjkv"}}
    qs = [{**q, "constraint": never} for q in QUESTIONS]
    stack = _stack(tiny_model_dir, adapters)
    drop = expand_shard(stack, _expand_recipe(tiny_recipe, 2, **{"expand.judge": "verifier"}), qs, seed=3)
    coin_recipe = _expand_recipe(tiny_recipe, 2, **{"expand.judge": "verifier", "expand.verifier_undecided": "coin"})
    coin = expand_shard(stack, coin_recipe, qs, seed=3)
    assert drop["rows"] == [] and drop["counts"]["undecided"] >= 3
    assert "undecided_coin" not in drop["counts"]
    rows = coin["rows"]
    assert len(rows) == coin["counts"]["undecided"] == coin["counts"]["undecided_coin"] == drop["counts"]["undecided"]
    assert [r["chosen_is_y1"] for r in rows] == [coin_label(coin_recipe.seed, r["id"]) for r in rows]
    assert all(r["confidence"] == 1.0 for r in rows)


def _crafted_sampler(word_counts: list[list[int]]):
    """A sample_fn for expand_shard: prompt k's samples are "w w ... w" with word_counts[k] words, ended with the
    end-of-turn token (not cut), so their token counts are set by the test, not by a random model."""
    from spa_lite.generation import Sample
    from spa_lite.logps import encode_response

    def sample_fn(m, tokenizer, prompts, num_samples, **_):
        out = []
        for k in range(len(prompts)):
            ss = []
            for j, w in enumerate(word_counts[k][:num_samples]):
                text = " ".join(["w"] * w) + f" {j}"  # distinct texts
                ids = encode_response(tokenizer, text)
                ss.append(Sample(text=text, token_ids=ids, num_tokens=len(ids), truncated=False))
            out.append(ss)
        return out
    return sample_fn


@pytest.mark.parametrize("n", [2, 4])
def test_max_length_ratio_pairs_only_length_matched_responses(tiny_model_dir, adapters, pi0_and_init, tiny_recipe, n):
    """expand.max_length_ratio: at N = 2 a pair whose lengths differ by more than the factor is dropped; at N > 2
    the pair is the largest Eq. 7 reward gap among length-matched pairs, by brute force on separately loaded
    models. Prompts without such a pair are counted as length_mismatched."""
    from spa_lite.stages.expand import expand_shard

    words = [[3, 3, 9, 20], [2, 6, 14, 30], [4, 4, 5, 30], [10, 11, 3, 25], [5, 18, 5, 5]]
    ratio, beta = 1.25, 0.1
    stack = _stack(tiny_model_dir, adapters)
    fn = _crafted_sampler(words)
    recipe = _expand_recipe(tiny_recipe, n, **{"expand.judge_logps": "forward", "expand.max_length_ratio": ratio})
    res = expand_shard(stack, recipe, QUESTIONS, seed=3, sample_fn=fn)
    free = expand_shard(stack, _expand_recipe(tiny_recipe, n, **{"expand.judge_logps": "forward"}), QUESTIONS,
                        seed=3, sample_fn=fn)
    assert "length_mismatched" not in free["counts"]
    samples = fn(None, stack.tokenizer, QUESTIONS, n)
    pol, ref = pi0_and_init
    rows, free_rows = {r["id"]: r for r in res["rows"]}, {r["id"]: r for r in free["rows"]}
    dropped = changed = 0
    for q, ss in zip(QUESTIONS, samples):
        t = [y.num_tokens for y in ss]
        ok = [(a, b) for a in range(len(ss)) for b in range(a + 1, len(ss)) if max(t[a], t[b]) <= ratio * min(t[a], t[b])]
        if not ok:
            assert q["id"] not in rows
            dropped += 1
            continue
        x = encode_prompt(stack.tokenizer, q["prompt"])
        r = [beta * (_naive_logp(pol, x, y.token_ids) - _naive_logp(ref, x, y.token_ids)) for y in ss]
        a, b = max(ok, key=lambda ab: abs(r[ab[0]] - r[ab[1]]))
        w, lo = (a, b) if r[a] > r[b] else (b, a)
        row = rows[q["id"]]
        assert (row["chosen"], row["rejected"]) == (ss[w].text, ss[lo].text)
        assert max(row["len_chosen"], row["len_rejected"]) <= ratio * min(row["len_chosen"], row["len_rejected"])
        changed += (free_rows[q["id"]]["chosen"], free_rows[q["id"]]["rejected"]) != (row["chosen"], row["rejected"])
    assert res["counts"]["length_mismatched"] == dropped >= 1
    assert len(res["rows"]) == len(QUESTIONS) - dropped
    if n == 4:  # the restriction chose other pairs than best vs worst somewhere (else this test shows nothing)
        assert changed >= 1


def test_max_length_ratio_bounds_hash_and_refusal(tiny_recipe):
    from spa_lite.errors import SpaError
    from spa_lite.layout import Stage
    from spa_lite.runs import stage_config, stage_hash

    off, on = tiny_recipe(), tiny_recipe(**{"expand.max_length_ratio": 1.25})
    assert "max_length_ratio" not in stage_config(off, Stage("expand", 1))["expand"]  # old runs keep their hash
    assert stage_config(on, Stage("expand", 1))["expand"]["max_length_ratio"] == 1.25
    assert stage_hash(off, Stage("expand", 1)) != stage_hash(on, Stage("expand", 1))
    with pytest.raises(SpaError, match="expand.max_length_ratio"):
        tiny_recipe(**{"expand.max_length_ratio": 0.8})
    with pytest.raises(SpaError, match="expand.max_length_ratio: 1.25 .*verifier"):
        tiny_recipe(**{"expand.max_length_ratio": 1.25, "expand.judge": "verifier"})
