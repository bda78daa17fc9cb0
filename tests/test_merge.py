"""Exporting pi_k: one rank-concatenated LoRA adapter and a merged model, both equal to the adapter stack."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import float32_bound

from spa_lite.errors import SpaError


def _random_adapters(recipe, tiny_model_dir):
    """seed (r=4, alpha=8) and iter1 (r=2, alpha=16, rsLoRA) with non-zero random B, saved where the run keeps them."""
    from peft import LoraConfig, get_peft_model

    from spa_lite.layout import adapter_dir
    from spa_lite.models import load_base_model
    from spa_lite.stack import save_adapter

    base, _ = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
                           adapter_name="seed")
    model.add_adapter("iter1", LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    save_adapter(model, "seed", adapter_dir(recipe, 0))
    save_adapter(model, "iter1", adapter_dir(recipe, 1))


def _ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (2, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model, batch):
    return model(**batch, use_cache=False).logits.float()


@pytest.fixture
def run_with_stack(tiny_recipe, tiny_model_dir):
    from spa_lite.loading import load_stack

    recipe = tiny_recipe()
    _random_adapters(recipe, tiny_model_dir)
    stack = load_stack(recipe, frozen_upto=1)
    return recipe, stack


def test_single_adapter_equals_stack(run_with_stack, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from spa_lite.merge import export_single_adapter
    from spa_lite.models import load_base_model

    recipe, stack = run_with_stack
    batch = _ids()
    with stack.use([]) as m:
        base_logits = _logits(m, batch)
    for k, names, rank in ((0, ["seed"], 4), (1, ["seed", "iter1"], 6)):
        with stack.use(names) as m:
            ref = _logits(m, batch)
        assert (ref - base_logits).abs().max() > 1e-2  # the adapters really change the model
        out = export_single_adapter(stack, k, tmp_path / f"pi{k}")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["r"] == rank and cfg["lora_alpha"] == rank and not cfg["use_rslora"]
        n_tensors = len(load_file(str(out / "adapter_model.safetensors")))
        fresh, _ = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
        single = PeftModel.from_pretrained(fresh, str(out))
        assert sum("lora_" in n for n, _ in single.named_parameters()) == n_tensors  # every tensor was loaded
        diff = (_logits(single, batch) - ref).abs().max().item()
        assert diff < float32_bound(fresh, ref.abs().max()), (k, diff)
    assert stack.model.peft_config.keys() >= {"seed", "iter1"} and "pi1" not in stack.model.peft_config


def test_single_adapter_from_recipe(run_with_stack, tmp_path):
    from spa_lite.merge import export_single_adapter

    recipe, _ = run_with_stack
    out = export_single_adapter(recipe, 1, tmp_path / "a")
    assert json.loads((out / "spa_export.json").read_text())["adapters"] == ["seed", "iter1"]
    with pytest.raises(SpaError):
        export_single_adapter(recipe, -1, tmp_path / "b")


def test_merged_equals_stack(run_with_stack, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spa_lite.io import atomic_write_json
    from spa_lite.layout import Stage
    from spa_lite.merge import export_merged
    from spa_lite.runs import finish_stage

    recipe, stack = run_with_stack
    finish_stage(recipe, Stage("train", 1), {"steps": 3}, {}, 0.0)
    atomic_write_json(recipe.run_path / "eval" / "eval_pairs.json", {
        "judge_accuracy": {"pi_1": {"init": {"accuracy": 0.75, "ci_low": 0.6, "ci_high": 0.85}}}})
    batch = _ids()
    with stack.use(["seed", "iter1"]) as m:
        ref = _logits(m, batch)
    out = export_merged(recipe, 1, tmp_path / "merged", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in n for n, _ in model.named_parameters())
    diff = (_logits(model, batch) - ref).abs().max().item()
    assert diff < 1e-4, diff
    AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "pi_1" in card and '"lora_r": 4' in card and "0.750" in card and "eval_pairs" in card
    assert not list(tmp_path.glob(".merged*"))  # no temporary folder left behind


def test_merged_needs_adapters(tiny_recipe, tmp_path):
    from spa_lite.merge import export_merged

    with pytest.raises(SpaError, match="missing"):
        export_merged(tiny_recipe(), 0, tmp_path / "m")
