"""The optional vLLM generation backend (spa_lite.vllm_backend).

Always on (CPU, no vLLM): the SpaError when vllm is missing, the conversion of vLLM outputs into Samples, the
requests ``VLLMSampler.sample`` builds (through a stand-in vllm module), and that the single adapter vLLM
would serve reproduces the adapter stack's logits. The real engine is tested only where vllm and CUDA are both
present (marker ``cuda``; run with ``pytest -m cuda tests/test_vllm_backend.py``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import float32_bound

from spa_lite.errors import SpaError
from spa_lite.generation import Sample, encode_prompt
from spa_lite.vllm_backend import (
    INSTALL_HINT,
    VLLMSampler,
    adapter_rank,
    completion_to_sample,
    import_vllm,
    outputs_to_samples,
    prepare_adapter,
    vllm_lora_rank,
)

ASSETS = Path(__file__).parent / "assets"
EOS = 2  # the tiny tokenizer's EOS


@pytest.fixture(scope="module")
def tok():
    from spa_lite.models import load_tokenizer

    return load_tokenizer(str(ASSETS / "tiny-tokenizer"))


# --------------------------------------------------------------------------------------------- stand-ins


@dataclass
class FakeCompletion:
    index: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None


@dataclass
class FakeRequestOutput:
    outputs: list[FakeCompletion]
    prompt_token_ids: list[int] = field(default_factory=list)


class FakeSamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeLoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class FakeLLM:
    """Records what generate() is given; answers each prompt with n completions derived from its seed."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []

    def generate(self, inputs, params, lora_request=None, use_tqdm=True):
        self.calls.append((inputs, params, lora_request))
        outs = []
        for x, p in zip(inputs, params):
            comps = []
            for i in range(p.n):
                s = p.seed + i
                toks = [10 + s % 50, 11 + s % 50]
                # sample 0 ends with EOS inside token_ids; sample 1 is cut by max_tokens
                comps.append(FakeCompletion(i, toks + [EOS], "", "stop") if i % 2 == 0
                             else FakeCompletion(i, toks * 3, "", "length"))
            outs.append(FakeRequestOutput(list(reversed(comps)), x["prompt_token_ids"]))  # out of order on purpose
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    vllm.lora = lora
    lora.request = request
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    return vllm


# --------------------------------------------------------------------------------------------- no vLLM


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(SpaError, match=r"pip install 'spa-lite\[vllm\]'"):
        import_vllm()
    with pytest.raises(SpaError, match="spa-lite\\[vllm\\]"):
        VLLMSampler("does-not-matter", max_lora_rank=16)
    assert INSTALL_HINT == "pip install 'spa-lite[vllm]'"


def test_lora_rank_rounding():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 9, 16, 48, 64, 300, 512)] == [1, 8, 8, 16, 16, 64, 64, 320, 512]
    with pytest.raises(SpaError, match="exceeds"):
        vllm_lora_rank(513)


# --------------------------------------------------------------------------------------------- conversion


def test_completion_to_sample(tok):
    stops = [EOS]
    # EOS among the tokens: kept, anything after it cut, not truncated
    s = completion_to_sample(FakeCompletion(0, [5, 6, EOS, 9], "ignored", "stop"), tok, stops)
    assert s == Sample(tok.decode([5, 6], skip_special_tokens=True).strip(), [5, 6, EOS], 3, False)
    # length: truncated, no stop token
    s = completion_to_sample(FakeCompletion(0, [5, 6, 7], "", "length"), tok, stops)
    assert s.truncated and s.token_ids == [5, 6, 7] and s.num_tokens == 3
    # EOS produced but left out of token_ids (stop_reason None = EOS): appended
    s = completion_to_sample(FakeCompletion(0, [5, 6], "", "stop", None), tok, stops)
    assert s.token_ids == [5, 6, EOS] and not s.truncated
    # a stop token id reported in stop_reason: appended
    s = completion_to_sample(FakeCompletion(0, [5, 6], "", "stop", 7), tok, [EOS, 7])
    assert s.token_ids == [5, 6, 7] and not s.truncated
    # EOS as the last allowed token: not truncated, as in the transformers backend
    s = completion_to_sample(FakeCompletion(0, [5, EOS], "", "length"), tok, stops)
    assert not s.truncated and s.num_tokens == 2
    # without a tokenizer vLLM's own text is used
    s = completion_to_sample(FakeCompletion(0, [5, EOS], "  hi ", "stop"), None, stops)
    assert s.text == "hi"
    with pytest.raises(SpaError, match="finish_reason"):
        completion_to_sample(FakeCompletion(0, [5], "", "abort"), tok, stops)


