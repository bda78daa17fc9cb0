"""The last silent and loud faults of issue 23, each through the `spa-lite` command line on the tiny model, and
the registry of every fault the suite injects (README's fault table is generated from ``FAULTS`` by
``scripts/fault_table.py``; ``test_readme_fault_table_is_current`` keeps it so).

Each case checks the exit code (2 for an expected failure), the one ``error:`` line naming what and where, and
that nothing was marked complete or lost.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import build_tiny_model_dir, invoke, ok, write_pairs
from test_faults import clone, env, refused, stage_files  # noqa: F401 - env is a fixture

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    """One row of README's fault table: what goes wrong, what spa-lite does, and the test that shows it."""

    fault: str
    behaviour: str
    test: str  # tests/<module>.py::<test function>


FAULTS = [
    # ---- crashes (tests/test_crash_points.py, tests/test_resume.py)
    Fault("crash at any durable write of seed-dpo, expand, train (each checkpoint, shard, adapter, manifest, "
          "metrics line, rename)", "rerun resumes; D_1, adapters and metrics byte-identical to an uninterrupted run; "
          "no stage marked complete with missing files", "tests/test_crash_points.py::test_crash_at_every_write_point"),
    Fault("crash between the two renames that replace a checkpoint", "resumes from the previous checkpoint "
          "(kept as .checkpoint.old), not from step 0", "tests/test_crash_points.py::"
          "test_crash_between_checkpoint_renames_resumes_from_the_old_one"),
    Fault("`kill -9` of the CLI process mid-stage", "rerun resumes to byte-identical results",
          "tests/test_crash_points.py::test_kill_9_at_sampled_write_points"),
    Fault("expand killed after a shard", "resumes at the first missing shard; same D_i",
          "tests/test_resume.py::test_expand_resumes_to_identical_data"),
    Fault("training stopped mid-run", "resumes from the checkpoint to identical weights",
          "tests/test_resume.py::test_training_resumes_to_identical_weights"),
    Fault("torn last line of metrics.jsonl", "cut on resume",
          "tests/test_resume.py::test_resume_drops_torn_metric_line"),
    # ---- full disk
    Fault("disk full (ENOSPC) while a checkpoint is saved", "one `error:` line naming the checkpoint file and the "
          "bytes; stage not complete; rerun resumes from the last checkpoint",
          "tests/test_safety.py::test_disk_full_during_checkpoint_is_one_line_and_resumes"),
    Fault("disk full while adapter weights are saved", "one `error:` line naming the adapter folder; no adapter, "
          "stage not complete", "tests/test_safety.py::test_disk_full_during_weights_save_names_the_path"),
    Fault("disk full or over quota (ENOSPC, EDQUOT) while a manifest or D_i is written",
          "one `error:` line naming the file; nothing marked complete; rerun completes",
          "tests/test_safety.py::test_disk_full_during_json_write_names_the_path"),
    Fault("disk full or permission denied (expand)", "one `error:` line; no artifact lost",
          "tests/test_faults.py::test_disk_full_and_permission_denied_are_one_line"),
    # ---- identity of inputs
    Fault("base weights replaced at the same path", "refused by expand, train, eval and export (merged and "
          "--adapter), naming the base and the stage to rerun",
          "tests/test_safety.py::test_merged_export_checks_its_inputs"),
    Fault("adapter overwritten in place (same size) or truncated", "refused naming the file and the stage to "
          "rerun, with the run's --name, --run-dir and --set",
          "tests/test_safety.py::test_merged_export_checks_its_inputs"),
    Fault("upstream adapter missing, truncated or replaced", "refused naming the file and seed-dpo",
          "tests/test_faults.py::test_damaged_upstream_adapter_is_named"),
    Fault("suggested rerun command", "carries the user's recipe argument, --name, --run-dir and --set",
          "tests/test_safety.py::test_rerun_commands_carry_the_users_options"),
    # ---- data
    Fault("blank or whitespace-only prompts in seed pairs, prompt pool or eval pairs",
          "dropped and counted (manifest and printed summary)",
          "tests/test_safety.py::test_blank_prompts_are_dropped_and_counted"),
    Fault("identical or empty responses in seed pairs", "dropped and counted (`pairs_dropped`)",
          "tests/test_faults.py::test_identical_seed_pairs_are_dropped_and_counted"),
    Fault("prompt longer than model.max_prompt_length", "skipped by expand, counted as `prompt_too_long` (manifest "
          "and printed summary)", "tests/test_safety.py::test_prompt_too_long_is_in_the_printed_summary"),
    Fault("JSONL or JSON starting with a UTF-8 byte-order mark", "read as without it",
          "tests/test_safety.py::test_byte_order_mark_is_accepted"),
    Fault("non-UTF-8 bytes, malformed JSON, wrong types", "one `error:` line naming file, line and field",
          "tests/test_faults.py::test_non_utf8_bytes_name_file_and_line"),
    Fault("Parquet page with bytes that are not UTF-8", "one `error:` line naming the file and record",
          "tests/test_safety.py::test_parquet_with_bad_utf8_is_named"),
    Fault("record nested hundreds of levels deep", "one `error:` line naming file and line (no RecursionError "
          "later, when the record is written)", "tests/test_safety.py::test_deeply_nested_record_is_refused_by_the_reader"),
    Fault("truncated or damaged gzip", "one `error:` line naming the file",
          "tests/test_faults.py::test_truncated_gzip_is_named_not_aborted"),
    Fault("random truncation, byte flips, wrong types, deep nesting, huge fields, odd encodings in JSONL, JSON, "
          "gzip and Parquet data files", "a correct load or one `error:` line (exit 2); no traceback, no hang",
          "tests/test_fuzz_readers.py::test_fuzzed_data_files_load_or_fail_cleanly"),
    Fault("the same mutations, YAML features (anchors, python tags, several documents) and other encodings in "
          "recipes", "a recipe or one `error:` line (exit 2) naming the file", "tests/test_fuzz_readers.py::"
          "test_fuzzed_recipes_load_or_fail_cleanly"),
    Fault("recipe with YAML flow lists nested 1,500 deep (PyYAML took over 30 s)", "refused by a linear depth scan "
          "before PyYAML reads it: one `error:` line naming the file",
          "tests/test_safety.py::test_deeply_nested_yaml_recipe_is_refused_before_pyyaml_reads_it"),
    # ---- recipe and command line
    Fault("infinite or NaN number in a recipe", "refused: `must be a finite number`",
          "tests/test_safety.py::test_infinite_learning_rate_says_finite"),
    Fault("bad value given with --set or --name", "blamed on the command line, not the recipe file",
          "tests/test_safety.py::test_command_line_values_are_blamed_on_the_command_line"),
    Fault("out-of-range setting", "refused when the recipe loads",
          "tests/test_faults.py::test_out_of_range_settings_are_refused"),
    Fault("run name or eval tag with a path separator", "refused", "tests/test_faults.py::test_run_names_stay_inside"),
    # ---- training
    Fault("non-finite loss or gradient, exploding learning rate", "stops with `diverged: step N`; no adapter, "
          "not complete", "tests/test_faults.py::test_divergence_is_not_saved_as_success"),
    Fault("stage with fewer optimizer steps than its warmup", "warns; metrics.jsonl logs the lr each step applied",
          "tests/test_safety.py::test_logged_lr_is_the_applied_one_and_short_warmup_warns"),
    # ---- environment
    Fault("a second writer on the same stage", "refused with the holder's pid",
          "tests/test_faults.py::test_second_writer_is_refused"),
    Fault("stale lock of a dead process", "taken over",
          "tests/test_faults.py::test_stale_lock_of_a_dead_process_is_taken_over"),
    Fault("a stage that fails or is interrupted (Ctrl-C) mid-run", "its lock is released and it is not marked "
          "complete; another stage run, in the same process or another, takes the lock",
          "tests/test_stage_run.py::test_a_stage_that_raises_leaves_no_lock_and_no_complete_manifest"),
    Fault("hub id with no network", "one `error:` line within seconds (one request, no retries)",
          "tests/test_safety.py::test_unreachable_hub_fails_in_one_line_without_retries"),
    Fault("Ctrl-C", "`interrupted (Ctrl-C)`, exit 130; rerun resumes", "tests/test_safety.py::test_ctrl_c_message"),
    Fault("report plots", "PNGs written with report.md's mode (0644)",
          "tests/test_safety.py::test_report_pngs_have_the_mode_of_report_md"),
    Fault("a bug (unexpected exception)", "traceback, then one line saying it is unexpected (exit 1)",
          "tests/test_faults.py::test_unexpected_error_keeps_the_traceback"),
]


