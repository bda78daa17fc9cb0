"""Shared fixtures: a tiny random Llama with the committed tiny tokenizer, tiny preference data and a
recipe that runs every stage in seconds. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("SPA_LITE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ASSETS = Path(__file__).parent / "assets"

QUESTIONS = [
    "How do I boil an egg?", "Name a fast animal.", "Why is the sky blue?", "Give a tip for sleep.",
    "What is a good breakfast?", "How can I save money?", "Suggest a book to read.", "How do plants grow?",
    "What should I pack for a trip?", "How do I learn to cook?", "Why drink water?", "What is a fox?",
]


def build_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-tokenizer")
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_pairs(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": f"A short clear answer number {i}."}],
                     "rejected": [{"role": "assistant", "content": f"no idea lol {i}, maybe, who knows, ask later"}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(path: Path, n: int = 24) -> Path:
    rows = [{"id": f"x{i}", "prompt": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EPS32 = torch.finfo(torch.float32).eps


def float32_bound(model, scale: float, k: float = 32.0) -> float:
    """Largest |a - b| to expect between two float32 evaluations of one model output that differ only in the order
    of their sums (LoRA merged into W or applied beside it, another matmul kernel, a copy loaded again).

    A float32 dot product of length n is off by about eps32 * sqrt(n) * |its terms| (rounding errors of a sum
    add up like a random walk; the worst case is n instead of sqrt(n): Higham, Accuracy and Stability of
    Numerical Algorithms, 2nd ed., 3.1 and 2.8), and each of the L layers (decoder layers plus the LM head)
    passes its error on and adds its own, so an output of size ``scale`` (its largest |value|) is off by about
    eps32 * sqrt(n) * L * scale, n being the widest contraction (hidden or intermediate size). ``k`` covers
    what the estimate leaves out (terms larger than their sum, norms, softmax): with k = 32, the tiny model's
    logits (width 128, L = 3, max |logit| ~0.6) get 8.0e-5, where merged and separate LoRA logits differed by
    4.0e-6 on an Intel Xeon (AMX) and 1.03e-5 on an AMD EPYC (AVX512-BF16), and a defect (a lost adapter or
    a wrong LoRA scale) moves them by more than 1e-2.
    """
    cfg = getattr(model, "config", model)
    width = max(cfg.hidden_size, getattr(cfg, "intermediate_size", 0) or 0)
    depth = cfg.num_hidden_layers + 1
    return k * EPS32 * width ** 0.5 * depth * float(scale)


def margin_bound(model, logits_scale: float, tokens: int, beta: float, lam: float = 0.0) -> float:
    """Largest float32 difference to expect in beta * m, m = the DPO / Eq. 7 margin: a difference of four
    response log-prob sums (chosen and rejected, under pi_theta and pi_ref) of at most ``tokens`` tokens each.

    The logits are off by at most d = float32_bound(model, logits_scale), the extrapolated ones of DND,
    (1 + lam) h_theta - lam h_ref, by (1 + 2 lam) d; a token's log-prob by twice that (log_softmax is
    2-Lipschitz in the max norm); so beta * m is off by beta * 4 * tokens * 2 (1 + 2 lam) d. A confidence
    sigmoid(beta * m) moves by a quarter of that at most, and the DPO loss (-log sigmoid, refined or not) by
    no more than it.
    """
    return beta * 8 * tokens * (1 + 2 * lam) * float32_bound(model, logits_scale)


def nested(overrides: dict) -> dict:
    """tiny_overrides' dotted keys as the nested mapping of a recipe YAML (Paths as strings)."""
    out: dict = {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = str(value) if isinstance(value, Path) else value
    return out


def write_recipe(path: Path, overrides: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(nested(overrides), sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-data")
    return {"pairs": write_pairs(d / "pairs.jsonl"), "prompts": write_prompts(d / "prompts.jsonl")}


def tiny_overrides(model_dir: Path, data: dict[str, Path], run_dir: Path, **extra) -> dict:
    o = {
        "name": "tiny", "run_dir": str(run_dir), "iterations": 2, "threads": 1,
        "model.name_or_path": str(model_dir), "model.quantization": "none", "model.device": "cpu",
        "model.max_length": 128, "model.max_prompt_length": 64, "model.lora_r": 4, "model.lora_alpha": 8,
        "data.seed_pairs": str(data["pairs"]), "data.prompts": str(data["prompts"]),
        "data.eval_pairs": None, "data.eval_prompts": None, "data.iter_prompts": [8, 8],
        "seed_dpo.epochs": 2, "seed_dpo.batch_size": 2, "seed_dpo.grad_accum": 2, "seed_dpo.lr": 5e-3,
        "seed_dpo.save_every": 2,
        "expand.max_new_tokens": 12, "expand.batch_size": 4, "expand.shard_size": 3, "expand.judge_batch_size": 4,
        # full-precision decoding on every machine (auto is bf16 only on CPUs with bf16 units): test_sample_dtype
        # covers the bf16 path
        "expand.sample_dtype": "model",
        "train.batch_size": 2, "train.grad_accum": 2, "train.lr": 5e-3, "train.save_every": 1,
        "train.window": 8,
    }
    o.update(extra)
    return o


@pytest.fixture
def tiny_recipe(tiny_model_dir, tiny_data, tmp_path):
    from spa_lite.config import load_recipe

    def make(**extra):
        return load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs", **extra))

    return make


def pytest_configure(config):
    """Warnings policy of the suite (added after pyproject's filterwarnings, so these take precedence):
    library deprecations are shown in the summary, and a DeprecationWarning or FutureWarning raised from
    spa-lite's own modules fails the test."""
    for line in (
        "default::DeprecationWarning",
        "default::FutureWarning",
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",  # torch's own import, not ours
        "error::DeprecationWarning:spa_lite",
        "error::FutureWarning:spa_lite",
    ):
        config.addinivalue_line("filterwarnings", line)
@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory):
    """spa-lite's wheel built from a copy of the sources and installed into a fresh venv (tests/wheel_env.py)."""
    from wheel_env import build_and_install

    return build_and_install(tmp_path_factory.mktemp("wheel"))


# --- CLI helpers shared by test_cli, test_faults and test_tasks ------------------------------------------------
CLI_ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "SPA_LITE_QUIET": "1"}


def invoke(*args):
    """Run the spa-lite CLI in-process on ``args`` (stringified), wide and quiet."""
    from typer.testing import CliRunner

    from spa_lite.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=CLI_ENV)


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result
