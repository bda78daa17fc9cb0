"""Artifacts other tools read as they are: D_i and `split`'s pair files are TRL conversational preference data
(trl.DPOTrainer trains on a D_i written by expand, one step here), our readers take both forms, and adapters,
model cards and exported folders name the base portably and are world-readable."""

from __future__ import annotations

import json
import stat

import pytest
from conftest import tiny_overrides

import spa_lite
from spa_lite.data import load_pairs, pair_texts, to_trl_conversational
from spa_lite.errors import DataError


@pytest.fixture(scope="module")
def d1(tiny_model_dir, tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("trl") / "runs"
    recipe = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, runs, iterations=1,
                                                       **{"data.iter_prompts": [6]}))
    spa_lite.run_stage(recipe, "seed-dpo")
    spa_lite.run_stage(recipe, "expand", iteration=1)
    return recipe, recipe.run_path / "iter1" / "expand" / "data.jsonl"


def test_d_i_is_trl_conversational(d1):
    from trl.data_utils import is_conversational

    _, path = d1
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows
    for r in rows:
        assert is_conversational(r)
        assert r["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]


def test_trl_dpo_trainer_trains_a_step_on_d_i(d1, tiny_model_dir, tmp_path):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, path = d1
    ds = datasets.load_dataset("json", data_files=str(path), split="train").select_columns(
        ["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                     report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, max_length=128,
                     dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    out = trainer.train()
    assert out.global_step == 1
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())


def test_readers_take_both_forms(tmp_path):
    text = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Go away.", "id": 3}
    conv = to_trl_conversational(text)
    assert conv["chosen"] == [{"role": "assistant", "content": "Hello."}] and conv["id"] == 3
    assert pair_texts(conv) == pair_texts(text) == text
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps(conv) + "\n" + json.dumps(text) + "\n")
    a, b = load_pairs(str(f))
    assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"]) == ("Hello.", "Go away.")
    with pytest.raises(DataError, match=r"pairs.jsonl:7.*chosen"):
        pair_texts(dict(text, chosen=[{"role": "user", "content": "x"}]), f, 7)


def test_split_writes_trl_pairs(tmp_path):
    from trl.data_utils import is_conversational

    from spa_lite.options import SplitOptions
    from spa_lite.stages import split

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"}) + "\n"
                           for i in range(12)))
    split.run(SplitOptions(data=str(src), out=tmp_path / "out", seed=42, seed_size=4, iter_sizes=[4], test_size=4))
    for name in ("seed_pairs", "test_pairs"):
        rows = [json.loads(x) for x in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(is_conversational(r) and r["chosen"][0]["role"] == "assistant" for r in rows)
        back = load_pairs(str(tmp_path / "out" / f"{name}.jsonl"))
        assert [(p["id"], p["chosen"], p["rejected"]) for p in back] == [
            (r["id"], f"good {r['id']}", f"bad {r['id']}") for r in rows]


def test_bundled_base_is_named_by_its_hub_id(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """An adapter trained on the bundled model (here: the tiny model in the bundled model's cache folder) names
    the hub id it was converted from, not this machine's cache path; adapter folders are world-readable."""
    import shutil

    from spa_lite.models import portable_base_id

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPA_LITE_CACHE", str(cache))
    bundled = cache / "smollm2-135m-instruct"
    shutil.copytree(tiny_model_dir, bundled)
    assert portable_base_id("smollm2")[0] == portable_base_id(str(bundled))[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "GGUF" in portable_base_id(str(bundled))[1]
    assert portable_base_id("org/model") == ("org/model", None)
    assert portable_base_id(str(tiny_model_dir)) == (str(tiny_model_dir), None)
    recipe = spa_lite.load_recipe(None, tiny_overrides(bundled, tiny_data, tmp_path / "runs",
                                                       **{"seed_dpo.epochs": 1}))
    spa_lite.run_stage(recipe, "seed-dpo")
    adapter = recipe.run_path / "seed" / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (adapter / "README.md").read_text()
    assert str(cache) not in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "GGUF" in card
    _world_readable(adapter)
    from spa_lite.merge import export_single_adapter

    out = export_single_adapter(recipe, 0, tmp_path / "single")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    _world_readable(out)


def _world_readable(folder):
    assert stat.S_IMODE(folder.stat().st_mode) & 0o755 == 0o755, oct(folder.stat().st_mode)
    for p in folder.rglob("*"):
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) & want == want, (p, oct(p.stat().st_mode))


def test_merged_export_names_base_and_is_world_readable(d1, tmp_path):
    import torch

    from spa_lite.merge import export_merged

    recipe, _ = d1
    out = export_merged(recipe, 0, tmp_path / "merged", dtype=torch.float32)
    _world_readable(out)
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and f"Base model `{recipe.model.name_or_path}`" in card
