"""The Python API (spa_lite.api, re-exported by spa_lite): recipes with overrides, one stage or the whole
pipeline, a stage's metrics and summary, and a run's policy for generation, on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import float32_bound, tiny_overrides

import spa_lite
from spa_lite.errors import SpaError, StageOrderError


def test_load_recipe_shipped_with_overrides():
    r = spa_lite.load_recipe("smollm2-demo", {"train.lr": 1e-4, "expand": {"judge_ref": "prev"}}, name="mine",
                             run_dir="elsewhere", report_to="tensorboard")
    assert (r.name, str(r.run_path), r.train.lr, r.expand.judge_ref, r.report_to) == (
        "mine", "elsewhere/mine", 1e-4, "prev", ["tensorboard"])
    assert r.iterations == spa_lite.load_recipe("smollm2-demo").iterations  # the file's value is kept
    same = spa_lite.load_recipe("smollm2-demo", ["train.lr=1e-4", "expand.judge_ref=prev"], name="mine",
                                run_dir="elsewhere", report_to=["tensorboard"])
    assert same == r
    again = spa_lite.load_recipe(r, {"seed": 7})  # a Recipe with more overrides keeps its own values
    assert (again.seed, again.train.lr, again.name) == (7, 1e-4, "mine")
    with pytest.raises(SpaError, match=r"train\.lrr: unknown key"):
        spa_lite.load_recipe("smollm2-demo", {"train.lrr": 1})
    with pytest.raises(SpaError, match="report_to: nope"):
        spa_lite.load_recipe(None, report_to="nope")
    assert "smollm2-demo" in spa_lite.list_recipes() and spa_lite.list_recipes()["smollm2-demo"]


@pytest.fixture(scope="module")
def done(tiny_model_dir, tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("api") / "runs"
    recipe = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, runs, iterations=1,
                                                       **{"data.iter_prompts": [6]}))
    with pytest.raises(StageOrderError, match="spa-lite seed-dpo"):
        spa_lite.run_stage(recipe, "expand", iteration=1)
    seed = spa_lite.run_stage(recipe, "seed-dpo")
    out = spa_lite.run(recipe)
    return recipe, seed, out


def test_run_stage_then_run(done):
    recipe, seed, out = done
    assert [k for k, _ in out] == ["seed", "iter1/expand", "iter1/train"]
    assert out[0][1] == seed  # the complete seed stage was skipped, not redone
    r = spa_lite.open_run(recipe)
    assert r.status() == {"seed": "complete", "iter1/expand": "complete", "iter1/train": "complete"}
    assert r.policies() == [0, 1]


def test_metrics_and_summary_read_the_stage_files(done):
    recipe, _, out = done
    r = spa_lite.open_run(recipe)
    for key in ("seed", "iter1/train"):
        rows = [json.loads(x) for x in (recipe.run_path / key / "metrics.jsonl").read_text().splitlines()]
        assert r.metrics(key) == rows and rows
        assert r.summary(key) == dict(out)[key]["summary"]
        assert r.summary(key)["steps"] == rows[-1]["step"]
    assert r.metrics("train", iteration=1) == r.metrics("iter1/train")
    d1 = r.pairs(1)
    assert r.summary("expand", 1)["pairs"] == len(d1) > 0
    assert isinstance(d1[0]["chosen"], str) and d1[0]["prompt"][-1]["role"] == "user"
    with pytest.raises(SpaError, match="no per-step metrics"):
        r.metrics("iter1/expand")
    with pytest.raises(SpaError, match="not seed"):
        r.summary("iter1/judge")


def test_policy_generates_and_is_the_trained_stack(done):
    recipe, _, _ = done
    r = spa_lite.open_run(recipe)
    pi = r.policy("last")
    assert (pi.k, pi.names) == (1, ["seed", "iter1"])
    prompts = ["Name a fast animal.", [{"role": "user", "content": "Why is the sky blue?"}]]
    a = pi.generate(prompts, max_new_tokens=8)
    assert len(a) == 2 and all(isinstance(x, str) for x in a)
    assert pi.generate(prompts, max_new_tokens=8) == a  # greedy: deterministic
    ids = torch.tensor([pi.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                         add_generation_prompt=True, tokenize=True)["input_ids"]])
    with pi.model() as m:
        last = m(input_ids=ids).logits
    init = spa_lite.Policy(recipe, None, stack=pi.stack)
    with init.model() as m:
        base = m(input_ids=ids).logits
    assert not torch.allclose(last, base)  # pi_1's adapters are active
    with r.policy(1).model() as m:  # loaded again from disk: the same policy
        assert (m(input_ids=ids).logits - last).abs().max() < float32_bound(m, last.abs().max())
    with pytest.raises(SpaError, match="pi_2 is not complete"):
        r.policy(2)
    assert r.policy("init").names == []


def test_size_for_a_t4(tmp_path):
    """The notebook's sizing on a GPU: a 7B Mistral (zephyr) recipe on a 16 GB card without bf16 (a T4)."""
    from transformers import MistralConfig

    MistralConfig().to_json_file(tmp_path / "config.json")
    recipe = spa_lite.load_recipe("zephyr-7b-qlora")
    res = spa_lite.plan(recipe, model=str(tmp_path / "config.json"), gpu_mem=16)
    o = spa_lite.size_for_gpu(recipe, 16, bf16=False, model=str(tmp_path / "config.json"))
    assert o["model.dtype"] == "float16" and o["model.quantization"] == "4bit"
    assert (o["train.batch_size"], o["train.grad_accum"], o["model.max_length"]) == (
        res["batch_size"], res["grad_accum"], res["seq_len"])
    assert o["train.batch_size"] * o["train.grad_accum"] == recipe.train.batch_size * recipe.train.grad_accum
    sized = spa_lite.load_recipe(recipe, o)  # the overrides are a valid recipe
    assert sized.seed_dpo.batch_size * sized.seed_dpo.grad_accum == recipe.seed_dpo.batch_size * recipe.seed_dpo.grad_accum
    assert spa_lite.size_for_gpu(recipe, 80, bf16=True, model=str(tmp_path / "config.json"))["model.dtype"] == "bfloat16"
    with pytest.raises(SpaError, match="does not fit 2 GB"):
        spa_lite.size_for_gpu(recipe, 2, bf16=True, model=str(tmp_path / "config.json"))