def test_outputs_to_samples_orders_by_index(tok):
    out = FakeRequestOutput([FakeCompletion(1, [7, EOS]), FakeCompletion(0, [5, EOS])])
    (pair,) = outputs_to_samples([out], tok, [EOS], 2)
    assert [s.token_ids for s in pair] == [[5, EOS], [7, EOS]]
    greedy = FakeRequestOutput([FakeCompletion(0, [5, EOS])])
    (pair,) = outputs_to_samples([greedy], tok, [EOS], 2)
    assert pair[0] == pair[1]
    with pytest.raises(SpaError, match="completions"):
        outputs_to_samples([FakeRequestOutput([FakeCompletion(0, [5])] * 3)], tok, [EOS], 2)


# --------------------------------------------------------------------------------------------- requests


def _write_adapter(path: Path, r: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": r}))
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_sampler_requests(fake_vllm, tok, tiny_model_dir, tmp_path):
    sampler = VLLMSampler(str(tiny_model_dir), max_lora_rank=12, dtype="bfloat16", gpu_memory_utilization=0.3,
                          seed=5, max_model_len=256, tokenizer=tok)
    kw = sampler.llm.kwargs
    assert kw["enable_lora"] and kw["max_lora_rank"] == 16 and kw["max_loras"] == 1
    assert kw["quantization"] == "bitsandbytes" and kw["dtype"] == "bfloat16" and kw["max_model_len"] == 256
    assert kw["model"] == str(tiny_model_dir) and kw["seed"] == 5 and kw["gpu_memory_utilization"] == 0.3
    assert sampler.stop_ids == [EOS]

    chats = [[{"role": "user", "content": "How do I boil an egg?"}], [{"role": "user", "content": "Hi"}]]
    ids = [7, 8, 9]
    a = _write_adapter(tmp_path / "pi0", 8)
    res = sampler.sample(chats + [ids], a, num_samples=2, max_new_tokens=6, temperature=0.7, top_p=0.9, seed=100)
    inputs, params, req = sampler.llm.calls[-1]
    assert [x["prompt_token_ids"] for x in inputs] == [encode_prompt(tok, c) for c in chats] + [ids]
    assert [p.seed for p in params] == [100, 102, 104]  # + n per sample in vLLM: 100..105, all distinct
    assert all(p.n == 2 and p.max_tokens == 6 and p.top_p == 0.9 and p.stop_token_ids == [EOS] for p in params)
    assert req.lora_int_id == 1 and req.lora_path == str(a.resolve())
    assert len(res) == 3 and all(len(ss) == 2 for ss in res)
    y1, y2 = res[0]
    assert y1.token_ids[-1] == EOS and not y1.truncated and y2.truncated  # sampling order restored
    assert y1.token_ids[:2] == [10 + 100 % 50, 11 + 100 % 50]

    # the same adapter keeps its id; another one (or the same folder re-exported) gets a new one; None = pi_init
    sampler.sample([ids], a, num_samples=2, max_new_tokens=6, seed=0)
    assert sampler.llm.calls[-1][2].lora_int_id == 1
    b = _write_adapter(tmp_path / "pi1", 16)
    sampler.sample([ids], b, num_samples=2, max_new_tokens=6, seed=0)
    assert sampler.llm.calls[-1][2].lora_int_id == 2
    (a / "adapter_model.safetensors").write_bytes(b"xy")
    sampler.sample([ids], a, num_samples=2, max_new_tokens=6, seed=0)
    assert sampler.llm.calls[-1][2].lora_int_id == 3
    sampler.sample([ids], None, num_samples=2, max_new_tokens=6, seed=0)
    assert sampler.llm.calls[-1][2] is None

    # greedy: one request per prompt, repeated as num_return_sequences would
    res = sampler.sample([ids], None, num_samples=2, max_new_tokens=6, temperature=0.0, seed=0)
    assert sampler.llm.calls[-1][1][0].n == 1 and res[0][0] == res[0][1]

    with pytest.raises(SpaError, match="max_lora_rank"):
        sampler.sample([ids], _write_adapter(tmp_path / "big", 17))
    with pytest.raises(SpaError, match="adapter_config"):
        sampler.sample([ids], tmp_path / "nothing")
    with pytest.raises(SpaError, match="token ids or of chat messages"):
        sampler.sample([[]])

    seen = []
    fn = sampler.as_sample_fn(a)
    out = fn(None, tok, chats, num_samples=2, max_new_tokens=4, seed=3, batch_size=8, on_batch=seen.append)
    assert len(out) == 2 and seen == [2]
    sampler.close()
    assert sampler.llm is None


def test_from_recipe(fake_vllm, tiny_recipe):
    recipe = tiny_recipe()
    s = VLLMSampler.from_recipe(recipe, max_k=2)
    kw = s.llm.kwargs
    assert kw["max_lora_rank"] == vllm_lora_rank(3 * recipe.model.lora_r)
    assert "quantization" not in kw  # the tiny recipe trains on a full-precision base
    assert kw["max_model_len"] >= recipe.model.max_length


# --------------------------------------------------------------------------------------------- the adapter


@torch.no_grad()
def test_prepared_adapter_reproduces_stack(tiny_recipe, tiny_model_dir, tmp_path):
    """The single adapter vLLM would serve (prepare_adapter) gives the stack's logits on the tiny model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from spa_lite.layout import adapter_dir
    from spa_lite.loading import load_stack
    from spa_lite.models import load_base_model
    from spa_lite.stack import save_adapter

    torch.set_num_threads(1)
    recipe = tiny_recipe()
    base, _ = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
                           adapter_name="seed")
    model.add_adapter("iter1", LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.2)
    save_adapter(model, "seed", adapter_dir(recipe, 0))
    save_adapter(model, "iter1", adapter_dir(recipe, 1))
    stack = load_stack(recipe, frozen_upto=1)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 13), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with stack.use([]) as m:
        base_logits = m(**batch, use_cache=False).logits
    with stack.use(["seed", "iter1"]) as m:
        ref = m(**batch, use_cache=False).logits

    out = prepare_adapter(stack, 1, tmp_path / "pi1")
    assert adapter_rank(out) == 8 and vllm_lora_rank(adapter_rank(out)) == 8
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    fresh, _ = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    single = PeftModel.from_pretrained(fresh, str(out))
    got = single(**batch, use_cache=False).logits
    assert (ref - base_logits).abs().max() > 1e-2  # the adapters matter
    assert (got - ref).abs().max().item() < float32_bound(fresh, ref.abs().max())


def test_prepare_adapter_refuses_modules_vllm_cannot_serve(tiny_recipe, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from spa_lite.models import load_base_model
    from spa_lite.stack import PolicyStack

    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                            task_type="CAUSAL_LM"), adapter_name="seed")
    with pytest.raises(SpaError, match="lm_head"):
        prepare_adapter(PolicyStack(model, tok, ["seed"]), 0, tmp_path / "pi0")


# --------------------------------------------------------------------------------------------- real vLLM

_HAVE_VLLM = importlib.util.find_spec("vllm") is not None
_HAVE_CUDA = torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not (_HAVE_VLLM and _HAVE_CUDA),
                    reason=f"needs vllm and a CUDA GPU (vllm installed: {_HAVE_VLLM}, CUDA: {_HAVE_CUDA})")
def test_vllm_engine_end_to_end(tiny_recipe, tmp_path):
    """A real vLLM engine over a small random Llama: seeded sampling is repeatable, Samples are well formed,
    and the served adapter is the stack's policy (greedy tokens agree with the stack's argmax, teacher-forced)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from spa_lite.models import load_base_model
    from spa_lite.stack import PolicyStack

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, initializer_range=0.2)  # peaked logits: greedy has no near-ties
    torch.manual_seed(0)
    model_dir = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)

    base, tok = load_base_model(str(model_dir), "none", "float32", "cuda")
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                           adapter_name="seed")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    stack = PolicyStack(model, tok, ["seed"])
    adapter = prepare_adapter(stack, 0, tmp_path / "pi0")

    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]
    with VLLMSampler(str(model_dir), max_lora_rank=8, dtype="float32", gpu_memory_utilization=0.3, seed=0,
                     quantization=None, max_model_len=256, tokenizer=tok, enforce_eager=True) as sampler:
        a = sampler.sample(chats, adapter, num_samples=2, max_new_tokens=16, temperature=1.0, seed=7)
        b = sampler.sample(chats, adapter, num_samples=2, max_new_tokens=16, temperature=1.0, seed=7)
        greedy = sampler.sample(chats, adapter, num_samples=1, max_new_tokens=16, temperature=0.0)
        greedy_base = sampler.sample(chats, None, num_samples=1, max_new_tokens=16, temperature=0.0)
    assert [[s.token_ids for s in ss] for ss in a] == [[s.token_ids for s in ss] for ss in b]
    assert any(ss[0].token_ids != ss[1].token_ids for ss in a)
    for ss in a:
        for s in ss:
            assert isinstance(s, Sample) and s.num_tokens == len(s.token_ids) <= 16
            assert s.truncated == (tok.eos_token_id not in s.token_ids)

    def agreement(names, samples):
        hits = total = 0
        with torch.no_grad(), stack.use(names) as m:
            for chat, (s,) in zip(chats, samples):
                p = encode_prompt(tok, chat)
                ids = torch.tensor([p + s.token_ids], device="cuda")
                pred = m(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].argmax(-1).tolist()
                hits += sum(int(x == y) for x, y in zip(pred, s.token_ids))
                total += len(s.token_ids)
        return hits / max(total, 1)

    assert agreement(["seed"], greedy) >= 0.9
    assert agreement([], greedy_base) >= 0.9
