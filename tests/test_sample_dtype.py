"""Decoding in a reduced precision (``expand.sample_dtype``): the bf16 working copy, its resolution, and what
expand, the stage hash and eval record."""

from __future__ import annotations

import copy

import pytest
import torch
from test_math import adapters  # noqa: F401  (module fixture)

from spa_lite import generation, sampling_copy
from spa_lite.errors import SpaError
from spa_lite.generation import sample_responses
from spa_lite.layout import Stage
from spa_lite.models import load_base_model
from spa_lite.runs import stage_config, stage_hash
from spa_lite.sampling_copy import merged_copy, resolve_sample_dtype, sampling_dtype
from spa_lite.stack import build_stack


@pytest.fixture
def stack(tiny_model_dir, adapters):  # noqa: F811
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    return build_stack(base, tok, [("seed", adapters["seed"]), ("iter1", adapters["iter1"])])


def _merged_bf16(m):
    """Independent reference: peft's own merge on a deep copy, then every parameter cast to bf16 (buffers, the
    rotary frequencies, stay float32 as transformers computes positions in float32)."""
    ref = copy.deepcopy(m).merge_and_unload()
    keep = {n: b for n, b in ref.named_buffers()}
    ref.to(torch.bfloat16)
    for n, b in keep.items():
        owner, _, attr = n.rpartition(".")
        ref.get_submodule(owner)._buffers[attr] = b
    return ref


def test_bf16_copy_equals_peft_merge_then_cast_and_leaves_the_model_alone(stack):
    ids = torch.tensor([stack.tokenizer("a small test of rounded merged weights")["input_ids"]])
    before = {n: p.detach().clone() for n, p in stack.model.named_parameters()}
    with stack.use(["seed", "iter1"]) as m:
        work = merged_copy(m, torch.bfloat16)
        got = work(input_ids=ids).logits
        ref = _merged_bf16(m)
        want = ref(input_ids=ids).logits
        full = m(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in work.parameters())
    assert torch.equal(got, want)
    # the rounding does move the logits (a random tiny model amplifies it: 16% of the largest logit here)
    assert 0 < (got.float() - full).abs().max().item() < 0.3 * full.abs().max().item()
    # the tied embedding / LM head stays one tensor in the copy
    inner = work
    if inner.config.tie_word_embeddings:
        assert inner.get_input_embeddings().weight is inner.get_output_embeddings().weight
    for n, p in stack.model.named_parameters():  # the model keeps its own float32 weights, untouched
        assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def test_sample_responses_decodes_with_the_bf16_copy(stack):
    kw = dict(num_samples=1, max_new_tokens=8, temperature=0.0, batch_size=2)
    prompts = [[{"role": "user", "content": q}] for q in ("Hi?", "Name a fast animal, please.")]
    with stack.use(["seed"]) as m:
        got = sample_responses(m, stack.tokenizer, prompts, dtype=torch.bfloat16, **kw)
        # reference: greedy decoding by hand with the independently merged and cast model, no KV cache
        ref = _merged_bf16(m)
        for p, out in zip(prompts, got, strict=True):
            ids = generation.encode_prompt(stack.tokenizer, p)
            toks = []
            for _ in range(len(out[0].token_ids)):
                logits = ref(input_ids=torch.tensor([ids + toks])).logits[0, -1].float()
                toks.append(int(logits.argmax()))
            assert toks == out[0].token_ids
        # the slot keeps one copy per (adapters, dtype): a float32 request builds a float32 copy again
        full = sample_responses(m, stack.tokenizer, prompts, **kw)
    assert m._spa_sampling_copy[0][1] is None
    assert all(len(s[0].token_ids) > 0 for s in full)


def test_resolution(monkeypatch, stack):
    monkeypatch.setattr(sampling_copy, "fast_bf16_cpu", lambda: True)
    assert resolve_sample_dtype("auto", "cpu", torch.float32) is torch.bfloat16
    assert resolve_sample_dtype("auto", "cuda", torch.float32) is None  # GPUs decode in the model's dtype
    assert resolve_sample_dtype("auto", "cpu", torch.bfloat16) is None
    assert sampling_dtype("auto", stack.model) is torch.bfloat16
    monkeypatch.setattr(sampling_copy, "fast_bf16_cpu", lambda: False)
    assert resolve_sample_dtype("auto", "cpu", torch.float32) is None
    assert sampling_dtype("auto", stack.model) is None
    assert resolve_sample_dtype("model", "cpu", torch.float32) is None
    assert resolve_sample_dtype("float32", "cpu", torch.float32) is None
    assert resolve_sample_dtype("float16", "cpu", torch.float32) is torch.float16
    assert resolve_sample_dtype("bfloat16", "cuda", torch.float16) is torch.bfloat16
    with pytest.raises(ValueError, match="int8"):
        resolve_sample_dtype("int8", "cpu", torch.float32)