def test_fault_registry_names_real_tests():
    for f in FAULTS:
        path, name = f.test.split("::")
        assert (ROOT / path).is_file(), f.test
        module = importlib.import_module(Path(path).stem)
        assert callable(getattr(module, name, None)), f"{f.test} does not exist"


def test_readme_fault_table_is_current():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fault_table
    finally:
        sys.path.pop(0)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert fault_table.table(FAULTS) in readme, "README's fault table is stale: run python scripts/fault_table.py"


# ------------------------------------------------------------------------------------ merged export


def _export(env, name: str, *extra):
    return invoke("export", "--iter", 0, "--out", env["root"] / f"exported-{name}", "--recipe", env["recipe"],
                  "--name", name, *extra)


@pytest.mark.parametrize("damage", ["base", "overwritten", "truncated"])
@pytest.mark.parametrize("mode", ["--merged", "--adapter"])
def test_merged_export_checks_its_inputs(env, tmp_path, damage, mode):
    """Merged export refused a replaced base and a changed adapter no more than --adapter did: both now run
    verify_inputs. Overwritten: 1,000 bytes of the adapter changed in place, the size kept."""
    name = f"export-{damage}{mode}"
    run = clone(env, name, "seed")
    extra = []
    if damage == "base":
        model = tmp_path / "model"
        shutil.copytree(env["ov"]["model.name_or_path"], model)
        extra = ["--set", f"model.name_or_path={model}"]
        ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", name, "--force", *extra))
        other = build_tiny_model_dir(tmp_path / "other", seed=1)
        shutil.copy(other / "model.safetensors", model / "model.safetensors")
        needles = ["base model", "seed-dpo"]
    else:
        f = run / "seed" / "adapter" / "adapter_model.safetensors"
        data = bytearray(f.read_bytes())
        if damage == "truncated":
            data = data[:100]
        else:
            mid = len(data) // 2
            data[mid : mid + 1000] = bytes(1000)
        f.write_bytes(bytes(data))
        needles = [str(f), "seed-dpo", "--name " + name]
    r = _export(env, name, mode, *extra)
    refused(r, *needles)
    assert not (env["root"] / f"exported-{name}").exists()


