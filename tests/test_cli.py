"""The `spa-lite` command line on the tiny model: every stage's files, stage order, skipping, refusing a changed
config, `--help`, `run` end to end, and the ablation flags (--no-refine, --no-dnd, --judge-ref, --judge,
--length-penalty).

One module-scoped run goes through the commands step by step; the other tests read it or copy its stages.
The recipe sets ``threads: 1``: on 2 shared cores two torch threads per matmul are ~100x slower here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke, ok, tiny_overrides, write_recipe
from safetensors.torch import load_file

from spa_lite.cli import app

EXPAND_FIELDS = {"prompt", "chosen", "rejected", "p_y1", "confidence", "logratio_chosen", "logratio_rejected",
                 "len_chosen", "len_rejected"}






def lines(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.strip()]


def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def base_key(name: str) -> str:
    """peft parameter name of a base weight -> its name in the saved base checkpoint."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class StackSpy:
    """Wraps a stage module's load_stack to keep the stack it trains and copies of its weights at load time."""

    def __init__(self, module):
        self.module, self.real, self.stack, self.before = module, module.load_stack, None, {}

    def __call__(self, recipe, frozen_upto, trainable=None, **kw):
        st = self.real(recipe, frozen_upto, trainable, **kw)
        self.stack = st
        self.before = {n: p.detach().clone() for n, p in st.model.named_parameters()}
        return st


@pytest.fixture(scope="module")
def cli_env(tiny_model_dir, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ov = tiny_overrides(tiny_model_dir, tiny_data, root / "runs", threads=1)
    return {"root": root, "runs": root / "runs", "recipe": write_recipe(root / "tiny.yaml", ov), "overrides": ov,
            "model": tiny_model_dir}


@pytest.fixture(scope="module")
def steps(cli_env):
    """seed-dpo, expand 1, train 1, (train 2 too early), expand 2, train 2, then re-runs, all through the CLI."""
    from spa_lite.stages import seed_dpo as seed_mod
    from spa_lite.stages import train as train_mod

    rec = cli_env["recipe"]
    out = {"run": cli_env["runs"] / "tiny"}
    spy0 = StackSpy(seed_mod)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seed_mod, "load_stack", spy0)
        out["seed"] = ok(invoke("seed-dpo", "--recipe", rec))
    out["spy0"] = spy0
    out["expand1"] = ok(invoke("expand", "--iter", 1, "--recipe", rec))
    spy = StackSpy(train_mod)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "load_stack", spy)
        out["train1"] = ok(invoke("train", "--iter", 1, "--recipe", rec))
    out["spy1"] = spy
    out["train2_early"] = invoke("train", "--iter", 2, "--recipe", rec)
    out["expand2"] = ok(invoke("expand", "--iter", 2, "--recipe", rec))
    out["train2"] = ok(invoke("train", "--iter", 2, "--recipe", rec))
    return out


# ---------------------------------------------------------------------------------------------- files


def test_seed_and_train_write_their_files(steps):
    run = steps["run"]
    for key in ("seed", "iter1/train", "iter2/train"):
        d = run / key
        assert (d / "adapter" / "adapter_config.json").is_file()
        assert (d / "adapter" / "adapter_model.safetensors").is_file()
        m = manifest(d)
        assert m["status"] == "complete" and m["stage"] == key
        assert m["config_hash"] and m["versions"]["torch"]
        metrics = rows(d / "metrics.jsonl")
        assert [r["step"] for r in metrics] == list(range(1, m["summary"]["steps"] + 1))
        for r in metrics:
            assert {"loss", "reward_margin", "lr", "grad_norm"} <= set(r)
            assert torch.isfinite(torch.tensor(r["loss"]))
        assert not list(d.rglob("*.tmp")), "a temporary file was left behind"
    assert manifest(run / "seed")["summary"]["pairs_used"] == 12
    assert manifest(run / "iter1" / "train")["summary"]["dnd_lambda"] == 0.5
    assert manifest(run / "iter2" / "train")["summary"]["dnd_lambda"] == 0.25


