"""The Colab notebook runs top to bottom from an empty folder outside the checkout, against the built wheel (its
first cell installs it), on the tiny model: it cannot rot, and it never depends on the working directory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("nbclient", reason="nbclient is a test dependency")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel", reason="the notebook needs a Python kernel")

ROOT = Path(__file__).parent.parent
NOTEBOOK = ROOT / "notebooks" / "spa_lite_colab.ipynb"

# executed by the wheel's venv, so that the notebook's kernel is that interpreter, not the checkout's
EXECUTE = """
import sys, nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""

pytestmark = pytest.mark.install


def test_colab_notebook_executes_from_an_empty_folder(installed_wheel, tiny_model_dir, tiny_data, tmp_path):
    extra = {
        "data.seed_pairs": str(tiny_data["pairs"]), "data.prompts": str(tiny_data["prompts"]),
        "data.eval_pairs": str(tiny_data["pairs"]), "data.eval_prompts": None, "data.iter_prompts": [6],
        "model.quantization": "none", "model.device": "cpu", "model.max_length": 128, "model.max_prompt_length": 64,
        "model.lora_r": 4, "seed_dpo.epochs": 1, "seed_dpo.batch_size": 4, "seed_dpo.grad_accum": 1,
        "expand.max_new_tokens": 8, "expand.shard_size": 6, "train.batch_size": 2, "train.grad_accum": 1,
        "threads": 1,
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    work = tmp_path / "work"
    env = installed_wheel.env(SPA_NB_SOURCE=str(installed_wheel.wheel), SPA_NB_PIP_ARGS="--no-deps --no-index",
                              SPA_NB_MODEL=str(tiny_model_dir), SPA_NB_WORK=str(work), SPA_NB_EXTRA=json.dumps(extra),
                              SPA_NB_PROMPTS="4", SPA_LITE_QUIET="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "executed.ipynb"
    p = subprocess.run([str(installed_wheel.python), "-c", EXECUTE, str(NOTEBOOK), str(out), str(empty)], cwd=empty,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    run = work / "runs" / "colab"
    assert json.loads((run / "seed" / "manifest.json").read_text())["status"] == "complete"
    assert (run / "iter1" / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert list((run / "eval").glob("*.json"))
    assert (run / "report" / "report.md").exists()
    assert not any(empty.iterdir()), "the notebook wrote into the working directory"
    import nbformat

    nb = nbformat.read(out, as_version=4)
    texts = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"from {installed_wheel.venv}" in texts.replace("\n", " ") or str(installed_wheel.venv) in texts
    assert "no GPU: the bundled SmolLM2-135M-Instruct on CPU" in texts
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the report cell shows its plots inline"
