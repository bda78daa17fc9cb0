"""Eq. 7's log pi_{i-1}(y|x) read off the sampling pass (expand.judge_logps = sampler).

Checked against an independently loaded, merged pi_{i-1} scored token by token (no padding, no cache), and
against the forward-pass judge end to end.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_math import _merged, _naive_logp, adapters  # noqa: F401  (module fixture)

from spa_lite.generation import encode_prompt, sample_responses
from spa_lite.judge import judge_logprob
from spa_lite.models import load_base_model
from spa_lite.stack import build_stack

QUESTIONS = ["How do I boil an egg?", "Name a fast animal.", "Why is the sky blue?", "Give a tip for sleep."]


def _stack(model_dir, adapters):
    base, tok = load_base_model(str(model_dir), quantization="none", dtype="float32", device="cpu")
    return build_stack(base, tok, [("seed", adapters["seed"])])


@pytest.mark.parametrize("engine", ["fast", "hf"])
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.8), (0.0, 1.0)])
def test_recorded_logps_are_the_policys_own(tiny_model_dir, adapters, temperature, top_p, engine):  # noqa: F811
    stack = _stack(tiny_model_dir, adapters)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    kw = dict(num_samples=2 if temperature > 0 else 1, max_new_tokens=10, temperature=temperature, top_p=top_p,
              seed=7, batch_size=3, engine=engine)
    with stack.use(["seed"]) as m:
        # a random tiny model rarely ends a turn: make its most frequent token a stop token as well, so that
        # the rows of a batch stop at different steps (the recorder must ignore what follows a stop)
        first = sample_responses(m, stack.tokenizer, prompts, **kw)
        seqs = [s.token_ids for ss in first for s in ss]
        counts = Counter(t for x in seqs for t in x[1:])
        # the most frequent token that first occurs at different steps of different sequences
        spread = [t for t, _ in counts.most_common()
                  if len({x.index(t) if t in x else len(x) for x in seqs}) > 1]
        m.generation_config.eos_token_id = [stack.tokenizer.eos_token_id, spread[0]]
        plain = sample_responses(m, stack.tokenizer, prompts, **kw)
        rec = sample_responses(m, stack.tokenizer, prompts, record_logps=True, **kw)
    # recording changes nothing that is drawn
    assert [[s.token_ids for s in ss] for ss in rec] == [[s.token_ids for s in ss] for ss in plain]
    assert all(s.logp is None for ss in plain for s in ss)
    # log pi_0(y|x) at temperature 1, whatever the sampling temperature and top-p: a merged pi_0, loaded
    # separately, scored one unpadded sequence at a time
    independent = _merged(tiny_model_dir, adapters["seed"])
    lengths = set()
    for q, ss in zip(prompts, rec, strict=True):
        x = encode_prompt(stack.tokenizer, q)
        for s in ss:
            want = _naive_logp(independent, x, s.token_ids)
            assert s.logp == pytest.approx(want, abs=1e-4 + 1e-6 * abs(want))
            lengths.add(len(s.token_ids))
    assert len(lengths) > 1  # sequences that stop at different steps were covered


def test_judge_reuses_recorded_logps_and_falls_back(tiny_model_dir, adapters, monkeypatch):  # noqa: F811
    from spa_lite import judge as judge_mod

    stack = _stack(tiny_model_dir, adapters)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    with stack.use(["seed"]) as m:
        samples = sample_responses(m, stack.tokenizer, prompts, num_samples=2, max_new_tokens=10, temperature=1.0,
                                   seed=3, batch_size=4, record_logps=True)
    x = [encode_prompt(stack.tokenizer, q) for q in prompts]
    y1, y2 = [ss[0].token_ids for ss in samples], [ss[1].token_ids for ss in samples]
    known = ([ss[0].logp for ss in samples], [ss[1].logp for ss in samples])

    calls = []
    real = judge_mod.response_logps
    monkeypatch.setattr(judge_mod, "response_logps",
                        lambda st, names, *a, **k: calls.append(list(names)) or real(st, names, *a, **k))
    forward = judge_logprob(stack, ["seed"], [], x, y1, y2, batch_size=2)
    assert calls.count(["seed"]) == 2 and calls.count([]) == 2  # 2 batches x (judge, reference)

    calls.clear()
    check: dict = {}
    reused = judge_logprob(stack, ["seed"], [], x, y1, y2, batch_size=2, judge_logps=known, check=check)
    assert calls.count(["seed"]) == 1 and calls.count([]) == 2  # only the self-check (first 2 pairs) runs the judge
    assert check["reused"] and check["checked"] == 4 and check["max_abs_dev"] < 1e-4
    for a, b in zip(forward, reused, strict=True):
        assert b["logratio_1"] == pytest.approx(a["logratio_1"], abs=1e-4)
        assert b["logratio_2"] == pytest.approx(a["logratio_2"], abs=1e-4)
        assert b["p"] == pytest.approx(a["p"], abs=1e-5)

    # recorded values that disagree with the policy (e.g. a repetition penalty ahead of the recorder) are dropped
    calls.clear()
    wrong = ([v + 0.5 for v in known[0]], known[1])
    check = {}
    fallback = judge_logprob(stack, ["seed"], [], x, y1, y2, batch_size=2, judge_logps=wrong, check=check)
    assert not check["reused"] and check["max_abs_dev"] == pytest.approx(0.5, abs=1e-3)
    assert calls.count(["seed"]) == 3  # the self-check, then both batches by forward passes
    assert [r["p"] for r in fallback] == pytest.approx([r["p"] for r in forward], abs=1e-6)

    # per-token tolerance (log-probs of a reduced-precision copy): an offset of 0.05 nats per token passes a
    # 0.1-per-token check and is kept; 0.3 per token fails it and falls back to forward passes
    for per_tok, kept in ((0.05, True), (0.3, False)):
        off = ([v + per_tok * len(y) for v, y in zip(known[0], y1, strict=True)], known[1])
        check = {"tol": 0.1, "per_token": True}
        got = judge_logprob(stack, ["seed"], [], x, y1, y2, batch_size=2, judge_logps=off, check=check)
        assert check["reused"] is kept and check["max_abs_dev"] == pytest.approx(per_tok, abs=1e-4)
        if kept:  # the offset reached the labels: r(y1) is larger by exactly the offset
            assert [b["logratio_1"] - a["logratio_1"] for a, b in zip(forward, got, strict=True)] == pytest.approx(
                [per_tok * len(y) for y in y1], abs=1e-3)
        else:
            assert [r["p"] for r in got] == pytest.approx([r["p"] for r in forward], abs=1e-6)


def test_expand_same_pairs_with_sampler_or_forward_logps(tiny_recipe):
    from spa_lite.config import load_recipe  # noqa: F401
    from spa_lite.stages import expand, seed_dpo

    fwd = tiny_recipe(name="fwd", **{"expand.judge_logps": "forward"})
    smp = tiny_recipe(name="smp")
    assert smp.expand.judge_logps == "sampler"  # the default
    seed_dpo.run(fwd)
    seed_dpo.run(smp)
    a = expand.run(fwd, 1)["summary"]
    b = expand.run(smp, 1)["summary"]
    assert "sampler_logps" not in a
    assert b["sampler_logps"]["shards_reused"] == b["sampler_logps"]["shards"] > 0
    assert b["sampler_logps"]["max_abs_dev"] < 1e-4
    ra = [json.loads(x) for x in (fwd.run_path / "iter1/expand/data.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (smp.run_path / "iter1/expand/data.jsonl").read_text().splitlines()]
    assert len(ra) == len(rb) > 0
    for u, v in zip(ra, rb, strict=True):
        assert (u["chosen"], u["rejected"]) == (v["chosen"], v["rejected"])
        assert v["p_y1"] == pytest.approx(u["p_y1"], abs=1e-5)
        assert v["logratio_chosen"] == pytest.approx(u["logratio_chosen"], abs=1e-4)