def test_expand_writes_d_i(steps):
    run = steps["run"]
    prompts_seen = []
    for i in (1, 2):
        d = run / f"iter{i}" / "expand"
        m = manifest(d)
        assert m["status"] == "complete" and m["stage"] == f"iter{i}/expand"
        data = rows(d / "data.jsonl")
        assert len(data) == m["summary"]["pairs"] > 0
        assert sorted(p.name for p in (d / "shards").iterdir()) == ["00000.json", "00001.json", "00002.json"]
        for r in data:
            assert EXPAND_FIELDS <= set(r), EXPAND_FIELDS - set(r)
            assert r["chosen"] != r["rejected"]
            # TRL's conversational preference format: one assistant message each
            assert [m["role"] for m in r["chosen"]] == [m["role"] for m in r["rejected"]] == ["assistant"]
            assert 0.0 <= r["p_y1"] <= 1.0
            assert r["confidence"] == pytest.approx(max(r["p_y1"], 1 - r["p_y1"]))
            assert r["confidence"] >= 0.5
            assert isinstance(r["len_chosen"], int) and isinstance(r["len_rejected"], int)
            # Eq. 7 picks the response with the larger log-ratio (no length penalty here)
            if r["confidence"] > 0.5 + 1e-6:
                assert r["logratio_chosen"] > r["logratio_rejected"]
            assert r["prompt"][-1]["role"] == "user"
        prompts_seen.append({json.dumps(r["prompt"]) for r in data})
    assert not prompts_seen[0] & prompts_seen[1], "X_1 and X_2 must be disjoint"


def test_adapters_load_with_peft(steps, cli_env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    base = AutoModelForCausalLM.from_pretrained(cli_env["model"])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    for key in ("seed", "iter1/train", "iter2/train"):
        adir = steps["run"] / key / "adapter"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cli_env["model"]), str(adir))
        saved = load_file(str(adir / "adapter_model.safetensors"))
        assert saved and all("lora_" in k for k in saved)
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        for k, v in saved.items():
            match = [lk for lk in loaded if lk.replace(".default", "") == k]
            assert len(match) == 1, k
            torch.testing.assert_close(loaded[match[0]], v)
        with torch.no_grad():
            out = model(input_ids=ids).logits
        assert not torch.allclose(out, ref), f"{key} adapter does not change the model"


@pytest.mark.parametrize("stage,adapter,must_move", [("spy0", "seed", ("lora_A", "lora_B")),
                                                     ("spy1", "iter1", ("lora_B",))])
def test_training_moves_lora_not_base(steps, cli_env, stage, adapter, must_move):
    # iter1 takes 2 optimizer steps, the first at warmup lr 0: only B (which starts at 0) can have moved by then
    spy = steps[stage]
    after = dict(spy.stack.model.named_parameters())
    ckpt = load_file(str(Path(cli_env["model"]) / "model.safetensors"))
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable and all("lora_" in n and f".{adapter}." in n for n in trainable)
    for n, p in after.items():
        if "lora_" in n:
            if n in trainable:
                if any(f"{m}." in n for m in must_move):
                    assert not torch.equal(p.detach(), spy.before[n]), f"{n} did not move"
            else:  # the frozen seed adapter
                assert torch.equal(p.detach(), spy.before[n]), f"frozen {n} moved"
        else:
            assert torch.equal(p.detach(), spy.before[n]), f"base weight {n} moved"
            assert torch.equal(p.detach(), ckpt[base_key(n)]), f"base weight {n} differs from the checkpoint"
    adir = steps["run"] / ("seed" if adapter == "seed" else "iter1/train") / "adapter"
    saved = load_file(str(adir / "adapter_model.safetensors"))
    for k, v in saved.items():
        live = k.replace(".weight", f".{adapter}.weight")
        torch.testing.assert_close(v, after[live].detach())
        if "lora_B" in k:
            assert v.abs().sum() > 0  # B starts at zero


