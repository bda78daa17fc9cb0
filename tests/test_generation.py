"""The fast sampling engine (merged working copy, length-sorted batches, rows leaving the batch), the
progress output where no terminal is attached, and per-stage memory in manifests."""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import pytest
import torch
from conftest import float32_bound
from test_math import adapters  # noqa: F401  (module fixture)

from spa_lite.generation import sample_responses
from spa_lite.models import load_base_model
from spa_lite.sampling_copy import merged_copy
from spa_lite.stack import build_stack

# prompts of different lengths, so that batches pad and sort
QUESTIONS = ["Hi?", "How do I boil an egg quickly and safely at home?", "Name a fast animal.",
             "Why is the sky blue during the day but red at sunset, and what does that say?", "Tip?"]


@pytest.fixture
def stack(tiny_model_dir, adapters):  # noqa: F811
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    return build_stack(base, tok, [("seed", adapters["seed"]), ("iter1", adapters["iter1"])])


def _prompts():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_merged_copy_computes_the_stack_and_leaves_the_base_alone(stack):
    ids = torch.tensor([stack.tokenizer("a small test of merged weights")["input_ids"]])
    before = {n: p.detach().clone() for n, p in stack.model.named_parameters()}
    for names in (["seed", "iter1"], ["seed"], []):
        with stack.use(names) as m:
            want = m(input_ids=ids).logits
            work = merged_copy(m)
            got = work(input_ids=ids).logits
        # float32 rounding at this model's depth and width (conftest.float32_bound), not one machine's 1e-5
        assert (got - want).abs().max().item() < float32_bound(m, want.abs().max()), names
        assert not any("lora" in n for n, _ in work.named_parameters())
        # tensors no adapter touches are shared, not copied
        emb = work.get_input_embeddings().weight
        assert emb.data_ptr() == stack.model.get_base_model().get_input_embeddings().weight.data_ptr()
    for n, p in stack.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_greedy_fast_equals_hf(stack):
    kw = dict(num_samples=1, max_new_tokens=12, temperature=0.0, batch_size=2)
    with stack.use(["seed", "iter1"]) as m:
        # a random tiny model rarely ends its turn: a frequent token ends it too, so rows stop at different steps
        first = sample_responses(m, stack.tokenizer, _prompts(), engine="hf", **kw)
        counts = Counter(t for ss in first for t in ss[0].token_ids[1:])
        m.generation_config.eos_token_id = [stack.tokenizer.eos_token_id, counts.most_common(1)[0][0]]
        hf = sample_responses(m, stack.tokenizer, _prompts(), engine="hf", **kw)
        # max_rows 2: prompts wait and take the rows that finished ones free (continuous batching)
        fast = sample_responses(m, stack.tokenizer, _prompts(), engine="fast", max_rows=2, **kw)
        fast_b1 = sample_responses(m, stack.tokenizer, _prompts(), engine="fast", max_rows=1, **kw)
    assert [s[0].token_ids for s in fast] == [s[0].token_ids for s in hf]
    assert [s[0].text for s in fast] == [s[0].text for s in hf]
    assert [s[0].truncated for s in fast] == [s[0].truncated for s in hf]
    assert [s[0].token_ids for s in fast_b1] == [s[0].token_ids for s in hf]
    assert len({s[0].num_tokens for s in fast}) > 1  # rows stopped at different steps


def test_samples_do_not_depend_on_batching_and_follow_the_seed(stack):
    kw = dict(num_samples=3, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5)
    with stack.use(["seed"]) as m:
        a = sample_responses(m, stack.tokenizer, _prompts(), batch_size=2, max_rows=6, record_logps=True, **kw)
        b = sample_responses(m, stack.tokenizer, _prompts(), batch_size=5, **kw)
        c = sample_responses(m, stack.tokenizer, _prompts(), batch_size=1, max_rows=3, **{**kw, "seed": 6})
        # the last prompt alone, as prompt 4 of a call: same draws as inside the full call
        d = sample_responses(m, stack.tokenizer, [_prompts()[0]] * 4 + [_prompts()[4]], batch_size=3, max_rows=9, **kw)
    ids = lambda res: [[s.token_ids for s in ss] for ss in res]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert ids(d)[4] == ids(a)[4]
    assert all(len(ss) == 3 for ss in a) and len({tuple(s.token_ids) for ss in a for s in ss}) > 5
    assert all(s.logp is not None and s.logp < 0 for ss in a for s in ss)