def test_recipe_rejects_an_unknown_sample_dtype(tiny_recipe):
    with pytest.raises(SpaError, match="expand.sample_dtype"):
        tiny_recipe(**{"expand.sample_dtype": "int8"})


def test_stage_hash_leaves_the_decoding_precision_out(tiny_recipe):
    """Like model.device, the decoding precision changes how pi_{i-1} is sampled, not what: runs keep their hash
    across machines and across the version that added the setting (the manifest records the dtype used)."""
    st = Stage("expand", 1)
    hashes = {stage_hash(tiny_recipe(**{"expand.sample_dtype": v}), st) for v in ("model", "auto", "bfloat16")}
    assert len(hashes) == 1
    assert "sample_dtype" not in stage_config(tiny_recipe(), st)["expand"]
    assert stage_hash(tiny_recipe(**{"expand.temperature": 0.5}), st) not in hashes  # other settings still count


def test_expand_dtype_choices_and_where_eq7_log_probs_come_from(tiny_recipe, monkeypatch):
    from spa_lite.stages import expand, seed_dpo

    seen = []
    real = expand.sample_responses

    def spy(*a, **k):
        seen.append((k.get("dtype"), k.get("record_logps", False)))
        return real(*a, **k)

    monkeypatch.setattr(expand, "sample_responses", spy)
    full = tiny_recipe(**{"iterations": 1, "data.iter_prompts": [4], "expand.shard_size": 4,
                          "expand.sample_dtype": "model"})
    seed_dpo.run(full)
    m_full = expand.run(full, 1)
    assert seen == [(None, True)]
    assert m_full["summary"]["sample_dtype"] == ["model"]
    assert m_full["summary"]["sampler_logps"]["shards_reused"] == 1  # Eq. 7 took pi_0's log-probs from sampling

    seen.clear()
    low = tiny_recipe(**{"iterations": 1, "data.iter_prompts": [4], "expand.shard_size": 4,
                         "expand.sample_dtype": "bfloat16"})
    m_low = expand.run(low, 1, force=True)
    # bf16 asked for by name: Eq. 7 reads the rounded copy's log-probs (approximate), self-checked per token
    assert seen == [(torch.bfloat16, True)]
    assert m_low["summary"]["sample_dtype"] == ["bfloat16"]
    chk = m_low["summary"]["sampler_logps"]
    assert chk["per_token"] and chk["shards_reused"] == 1 and 0 < chk["max_abs_dev"] <= expand.REDUCED_TOL_PER_TOKEN
    assert m_low["summary"]["pairs"] + m_low["summary"]["identical"] + m_low["summary"]["empty"] == 4
    # ... and with judge_logps: forward, bf16 samples are judged by a float32 forward (exact Eq. 7)
    seen.clear()
    low_fwd = tiny_recipe(**{"iterations": 1, "data.iter_prompts": [4], "expand.shard_size": 4,
                             "expand.sample_dtype": "bfloat16", "expand.judge_logps": "forward"})
    m_low_fwd = expand.run(low_fwd, 1, force=True)
    assert seen == [(torch.bfloat16, False)]
    assert "sampler_logps" not in m_low_fwd["summary"]

    # auto on a CPU with bf16 units: expand keeps full precision while it records Eq. 7's log-probs ...
    monkeypatch.setattr(sampling_copy, "fast_bf16_cpu", lambda: True)
    seen.clear()
    auto = tiny_recipe(**{"iterations": 1, "data.iter_prompts": [4], "expand.shard_size": 4,
                          "expand.sample_dtype": "auto"})
    assert expand.run(auto, 1, force=True)["summary"]["sample_dtype"] == ["model"]
    assert seen == [(None, True)]
    # ... and decodes in bf16 where Eq. 7 scores pi_{i-1} by a forward anyway
    seen.clear()
    fwd = tiny_recipe(**{"iterations": 1, "data.iter_prompts": [4], "expand.shard_size": 4,
                         "expand.sample_dtype": "auto", "expand.judge_logps": "forward"})
    assert expand.run(fwd, 1, force=True)["summary"]["sample_dtype"] == ["bfloat16"]
    assert seen == [(torch.bfloat16, False)]
