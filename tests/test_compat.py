"""spa_lite.compat: each library-internals patch applies only inside the releases it was tested with; outside
them spa-lite takes the public-API fallback (the hf engine for decoding, the peft model instead of a merged copy,
no bf16 probe, a 4-bit CPU base refused), and its results stay those of the fallback path."""

from __future__ import annotations

import pytest
from test_math import adapters  # noqa: F401  (module fixture)

from spa_lite import compat, generation, generation_hf
from spa_lite.errors import SpaError
from spa_lite.generation import sample_responses
from spa_lite.models import load_base_model
from spa_lite.sampling_copy import fast_bf16_cpu, merged_copy, sampling_model
from spa_lite.stack import build_stack

PROMPTS = [[{"role": "user", "content": q}] for q in ("Hi?", "Name a fast animal.", "Why is the sky blue at noon?")]


@pytest.fixture
def stack(tiny_model_dir, adapters):  # noqa: F811
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    return build_stack(base, tok, [("seed", adapters["seed"])])


def _untested(monkeypatch, package: str) -> None:
    """Pretend the installed ``package`` is a release after the tested range."""
    real = compat.installed
    hi = compat.TESTED[package][1]
    monkeypatch.setattr(compat, "installed", lambda p: (hi[0], hi[1] + 1) if p == package else real(p))
    monkeypatch.delenv("SPA_LITE_TRUST_INTERNALS", raising=False)


def test_installed_releases_are_inside_the_tested_ranges():
    # the table describes this environment: a stale table would silently switch every patch off
    for patch, pkg in compat.PATCHES.items():
        if compat.installed(pkg) is not None:
            assert compat.supported(patch), (patch, pkg, compat.installed(pkg), compat.TESTED[pkg])


def test_version_check(monkeypatch):
    _untested(monkeypatch, "transformers")
    assert not compat.supported("kv_cache_in_place") and not compat.fast_decoding_supported()
    assert compat.supported("module_tree")  # a torch patch does not depend on transformers' release
    monkeypatch.setenv("SPA_LITE_TRUST_INTERNALS", "1")
    assert compat.fast_decoding_supported()
    monkeypatch.setattr(compat, "installed", lambda p: None)  # not installed / unreadable version
    monkeypatch.delenv("SPA_LITE_TRUST_INTERNALS")
    assert not compat.supported("bnb_cpu_probe")
    assert all(not ok for _, _, ok in compat.report())


def test_decoding_falls_back_to_generate_outside_the_tested_transformers(stack, monkeypatch):
    kw = dict(num_samples=2, max_new_tokens=6, temperature=0.9, seed=5, batch_size=2, record_logps=True)
    with stack.use(["seed"]) as m:
        hf = sample_responses(m, stack.tokenizer, PROMPTS, engine="hf", **kw)
        fast = sample_responses(m, stack.tokenizer, PROMPTS, engine="fast", **kw)
        _untested(monkeypatch, "transformers")
        calls = []
        real = generation_hf.generate_hf
        monkeypatch.setattr(generation, "generate_hf", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(generation, "_decode", lambda *a, **k: pytest.fail("the fast loop ran"))
        fallback = sample_responses(m, stack.tokenizer, PROMPTS, engine="fast", **kw)
    assert calls  # transformers' generate drew them
    ids = lambda res: [[s.token_ids for s in ss] for ss in res]  # noqa: E731
    # the hf engine's draws (batch-seeded), not the fast engine's (row-seeded): the fallback is the hf path itself
    assert ids(fallback) == ids(hf) and ids(fast) != ids(hf)
    assert [[s.logp for s in ss] for ss in fallback] == [[s.logp for s in ss] for ss in hf]


def test_no_merged_copy_and_no_bf16_probe_outside_the_tested_torch(stack, monkeypatch):
    with stack.use(["seed"]) as m:
        assert merged_copy(m) is not None
        _untested(monkeypatch, "torch")
        assert merged_copy(m) is None
        with sampling_model(m) as work:
            assert work is m  # decoding runs on the peft model itself
        out = sample_responses(m, stack.tokenizer, PROMPTS, num_samples=2, max_new_tokens=4, seed=1)
    assert len(out) == len(PROMPTS) and all(len(ss) == 2 for ss in out)
    assert fast_bf16_cpu() is False


def test_4bit_cpu_base_is_refused_outside_the_tested_bitsandbytes(tiny_model_dir, monkeypatch):
    """The flag that keeps a 4-bit CPU base differentiable is a bitsandbytes internal: under an untested release
    it could be a silent no-op (training would lose the gradient), so the 4-bit CPU base is refused, saying what
    to set; inside the range every Linear4bit gets the flag off."""
    bnb = pytest.importorskip("bitsandbytes.nn", reason="bitsandbytes cannot be imported")
    assert compat.bnb_cpu_training_supported()
    base, _ = load_base_model(str(tiny_model_dir), quantization="4bit", dtype="float32", device="cpu")
    layers = [m for m in base.modules() if isinstance(m, bnb.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    _untested(monkeypatch, "bitsandbytes")
    assert not compat.bnb_cpu_training_supported() and compat.supported("kv_cache_in_place")
    with pytest.raises(SpaError, match=r"quantization '4bit' on the CPU .* set model.quantization: none"):
        load_base_model(str(tiny_model_dir), quantization="4bit", dtype="float32", device="cpu")
    full, _ = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    assert not any(isinstance(m, bnb.Linear4bit) for m in full.modules())  # full precision does not need it
    monkeypatch.setenv("SPA_LITE_TRUST_INTERNALS", "1")
    base, _ = load_base_model(str(tiny_model_dir), quantization="4bit", dtype="float32", device="cpu")
    assert all(m.support_avx512bf16_for_cpu is False for m in base.modules() if isinstance(m, bnb.Linear4bit))


def test_decoder_layer_classes_reads_transformers_no_split_modules():
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from spa_lite.compat import decoder_layer_classes

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    assert decoder_layer_classes(model) == {"LlamaDecoderLayer"}
    assert decoder_layer_classes(SimpleNamespace()) == set()  # names none: FSDP refuses (fsdp._layer_classes)