# ------------------------------------------------------------------------------------ blank prompts


def _blank_prompt_pairs(path: Path, blanks=("", "   \n\t")) -> Path:
    write_pairs(path)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for k, text in enumerate(blanks):
        rows[k]["prompt"] = [{"role": "user", "content": text}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_blank_prompts_are_dropped_and_counted(env, tmp_path):
    pairs = _blank_prompt_pairs(tmp_path / "pairs.jsonl")
    r = ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "blank", "--set", f"data.seed_pairs={pairs}"))
    s = json.loads((env["runs"] / "blank" / "seed" / "manifest.json").read_text())["summary"]
    assert s["pairs_dropped"] == {"empty_prompt": 2}
    assert s["pairs_used"] == 10
    assert "empty_prompt 2" in r.output

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"x{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}]} for i in range(10)]
    rows[3]["prompt"] = "  "
    rows[7]["prompt"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "\n"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clone(env, "blank-pool", "seed")
    r = ok(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "blank-pool", "--set",
                  f"data.prompts={prompts}"))
    s = json.loads((env["runs"] / "blank-pool" / "iter1" / "expand" / "manifest.json").read_text())["summary"]
    assert s["pool_dropped"] == {"empty_prompt": 2}
    assert s["prompts"] == 8  # the pool's 8 usable prompts fill X_1 (8 asked)
    assert "empty_prompt 2" in r.output
    data = [json.loads(x) for x in (env["runs"] / "blank-pool" / "iter1" / "expand" / "data.jsonl").read_text().splitlines()]
    assert all(row["prompt"][-1]["content"].strip() for row in data)

    eval_pairs = _blank_prompt_pairs(tmp_path / "eval.jsonl", blanks=(" ",))
    r = ok(invoke("eval", "--recipe", env["recipe"], "--name", "blank-pool", "--pairs", eval_pairs, "--methods",
                  "none", "--flip", 0, "--no-pass-rate", "--limit", 20))
    rep = json.loads((env["runs"] / "blank-pool" / "eval" / "eval.json").read_text())
    assert rep["pairs"]["dropped"] == {"empty_prompt": 1} and rep["pairs"]["n"] == 11
    assert "empty_prompt 1" in r.output