# ---------------------------------------------------------------------------------------------- stage order


def test_train_before_expand_fails_with_one_line(steps):
    res = steps["train2_early"]
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    out = lines(res)
    assert len(out) == 1, out
    assert "iter2/expand" in out[0]
    assert "spa-lite expand --iter 2" in out[0]
    assert not (steps["run"] / "iter2" / "train" / "manifest.json").exists() or \
        manifest(steps["run"] / "iter2" / "train")["status"] == "complete"


def test_rerun_of_complete_stage_is_skipped(steps, cli_env):
    run = steps["run"]
    watched = [run / "seed" / "manifest.json", run / "seed" / "adapter" / "adapter_model.safetensors",
               run / "iter1" / "expand" / "data.jsonl", run / "iter2" / "train" / "manifest.json"]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}
    ok(invoke("seed-dpo", "--recipe", cli_env["recipe"]))
    ok(invoke("expand", "--iter", 1, "--recipe", cli_env["recipe"]))
    ok(invoke("train", "--iter", 2, "--recipe", cli_env["recipe"]))
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before


def test_changed_upstream_config_is_refused(steps, cli_env):
    rec = cli_env["recipe"]
    res = invoke("train", "--iter", 1, "--recipe", rec, "--set", "seed_dpo.lr=0.001")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert len(lines(res)) == 1 and "another config" in res.output and "iter1/expand" in res.output
    # the stage itself, complete, with another config of its own: refused unless --force
    res = invoke("seed-dpo", "--recipe", rec, "--set", "seed_dpo.lr=0.001")
    assert res.exit_code == 2 and "--force" in res.output and "Traceback" not in res.output
    res = invoke("expand", "--iter", 2, "--recipe", rec, "--max-new-tokens", "5")
    assert res.exit_code == 2 and "another config" in res.output
    assert manifest(steps["run"] / "seed")["status"] == "complete"


def test_bad_override_is_one_line():
    res = invoke("seed-dpo", "--set", "model.lora_r=abc", "--set", "nosuch.key=1")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "model.lora_r" in res.output and "nosuch" in res.output


@pytest.mark.parametrize("command", [c.name or c.callback.__name__ for c in app.registered_commands])
def test_help_shows_example(command):
    cb = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    example = next(ln.strip() for ln in cb.__doc__.splitlines() if ln.strip().startswith("Example:"))
    res = invoke(command, "--help")
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert " ".join(example.split()) in flat
    assert "--help" in flat


def test_top_level_help_lists_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    for c in app.registered_commands:
        assert (c.name or c.callback.__name__) in res.output


# ---------------------------------------------------------------------------------------------- run


