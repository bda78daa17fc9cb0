"""The GPU user's path, rehearsed on CPU: `recipes/zephyr-7b-qlora.yaml` with only the model and the sizes
replaced (a tiny random Mistral, the architecture of zephyr-7b, in 4-bit NF4 through bitsandbytes on CPU),
UltraFeedback-binarized data made here with responses beyond the recipe's 1024 tokens and prompts beyond its 512,
through every command a GPU user runs: split, seed-dpo, expand, train, eval, export (merged and adapter),
export-answers, report. The counts of truncated pairs and too-long prompts are checked against the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

try:
    import bitsandbytes  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the install
    pytest.skip(f"bitsandbytes cannot be imported: {e}", allow_module_level=True)

from conftest import ASSETS, QUESTIONS, invoke, ok

from spa_lite.generation import encode_prompt
from spa_lite.logps import tokenize_pair

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "zephyr-7b-qlora.yaml"
SIZES = {"seed": 8, "iters": [4, 4, 4], "test": 6}
# what the test replaces, and nothing else: the model and the sizes (the lengths stay the recipe's 1024 / 512)
REPLACED = {
    "model": {"lora_r": 4, "lora_alpha": 8},
    "seed_dpo": {"epochs": 1, "batch_size": 2, "grad_accum": 2, "save_every": 2},
    # drop_truncated stays the recipe's true in spirit but not here: a random model almost never ends a response
    # within 12 tokens, so every pair would be dropped and D_i left empty; the truncated count is checked instead
    "expand": {"max_new_tokens": 12, "batch_size": 4, "shard_size": 4, "judge_batch_size": 4,
               "drop_truncated": False},
    "train": {"batch_size": 2, "grad_accum": 2, "save_every": 2},
}


def build_tiny_mistral(path: Path) -> Path:
    """A random 2-layer MistralForCausalLM (zephyr-7b's architecture) with the committed tiny tokenizer."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        sliding_window=None, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def ultrafeedback_rows(n: int) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized's schema: prompt string, chosen/rejected conversations, scores.
    Every 3rd pair has a chosen answer of ~1,500 tokens, every 5th a rejected one; every 4th prompt is
    ~700 tokens (over max_prompt_length 512)."""
    long_answer = " ".join(f"step {k}: stir." for k in range(150))
    rows = []
    for i in range(n):
        prompt = f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"
        if i % 4 == 3:
            prompt = "Context: " + " ".join(f"fact {k} is true." for k in range(60)) + " " + prompt
        chosen = f"A clear answer, number {i}." + (" " + long_answer if i % 3 == 0 else "")
        rejected = f"no idea {i}" + (" " + long_answer if i % 5 == 0 else "")
        user = {"role": "user", "content": prompt}
        rows.append({"prompt": prompt, "prompt_id": f"{i:064x}",
                     "chosen": [user, {"role": "assistant", "content": chosen}],
                     "rejected": [user, {"role": "assistant", "content": rejected}],
                     "messages": [user, {"role": "assistant", "content": chosen}],
                     "score_chosen": 8.0, "score_rejected": 4.0 + (i % 3)})
    return rows


def over_long(tok, path: Path, max_length: int) -> int:
    """Pairs of a split file whose prompt + longer response is over max_length tokens."""
    n = 0
    for line in path.read_text().splitlines():
        r = json.loads(line)
        tp = tokenize_pair(tok, r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"])
        n += len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids)) > max_length
    return n


MANIFEST_KEYS = ("stage", "status", "config_hash", "config", "recipe", "inputs", "identity", "versions", "timings",
                 "summary", "memory")


def assert_complete(manifest: dict, stage: str) -> None:
    missing = [k for k in MANIFEST_KEYS if manifest.get(k) in (None, {}, "")]
    assert manifest["status"] == "complete" and manifest["stage"] == stage and not missing, (stage, missing)
    assert manifest["recipe"]["model"]["quantization"] == "4bit" and manifest["timings"]["wall_s"] >= 0


def test_zephyr_recipe_rehearsed_on_cpu(tmp_path):
    """In the fast suite: 27-45 s wall (18 s of CPU) on one thread of a loaded 2-core machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny_mistral(tmp_path / "tiny-mistral")
    tok = AutoTokenizer.from_pretrained(model_dir)
    raw = tmp_path / "ultrafeedback.jsonl"
    n = SIZES["seed"] + sum(SIZES["iters"]) + SIZES["test"]
    raw.write_text("".join(json.dumps(r) + "\n" for r in ultrafeedback_rows(n)))
    data = tmp_path / "data" / "uf"
    ok(invoke("split", raw, "--out", data, "--seed-size", SIZES["seed"],
              "--iter-sizes", ",".join(map(str, SIZES["iters"])), "--test-size", SIZES["test"]))

    cfg = yaml.safe_load(RECIPE.read_text())
    ml, mpl = cfg["model"]["max_length"], cfg["model"]["max_prompt_length"]
    assert (ml, mpl) == (1024, 512) and cfg["model"]["quantization"] == "4bit"
    cfg["model"]["name_or_path"] = str(model_dir)
    for section, values in REPLACED.items():
        cfg[section].update(values)
    cfg["data"].update(seed_pairs=str(data / "seed_pairs.jsonl"), prompts=str(data / "prompts.jsonl"),
                       eval_pairs=str(data / "test_pairs.jsonl"), iter_prompts=SIZES["iters"])
    cfg.update(run_dir=str(tmp_path / "runs"), threads=1)
    recipe = tmp_path / "zephyr-tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / "runs" / cfg["name"]

    seed = ok(invoke("seed-dpo", "--recipe", recipe))
    assert seed  # the manifest is read below
    for i in range(1, cfg["iterations"] + 1):
        ok(invoke("expand", "--iter", i, "--recipe", recipe))
        ok(invoke("train", "--iter", i, "--recipe", recipe))
    ok(invoke("eval", "--recipe", recipe, "--no-pass-rate", "--tag", "rehearsal"))

    manifests = {p.parent.relative_to(run).as_posix(): json.loads(p.read_text()) for p in run.rglob("manifest.json")}
    stages = ["seed"] + [f"iter{i}/{s}" for i in range(1, cfg["iterations"] + 1) for s in ("expand", "train")]
    assert sorted(manifests) == sorted(stages)
    for key in stages:
        assert_complete(manifests[key], key)

    s = manifests["seed"]["summary"]
    want = over_long(tok, data / "seed_pairs.jsonl", ml)
    assert want > 0 and s["truncation"] == "truncate"
    assert (s["pairs_used"], s["pairs_truncated"], s["pairs_skipped_length"]) == (SIZES["seed"], want, 0)
    pool = [json.loads(x)["prompt"] for x in (data / "prompts.jsonl").read_text().splitlines()]
    too_long = [len(encode_prompt(tok, p)) > mpl for p in pool]
    assert any(too_long)
    assert sum(manifests[f"iter{i}/expand"]["summary"]["prompt_too_long"] for i in (1, 2, 3)) == sum(too_long)
    for i in (1, 2, 3):
        e = manifests[f"iter{i}/expand"]["summary"]
        assert e["prompts"] == SIZES["iters"][i - 1] and e["truncated"] > 0 and e["dropped_truncated"] == 0
        t = manifests[f"iter{i}/train"]["summary"]
        assert t["pairs_skipped_length"] == 0 and t["pairs_used"] > 0  # 12 new tokens: nothing over 1024
    ev = json.loads((run / "eval" / "rehearsal.json").read_text())
    assert ev["pairs"]["n"] == SIZES["test"] and ev["pairs"]["truncated"] == over_long(tok, data / "test_pairs.jsonl", ml)

    merged, adapter = tmp_path / "pi3", tmp_path / "pi3-adapter"
    ok(invoke("export", "--iter", 3, "--out", merged, "--recipe", recipe))
    ok(invoke("export", "--iter", 3, "--out", adapter, "--adapter", "--recipe", recipe))
    questions = tmp_path / "alpaca_eval.json"
    questions.write_text(json.dumps([{"instruction": q} for q in QUESTIONS[:3]]))
    answers = tmp_path / "model_outputs.json"
    ok(invoke("export-answers", questions, "--out", answers, "--recipe", recipe, "--max-new-tokens", 8))
    assert [a["instruction"] for a in json.loads(answers.read_text())] == QUESTIONS[:3]
    ok(invoke("report", run))
    assert (run / "report" / "report.md").exists()

    _check_nf4(recipe)
    m = AutoModelForCausalLM.from_pretrained(merged)
    assert type(m).__name__ == "MistralForCausalLM" and not hasattr(m.config, "quantization_config")
    ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": "Hi?"}])])
    assert torch.isfinite(m(ids).logits).all()
    _check_adapter(model_dir, adapter, ids)


def _check_nf4(recipe: Path) -> None:
    """The stages' base is bitsandbytes NF4 on CPU, as on the GPU (not a float fallback)."""
    from bitsandbytes.nn import Linear4bit

    import spa_lite
    from spa_lite.loading import load_stack

    stack = load_stack(spa_lite.load_recipe(recipe), frozen_upto=3)
    q = [m for m in stack.model.modules() if isinstance(m, Linear4bit)]
    assert q and all(m.weight.quant_type == "nf4" for m in q)
    assert next(stack.model.parameters()).device.type == "cpu"


def _check_adapter(model_dir: Path, adapter: Path, ids: torch.Tensor) -> None:
    """The exported adapter loads with peft on the float base and moves its outputs (LoRA B is not zero)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    before = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, adapter)
    after = peft_model(ids).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)