def test_prompt_too_long_is_in_the_printed_summary(env, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"x{i}", "prompt": [{"role": "user", "content": f"Question number {i}?"}]} for i in range(8)]
    rows[1]["prompt"][0]["content"] = "word " * 3000
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clone(env, "long-summary", "seed")
    r = ok(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", "long-summary", "--set",
                  f"data.prompts={prompts}"))
    assert re.search(r"prompt_too_long\W+1\b", r.output), r.output


# ------------------------------------------------------------------------------------ full disk


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _full_disk_when(monkeypatch, match, code=errno.ENOSPC):
    """The disk fills up for files whose path ``match`` accepts: Python writes fail at their fsync, and the
    writers with their own native I/O (torch's zip writer, safetensors) fail as they do on a full disk."""
    from safetensors import SafetensorError

    from spa_lite import io

    real_fsync = os.fsync

    def fsync(fd):
        if match(_fd_path(fd)):
            raise OSError(code, os.strerror(code))
        return real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", fsync)
    import safetensors.torch as st
    import torch

    real_save_file, real_torch_save = st.save_file, torch.save

    def save_file(tensors, filename, *a, **k):
        if match(str(filename)):
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return real_save_file(tensors, filename, *a, **k)

    def torch_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and match(str(f)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_torch_save(obj, f, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    monkeypatch.setattr(torch, "save", torch_save)
    for mod in ("spa_lite.checkpoint", "peft.peft_model", "peft.utils.save_and_load"):
        m = importlib.import_module(mod)
        for attr in ("save_file", "safe_save_file"):
            if hasattr(m, attr):
                monkeypatch.setattr(m, attr, save_file)


def test_disk_full_during_checkpoint_is_one_line_and_resumes(env, monkeypatch):
    """The second checkpoint (step 4) hits a full disk: one line naming the checkpoint file; the rerun resumes
    from step 2's checkpoint and completes."""
    calls = {"n": 0}

    def second_checkpoint(path: str) -> bool:
        if "checkpoint" in path and path.endswith("optim.pt"):
            calls["n"] += 1
            return calls["n"] > 1
        return False

    _full_disk_when(monkeypatch, second_checkpoint)
    line = refused(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "full-ck"), "No space left on device",
                   "checkpoint", "optim.pt")
    assert "inline_container" not in line
    monkeypatch.undo()
    seed = env["runs"] / "full-ck" / "seed"
    assert not (seed / "manifest.json").exists() and not (seed / "adapter").exists()
    assert json.loads((seed / "checkpoint" / "state.json").read_text())["step"] == 2
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "full-ck"))
    m = json.loads((seed / "manifest.json").read_text())
    assert m["status"] == "complete" and m["summary"]["resumed_from"] == 2