def test_sampled_frequencies_follow_the_policy(stack):
    """First-token frequencies over 3000 draws vs softmax(logits / T) restricted to the top-p nucleus."""
    T, top_p, n = 0.7, 0.9, 3000
    prompt = _prompts()[2]
    from spa_lite.generation import encode_prompt

    with stack.use(["seed"]) as m:
        x = torch.tensor([encode_prompt(stack.tokenizer, prompt)])
        logits = m(input_ids=x).logits[0, -1].double()
        out = sample_responses(m, stack.tokenizer, [prompt], num_samples=n, max_new_tokens=1, temperature=T,
                               top_p=top_p, seed=11, batch_size=1)
    probs = torch.softmax(logits / T, -1)
    order = probs.argsort(descending=True)
    keep = (probs[order].cumsum(0) - probs[order]) < top_p  # the nucleus: mass before the token below top_p
    nucleus = order[keep]
    want = torch.zeros_like(probs)
    want[nucleus] = probs[nucleus] / probs[nucleus].sum()
    counts = Counter(ss[0] for s in out for ss in [s[0].token_ids])
    assert set(counts) <= set(nucleus.tolist())
    for tok, p in [(int(t), want[t].item()) for t in nucleus[:5]]:
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(counts.get(tok, 0) / n - p) < 5 * sd + 1e-3, (tok, counts.get(tok, 0) / n, p)


def test_min_new_tokens_and_unsupported_settings(stack):
    with stack.use(["seed"]) as m:
        m.generation_config.eos_token_id = list(range(len(stack.tokenizer)))  # every token ends the turn
        m.generation_config.min_new_tokens = 4
        out = sample_responses(m, stack.tokenizer, _prompts(), num_samples=1, max_new_tokens=8, temperature=0.0)
        assert all(s[0].num_tokens == 5 and not s[0].truncated for s in out)
        m.generation_config.min_new_tokens = None
        # a repetition penalty is a processor only transformers' generate applies: the fast engine defers to it
        m.generation_config.repetition_penalty = 1.5
        m.generation_config.eos_token_id = stack.tokenizer.eos_token_id
        kw = dict(num_samples=1, max_new_tokens=8, temperature=0.0, batch_size=2)
        fast = sample_responses(m, stack.tokenizer, _prompts(), **kw)
        hf = sample_responses(m, stack.tokenizer, _prompts(), engine="hf", **kw)
        m.generation_config.repetition_penalty = None
        plain = sample_responses(m, stack.tokenizer, _prompts(), **kw)
    assert [s[0].token_ids for s in fast] == [s[0].token_ids for s in hf]
    assert [s[0].token_ids for s in fast] != [s[0].token_ids for s in plain]
    with pytest.raises(ValueError, match="engine"):
        sample_responses(m, stack.tokenizer, _prompts(), engine="vllm")