def test_run_end_to_end_matches_step_by_step(steps, cli_env):
    res = ok(invoke("run", cli_env["recipe"], "--name", "tiny-run"))
    assert "run complete" in res.output
    run, ref = cli_env["runs"] / "tiny-run", steps["run"]
    assert (run / "recipe.yaml").is_file()
    for key in ("seed", "iter1/expand", "iter1/train", "iter2/expand", "iter2/train"):
        assert manifest(run / key)["status"] == "complete"
        assert manifest(run / key)["config_hash"] == manifest(ref / key)["config_hash"]
    # same recipe, same seeds: the one-shot pipeline gives the step-by-step run's data and adapters
    for i in (1, 2):
        assert (run / f"iter{i}/expand/data.jsonl").read_bytes() == (ref / f"iter{i}/expand/data.jsonl").read_bytes()
    for key in ("seed", "iter1/train", "iter2/train"):
        a = load_file(str(run / key / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(ref / key / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    # a second `run` skips every stage
    stamp = (run / "iter2/train/manifest.json").stat().st_mtime_ns
    ok(invoke("run", cli_env["recipe"], "--name", "tiny-run"))
    assert (run / "iter2/train/manifest.json").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------------------------- ablations


def _variant(steps, cli_env, name: str, copy: tuple[str, ...]) -> Path:
    """A new run that starts from copies of the step-by-step run's stages."""
    run = cli_env["runs"] / name
    for key in copy:
        shutil.copytree(steps["run"] / key, run / key)
    return run


@pytest.mark.parametrize("flag,check", [
    ("--no-refine", lambda m, ms: all(not r["refining"] for r in ms) and all(r["flagged_frac"] == 0 for r in ms)),
    ("--no-dnd", lambda m, ms: m["summary"]["dnd_lambda"] is None and m["config"]["train"]["dnd"] is False),
])
def test_train_flags(steps, cli_env, flag, check):
    name = "v" + re.sub(r"\W", "", flag)
    run = _variant(steps, cli_env, name, ("seed", "iter1/expand"))
    ok(invoke("train", "--iter", 1, "--recipe", cli_env["recipe"], "--name", name, flag))
    m = manifest(run / "iter1/train")
    assert m["status"] == "complete" and (run / "iter1/train/adapter/adapter_model.safetensors").is_file()
    assert check(m, rows(run / "iter1/train/metrics.jsonl"))
    assert m["config_hash"] != manifest(steps["run"] / "iter1/train")["config_hash"]


SMALL = ("--set", "data.iter_prompts=[4,4]")


@pytest.mark.parametrize("flags,setting,check", [
    (("--judge-ref", "none"), "expand.judge_ref=none", "logratio"),
    (("--judge", "llm"), "expand.judge=llm", "llm"),
    (("--length-penalty", "0.5"), "expand.length_penalty=0.5", "length"),
])
def test_expand_flags_make_d_i_and_train(steps, cli_env, flags, setting, check):
    name = "v" + re.sub(r"\W", "", "".join(flags))
    run = _variant(steps, cli_env, name, ("seed",))
    rec = cli_env["recipe"]
    ok(invoke("expand", "--iter", 1, "--recipe", rec, "--name", name, *SMALL, *flags))
    m = manifest(run / "iter1/expand")
    key, value = setting.split("=")
    assert str(m["config"]["expand"][key.split(".")[1]]) == value
    data = rows(run / "iter1/expand/data.jsonl")
    assert 0 < len(data) <= 4
    for r in data:
        assert {"chosen", "rejected", "p_y1", "confidence", "len_chosen", "len_rejected"} <= set(r)
        assert 0 <= r["p_y1"] <= 1
        if check == "logratio":  # no reference: r(y) = log pi(y|x) <= 0
            assert r["logratio_chosen"] <= 0 and r["logratio_rejected"] <= 0
        if check == "length" and r["confidence"] > 0.5 + 1e-6:
            # Eq. 13: the winner has the larger penalised reward r(y) - a|y|
            assert r["logratio_chosen"] - 0.5 * r["len_chosen"] > r["logratio_rejected"] - 0.5 * r["len_rejected"]
    # train needs the same expand setting (it is part of D_1's config)
    res = invoke("train", "--iter", 1, "--recipe", rec, "--name", name, *SMALL)
    assert res.exit_code == 2 and "another config" in res.output
    ok(invoke("train", "--iter", 1, "--recipe", rec, "--name", name, *SMALL, "--set", setting))
    assert manifest(run / "iter1/train")["status"] == "complete"


def test_judge_ref_prev(steps, cli_env):
    """At iteration 2, --judge-ref prev judges with pi_1 against pi_0 instead of pi_init: same samples, other p."""
    rec = cli_env["recipe"]
    runs = {}
    for ref in ("init", "prev"):
        name = f"vjudgeref{ref}"
        runs[ref] = _variant(steps, cli_env, name, ("seed",))
        s = ("--set", f"expand.judge_ref={ref}")
        ok(invoke("expand", "--iter", 1, "--recipe", rec, "--name", name, *SMALL, *s))
        ok(invoke("train", "--iter", 1, "--recipe", rec, "--name", name, *SMALL, *s))
        ok(invoke("expand", "--iter", 2, "--recipe", rec, "--name", name, *SMALL, "--judge-ref", ref))
        ok(invoke("train", "--iter", 2, "--recipe", rec, "--name", name, *SMALL, *s))
        assert manifest(runs[ref] / "iter2/train")["status"] == "complete"
    # at iteration 1 prev (pi_0 vs pi_{-1}... = pi_init) is the same reference as init
    assert (runs["init"] / "iter1/expand/data.jsonl").read_bytes() == (runs["prev"] / "iter1/expand/data.jsonl").read_bytes()
    a, b = rows(runs["init"] / "iter2/expand/data.jsonl"), rows(runs["prev"] / "iter2/expand/data.jsonl")
    pa = {frozenset((r["chosen"][0]["content"], r["rejected"][0]["content"])): r["p_y1"] for r in a}
    pb = {frozenset((r["chosen"][0]["content"], r["rejected"][0]["content"])): r["p_y1"] for r in b}
    assert pa.keys() == pb.keys() and pa
    assert any(abs(pa[k] - pb[k]) > 1e-6 for k in pa)


def test_doctor_reports_each_component(tmp_path):
    from spa_lite.doctor import checks

    rows = {item: (status, detail) for item, status, detail in checks(str(tmp_path))}
    for item in ("torch", "transformers", "peft", "trl", "bitsandbytes", "fsdp", "vllm", "bundled SmolLM2", "disk"):
        assert item in rows, item
    assert rows["torch"][0] == "ok" and torch.__version__ in rows["torch"][1]
    assert rows["fsdp"][0] == "ok"  # torch >= 2.6 ships fully_shard; the 2-process FSDP test uses it
    assert ("cuda" in rows) == (not torch.cuda.is_available())
    out = ok(invoke("doctor", "--run-dir", tmp_path)).output
    assert "fsdp" in out and "bitsandbytes" in out


def test_offline_bnb_kernel_notices_are_silenced_and_doctor_says_why(tmp_path):
    """On an AVX512-BF16 CPU, importing bitsandbytes offline makes `kernels` log "Skipping publisher trust check for
    'kernels-community/quantization-bitsandbytes'" (and bitsandbytes a "Failed to load" line). Without spa_lite
    the lines appear (so this test can fail); with spa_lite imported first they do not, and doctor's row says
    the kernel is not loaded rather than ok."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    code = "import bitsandbytes.backends.cpu.ops as o; print(o.__name__)"
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ours = subprocess.run([sys.executable, "-c", "import spa_lite; " + code], env=env, capture_output=True, text=True,
                          check=True)
    notice = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"
    if has_avx512bf16() and importlib.util.find_spec("kernels") is not None:
        assert notice in plain.stderr
    assert notice not in ours.stderr and "gemm_4bit_forward" not in ours.stderr
    rows = subprocess.run([sys.executable, "-c", "from spa_lite.doctor import checks; import json; "
                           "print(json.dumps([r for r in checks() if r[0] == 'bnb CPU 4-bit kernel']))"],
                          env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    (item, status, detail), = json.loads(rows.stdout.strip().splitlines()[-1])
    if has_avx512bf16() and importlib.util.find_spec("kernels") is not None:
        assert status == "warn" and "not loaded: offline" in detail, detail


def test_recipes_lists_commands_an_installed_user_can_run():
    """`spa-lite recipes` names no checkout path: no `cli.py`, no `recipes/...` file; an accelerate config's line
    copies the config out and launches the installed module."""
    out = ok(invoke("recipes")).output
    lines = {ln.split()[0]: ln for ln in out.strip().splitlines()}
    assert "cli.py" not in out and "recipes/" not in out, out
    for name in ("accelerate/cpu_2proc", "accelerate/fsdp", "accelerate/multi_gpu"):
        short = name.split("/")[1]
        assert f"spa-lite recipes copy {name}, then: accelerate launch --config_file {short}.yaml -m spa_lite.cli " \
            in lines[name], lines[name]
    assert "--recipe zephyr-7b-qlora" in lines["accelerate/multi_gpu"]