def test_disk_full_during_weights_save_names_the_path(env, monkeypatch):
    _full_disk_when(monkeypatch, lambda p: "adapter" in p and "safetensors" in p)
    refused(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "full-w"), "No space left on device",
            str(env["runs"] / "full-w" / "seed" / "adapter"))
    monkeypatch.undo()
    seed = env["runs"] / "full-w" / "seed"
    assert not (seed / "manifest.json").exists() and not (seed / "adapter").exists()
    assert not [p for p in seed.iterdir() if p.name.startswith(".adapter")], "a temporary folder was left"
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "full-w"))
    assert (seed / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("target", ["manifest.json", "data.jsonl"])
def test_disk_full_during_json_write_names_the_path(env, monkeypatch, code, target):
    name = f"full-{target.split('.')[0]}-{code}"
    run = clone(env, name, "seed")
    before = stage_files(run)
    _full_disk_when(monkeypatch, lambda p: f".{target}." in p, code)
    expand = run / "iter1" / "expand"
    refused(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", name), os.strerror(code),
            str(expand / target))
    monkeypatch.undo()
    after = stage_files(run)
    assert {k: v for k, v in before.items() if k in after} == before, "an artifact was lost"
    assert not (expand / "manifest.json").exists()
    ok(invoke("expand", "--iter", 1, "--recipe", env["recipe"], "--name", name))
    assert (expand / "data.jsonl").read_bytes() == (env["base"] / "iter1" / "expand" / "data.jsonl").read_bytes()


# ------------------------------------------------------------------------------------ rerun commands


@pytest.mark.parametrize("command", ["eval", "export-adapter", "export-merged", "expand"])
def test_rerun_commands_carry_the_users_options(env, tmp_path, command):
    """The suggested `spa-lite seed-dpo ... --force` repeats the recipe argument, --name, --run-dir and --set."""
    runs = tmp_path / "elsewhere"
    name = f"rerun-{command}"
    shutil.copytree(env["base"] / "seed", runs / name / "seed")
    f = runs / name / "seed" / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    common = ["--recipe", env["recipe"], "--name", name, "--run-dir", runs, "--set", "expand.beta=0.1"]
    args = {"eval": ["eval", "--methods", "none", "--flip", 0, "--no-pass-rate"],
            "export-adapter": ["export", "--iter", 0, "--out", tmp_path / "o", "--adapter"],
            "export-merged": ["export", "--iter", 0, "--out", tmp_path / "o"],
            "expand": ["expand", "--iter", 1]}[command]
    line = refused(invoke(*args, *common), str(f))
    for part in (f"--recipe {env['recipe']}", f"--name {name}", f"--run-dir {runs}", "--set expand.beta=0.1"):
        assert part in line, f"{part!r} not in {line!r}"
    assert "RECIPE" not in line


# ------------------------------------------------------------------------------------ small messages


def test_byte_order_mark_is_accepted(env, tmp_path):
    from spa_lite.data import load_pairs

    plain = write_pairs(tmp_path / "plain.jsonl")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([json.loads(x) for x in plain.read_text().splitlines()]).encode())

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "source"} for r in rows]

    assert strip(load_pairs(str(bom))) == strip(load_pairs(str(plain)))
    assert strip(load_pairs(str(as_json))) == strip(load_pairs(str(plain)))
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "bom", "--set", f"data.seed_pairs={bom}",
              "--set", "seed_dpo.epochs=1"))