def test_kv_buffers_append_in_place_and_match_a_cache_free_forward(stack, monkeypatch):
    """The fast engine's KV buffers (appends written into spare room, rows leaving, padding columns dropped) give
    the samples of transformers' own concatenating cache, and log-probs equal to a forward without any cache."""
    import spa_lite.generation as G
    from spa_lite.generation import encode_prompt

    caches = []
    real = G._kv_buffers
    kw = dict(num_samples=2, max_new_tokens=10, temperature=0.9, seed=3, batch_size=2, max_rows=4, record_logps=True)
    with stack.use(["seed", "iter1"]) as m:
        first = sample_responses(m, stack.tokenizer, _prompts(), **kw)
        counts = Counter(t for ss in first for s in ss for t in s.token_ids[1:])
        m.generation_config.eos_token_id = [stack.tokenizer.eos_token_id, counts.most_common(1)[0][0]]
        runs = {}
        for name, room, fn in (("cat", 16, lambda cache: None), ("room1", 1, real), ("room16", 16, real)):
            monkeypatch.setattr(G, "KV_ROOM", room)
            monkeypatch.setattr(G, "_kv_buffers", lambda cache, fn=fn: (fn(cache), caches.append(cache)))
            runs[name] = sample_responses(m, stack.tokenizer, _prompts(), **kw)
        ids = lambda res: [[s.token_ids for s in ss] for ss in res]  # noqa: E731
        assert ids(runs["room1"]) == ids(runs["cat"]) == ids(runs["room16"])
        assert len({s.num_tokens for ss in runs["cat"] for s in ss}) > 1  # rows left at different steps
        for k, ss in enumerate(runs["room1"]):
            x = encode_prompt(stack.tokenizer, _prompts()[k])
            for s, s_cat in zip(ss, runs["cat"][k], strict=True):
                full = torch.tensor([x + s.token_ids])
                logits = m(input_ids=full).logits[0, len(x) - 1 : -1]
                lp = torch.log_softmax(logits.double(), -1)
                want = lp.gather(1, torch.tensor(s.token_ids)[:, None]).sum().item()
                # a token's log-prob moves by at most twice its logits' float32 error (log_softmax is 2-Lipschitz
                # in the max norm), and the sum adds one such error per token
                tol = 2 * len(s.token_ids) * float32_bound(m, logits.abs().max())
                assert abs(s.logp - want) < tol and abs(s.logp - s_cat.logp) < tol
    grown = [lay for c in caches for lay in c.layers if isinstance(lay, G._GrowingLayer) and lay.kbuf is not None]
    assert grown, "the buffers were never used"


def test_log_progress_lines():
    from spa_lite.ui import LogProgress

    buf = io.StringIO()
    p = LogProgress(stream=buf)
    t = p.add_task("sample iter 1", total=20, info="0 shards done before")
    for _ in range(20):
        p.advance(t)
    u = p.add_task("train", total=10, info="")
    p.update(u, completed=3, info="loss 0.69")
    p.close()
    lines = buf.getvalue().splitlines()
    assert "sample iter 1: start, 20 to do (0 shards done before)" in lines[0]
    steps = [ln for ln in lines if "sample iter 1: " in ln and "eta" in ln]
    assert len(steps) == 9 and "2/20 (10%)" in steps[0] and "18/20 (90%)" in steps[-1]
    assert any("sample iter 1: done, 20/20" in ln for ln in lines)
    assert "train: stopped at 3/10" in lines[-1]


def test_progress_is_log_lines_without_a_terminal(monkeypatch, capsys):
    from spa_lite import ui

    monkeypatch.delenv("SPA_LITE_QUIET", raising=False)
    monkeypatch.setattr(ui, "interactive", lambda con=None: False)
    with ui.task("answers", 4) as advance:
        advance(2)
        advance(2)
    err = capsys.readouterr().err
    assert "answers: start, 4 to do" in err and "answers: done, 4/4" in err


def test_manifest_records_stage_peak_memory(tiny_recipe):
    from spa_lite.memory import release_memory
    from spa_lite.stages import expand, seed_dpo

    r = tiny_recipe(iterations=1)
    seed_dpo.run(r)
    info = release_memory()
    assert info["rss_after_gb"] is None or info["rss_after_gb"] > 0
    m = expand.run(r, 1)
    mem = json.loads((r.run_path / "iter1/expand/manifest.json").read_text())["memory"]
    assert mem == m["memory"]
    assert mem["peak_rss_gb"] >= mem["end_rss_gb"] > 0.05  # a Python process with torch loaded
