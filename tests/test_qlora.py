"""The 4-bit (QLoRA) path on CPU: bitsandbytes NF4 base, LoRA adapters trained on top.

seed-dpo, expand --iter 1 and train --iter 1 run on the tiny model with model.quantization=4bit; the base
Linear4bit weights stay bit-identical while the LoRA weights move; gradients through the 4-bit base are the
same whether or not an eval-mode forward (the reference pass) ran first.
"""

from __future__ import annotations

import json

import pytest
import torch

try:
    import bitsandbytes as bnb  # noqa: F401
    from bitsandbytes.nn import Linear4bit
except Exception as e:  # pragma: no cover - depends on the install
    pytest.skip(f"bitsandbytes cannot be imported: {e}", allow_module_level=True)

from conftest import tiny_overrides

from spa_lite.config import load_recipe
from spa_lite.loading import load_stack
from spa_lite.stages import expand, seed_dpo, train


def q_recipe(tiny_model_dir, tiny_data, runs, **extra):
    return load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, runs, threads=1, iterations=1,
                                            **{"model.quantization": "4bit", "data.iter_prompts": [6], **extra}))


def linear4bit(model) -> dict[str, Linear4bit]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def snapshot_4bit(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for n, m in linear4bit(model).items()}


class Spy:
    def __init__(self, module):
        self.module, self.real, self.stack = module, module.load_stack, None

    def __call__(self, recipe, frozen_upto, trainable=None, **kw):
        self.stack = self.real(recipe, frozen_upto, trainable, **kw)
        self.lora = {n: p.detach().clone() for n, p in self.stack.model.named_parameters() if "lora_" in n}
        self.other = {n: p.detach().clone() for n, p in self.stack.model.named_parameters() if "lora_" not in n}
        self.q = snapshot_4bit(self.stack.model)
        return self.stack


@pytest.fixture(scope="module")
def qrun(tiny_model_dir, tiny_data, tmp_path_factory):
    r = q_recipe(tiny_model_dir, tiny_data, tmp_path_factory.mktemp("qlora") / "runs")
    spies = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, mod in (("seed", seed_dpo), ("train", train)):
            spies[name] = Spy(mod)
            mp.setattr(mod, "load_stack", spies[name])
        seed_dpo.run(r)
        expand.run(r, 1)
        train.run(r, 1)
    return r, spies


def test_4bit_base_is_quantized(qrun):
    r, spies = qrun
    st = spies["train"].stack
    q = linear4bit(st.model)
    assert q, "no Linear4bit layers: the base was not loaded in 4 bits"
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in q.values())
    # every targeted projection is a LoRA layer over a 4-bit base layer
    assert all(".base_layer" in n for n in q)
    assert {n.split(".")[-2] for n in q} >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_4bit_stages_complete(qrun):
    r, _ = qrun
    for key in ("seed", "iter1/expand", "iter1/train"):
        m = json.loads((r.run_path / key / "manifest.json").read_text())
        assert m["status"] == "complete"
        assert m["config"].get("model", m["recipe"]["model"])["quantization"] == "4bit"
    data = [json.loads(x) for x in (r.run_path / "iter1/expand/data.jsonl").read_text().splitlines()]
    assert data and all({"chosen", "rejected", "p_y1", "logratio_chosen"} <= set(d) for d in data)
    # Eq. 7 took pi_0's log-probs from the 4-bit sampling pass; they matched a forward pass
    check = json.loads((r.run_path / "iter1/expand/manifest.json").read_text())["summary"]["sampler_logps"]
    assert check["shards_reused"] == check["shards"] > 0 and check["max_abs_dev"] < 1e-3, check
    for key in ("seed", "iter1/train"):
        metrics = [json.loads(x) for x in (r.run_path / key / "metrics.jsonl").read_text().splitlines()]
        assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
        assert (r.run_path / key / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage,adapter", [("seed", "seed"), ("train", "iter1")])
def test_4bit_base_unchanged_lora_moved(qrun, stage, adapter):
    _, spies = qrun
    spy = spies[stage]
    model = spy.stack.model
    # base: the packed NF4 bytes and their scales, and every other non-LoRA weight, are bit-identical
    after = snapshot_4bit(model)
    assert after.keys() == spy.q.keys()
    for n, (w, absmax) in after.items():
        assert torch.equal(w, spy.q[n][0]), f"4-bit weight {n} changed"
        assert torch.equal(absmax, spy.q[n][1]), f"4-bit scales of {n} changed"
        assert not getattr(linear4bit(model)[n].weight.quant_state, "packing_format_for_cpu", False)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), spy.other[n]), f"base weight {n} changed"
    # LoRA: the trained adapter moved (B starts at zero), frozen ones did not
    moved = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p.detach(), spy.lora[n])]
    assert moved and all(f".{adapter}." in n for n in moved)
    assert all(f".{adapter}." in n for n in moved)
    b = [n for n in spy.lora if "lora_B" in n and f".{adapter}." in n]
    assert b and all(n in moved for n in b)
    if adapter == "seed":  # 6 steps: A moves too once B is non-zero
        a = [n for n in spy.lora if "lora_A" in n and f".{adapter}." in n]
        assert all(n in moved for n in a)


def test_4bit_adapter_loads_with_peft(qrun, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    r, _ = qrun
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
        device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(r.run_path / "iter1/train/adapter"))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(out).all()


def test_4bit_gradients_do_not_depend_on_a_prior_eval_forward(qrun):
    """bitsandbytes repacks 4-bit weights for a CPU inference kernel without autograd on the first eval-mode,
    no-grad forward; the training loop runs one (the reference pass) before every policy forward, so the
    gradients must be the same as without it."""
    r, _ = qrun

    def grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        st = load_stack(r, -1, "probe")
        with torch.no_grad():
            for n, p in st.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        ids = torch.randint(0, 300, (2, 10))
        if eval_first:
            st.model.eval()
            with torch.no_grad():
                st.model(input_ids=ids)
        st.model.train()
        st.model(input_ids=ids).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in st.model.named_parameters() if p.grad is not None}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys() and plain
    for n in plain:
        torch.testing.assert_close(after_eval[n], plain[n], msg=n)
        assert plain[n].abs().sum() > 0, f"no gradient reaches {n}"


def test_fsdp_refuses_4bit_base_with_advice(qrun):
    from spa_lite.errors import SpaError
    from spa_lite.fsdp import shard_stack

    _, spies = qrun
    with pytest.raises(SpaError, match="multi_gpu.yaml"):
        shard_stack(spies["train"].stack, world=2)
    assert not spies["train"].stack.sharded
