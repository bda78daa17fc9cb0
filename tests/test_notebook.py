"""The Colab notebook runs end to end (on the tiny model), so it cannot rot."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="nbclient is a test dependency")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel", reason="the notebook needs a Python kernel")

ROOT = Path(__file__).parent.parent


def test_colab_notebook_executes(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    extra = {
        "data.seed_pairs": tiny_data["pairs"], "data.prompts": tiny_data["prompts"], "data.eval_pairs": tiny_data["pairs"],
        "data.eval_prompts": "null", "data.iter_prompts": "[6]", "model.quantization": "none", "model.device": "cpu",
        "model.max_length": 128, "model.max_prompt_length": 64, "model.lora_r": 4, "seed_dpo.epochs": 1,
        "seed_dpo.batch_size": 4, "seed_dpo.grad_accum": 1, "expand.max_new_tokens": 8, "expand.shard_size": 6,
        "train.batch_size": 2, "train.grad_accum": 1, "iterations": 1,
    }
    monkeypatch.setenv("SPA_NB_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("SPA_NB_RECIPE", "smollm2-demo")
    monkeypatch.setenv("SPA_NB_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("SPA_NB_EXTRA", " ".join(shlex.quote(f"{k}={v}") for k, v in extra.items()))
    monkeypatch.setenv("SPA_LITE_QUIET", "1")
    nb = nbformat.read(ROOT / "notebooks" / "spa_lite_colab.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    run = tmp_path / "runs" / "colab"
    assert (run / "seed" / "manifest.json").exists()
    assert (run / "iter1" / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert list((run / "eval").glob("*.json"))
    assert (run / "report" / "report.md").exists()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the report cell shows its plots inline"