def test_unreachable_hub_fails_in_one_line_without_retries(env, monkeypatch):
    """No network: name resolution fails. Before, the download retried with back-off (5 retries per file, about
    a minute); now one request decides and the model is not in the cache: one line."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    lookups = []

    def no_network(host, *a, **k):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", "nohub", "--set",
               "model.name_or_path=spa-lite-tests/no-such-model")
    refused(r, "spa-lite-tests/no-such-model", "cannot reach the hub")
    assert "Retrying" not in r.output
    assert len(lookups) <= 2, lookups  # one request (its connection may resolve the host twice), no retries


def test_ctrl_c_message(env, monkeypatch):
    from spa_lite.stages import seed_dpo

    def interrupted(*a, **k):
        raise KeyboardInterrupt()

    monkeypatch.setattr(seed_dpo, "run", interrupted)
    r = invoke("seed-dpo", "--recipe", env["recipe"], "--name", "ctrlc")
    assert r.exit_code == 130
    assert "interrupted (Ctrl-C)" in r.output and "()" not in r.output


def test_infinite_learning_rate_says_finite(env):
    from spa_lite.config import load_recipe
    from spa_lite.errors import SpaError

    with pytest.raises(SpaError, match=r"train\.lr: inf must be a finite number \(> 0"):
        load_recipe(None, {"train.lr": float("inf")})
    line = refused(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "inf-lr", "--set", "seed_dpo.lr=.inf"),
                   "seed_dpo.lr: inf must be a finite number")
    assert "must be > 0" not in line


def test_command_line_values_are_blamed_on_the_command_line(env, tmp_path):
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(Path(env["recipe"]).read_text() + "iterations: -3\n")
    line = refused(invoke("seed-dpo", "--recipe", bad_file, "--name", "../up", "--set", "train.lr=-1"))
    file_part, _, cli_part = line.partition(" | ")
    assert str(bad_file) in file_part and "iterations" in file_part
    assert "train.lr" not in file_part and "name" not in file_part.replace(str(bad_file), "")
    assert cli_part.startswith("overrides") and "train.lr: -1" in cli_part and "name: '../up'" in cli_part
    line = refused(invoke("seed-dpo", "--recipe", env["recipe"], "--set", "train.lr=-1"))
    assert line.startswith("error: overrides") and str(env["recipe"]) not in line


def test_logged_lr_is_the_applied_one_and_short_warmup_warns(env, caplog):
    """With warmup W and S optimizer steps (transformers' cosine schedule with linear warmup), step s (1-based)
    applies lr * (s-1)/W while s-1 < W, then lr * (1 + cos(pi * (s-1-W)/(S-W))) / 2: the row of step 1 says 0."""
    lr, ratio = 5e-3, 0.5
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "lr-log", "--set", f"seed_dpo.warmup_ratio={ratio}"))
    rows = [json.loads(x) for x in (env["runs"] / "lr-log" / "seed" / "metrics.jsonl").read_text().splitlines()]
    S = len(rows)
    W = math.ceil(ratio * S)
    for row in rows:
        s = row["step"] - 1
        want = lr * s / W if s < W else lr * 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W)))
        assert row["lr"] == pytest.approx(want, rel=1e-6, abs=1e-12), row
    assert rows[0]["lr"] == 0.0
    assert "warmup" not in caplog.text
    # one optimizer step with a warmup of one: the stage applies lr 0 and says so
    ok(invoke("seed-dpo", "--recipe", env["recipe"], "--name", "lr-short", "--set", "data.seed_limit=2",
              "--set", "seed_dpo.epochs=1", "--set", "seed_dpo.grad_accum=1"))
    assert "1 optimizer step but warmup_ratio 0.1 needs 1" in caplog.text, caplog.text


def test_report_pngs_have_the_mode_of_report_md(env, tmp_path):
    out = tmp_path / "report"
    ok(invoke("report", env["base"], "--out", out))
    md_mode = stat.S_IMODE((out / "report.md").stat().st_mode)
    pngs = sorted(out.glob("*.png"))
    assert pngs
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in pngs} == {p.name: md_mode for p in pngs}


def test_parquet_with_bad_utf8_is_named(tmp_path):
    """Found by the fuzzer: a Parquet page whose string bytes are not UTF-8 raised UnicodeDecodeError from inside
    datasets' iteration; now a DataError naming the file and the record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spa_lite.data import load_pairs
    from spa_lite.errors import DataError

    rows = [{"prompt": f"question {i}", "chosen": f"answer {i}", "rejected": f"nope {i}"} for i in range(4)]
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, compression="none", use_dictionary=False, write_statistics=False)
    data = path.read_bytes()
    assert data.count(b"answer 2") == 1
    path.write_bytes(data.replace(b"answer 2", b"\xc8nswer 2"))
    with pytest.raises(DataError, match=r"pairs\.parquet:3: cannot read this record \(UnicodeDecodeError"):
        load_pairs(str(path))


def test_deeply_nested_record_is_refused_by_the_reader(env, tmp_path):
    """Found by the fuzzer: a pair with an extra field nested 900 levels deep loaded, then `split` crashed with
    RecursionError writing it; the reader now refuses records nested deeper than data.MAX_DEPTH."""
    p = write_pairs(tmp_path / "pairs.jsonl")
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    text = "".join(json.dumps(r) + "\n" for r in rows[:3]).replace('"p2"', "[" * 900 + "]" * 900)
    p.write_text(text)
    refused(invoke("split", p, "--out", tmp_path / "split", "--seed-size", 1, "--iter-sizes", "1"),
            f"{p}:3", "nested more than")


def test_deeply_nested_yaml_recipe_is_refused_before_pyyaml_reads_it(tmp_path, monkeypatch):
    """1,500 nested flow lists kept PyYAML's pure-Python reader busy for over 30 s (the fuzz bench's open case):
    the depth is checked by a linear scan first, and one error line names the file. Brackets inside quotes and a
    normal recipe's flow lists are not counted against it."""
    import yaml

    from spa_lite.config import MAX_YAML_DEPTH, _flow_depth, load_recipe
    from spa_lite.errors import SpaError

    deep = tmp_path / "deep.yaml"
    deep.write_text("train:\n  lambdas: " + "[" * 1500 + "]" * 1500 + "\n")

    def never(*a, **k):
        raise AssertionError("PyYAML was handed the deeply nested file")

    monkeypatch.setattr(yaml, "safe_load", never)
    with pytest.raises(SpaError, match=f"deep.yaml: YAML nested more than {MAX_YAML_DEPTH} levels"):
        load_recipe(deep)
    monkeypatch.undo()
    assert _flow_depth("a: '[[[[['\nb: [1, [2, {c: 3}]]\n") == 3
