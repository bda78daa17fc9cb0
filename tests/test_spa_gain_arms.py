"""bench/spa_gain.py's arm table: every arm's overrides make a valid recipe (a misspelt key or value fails here,
not hours into a run), and every comparison names an arm or policy the bench can produce."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import spa_gain  # noqa: E402


@pytest.mark.parametrize("arm", [a for a, o in spa_gain.ARMS.items() if o is not None])
def test_each_arms_overrides_load_as_a_recipe(arm):
    from spa_lite.config import load_recipe

    over = spa_gain.ARMS[arm]
    for name in ("smollm2-ratio", "smollm2-judge", "smollm2-reward"):
        r = load_recipe(name, dict(over))
        for key, value in over.items():
            section, field = key.split(".")
            assert getattr(getattr(r, section), field) == value, (arm, name, key)


def test_every_comparison_names_a_known_label_and_judge_arms_name_their_judge():
    policies = {"pi_0", "pi_init", "dpo_same_compute"}
    arms = {a for a, o in spa_gain.ARMS.items() if o is not None}
    for pair in spa_gain.COMPARISONS:
        for label in pair:
            if label in policies:
                continue
            arm, _, it = label.rpartition("_")
            assert arm in arms and (it == "final" or it.isdigit()), label
    assert set(spa_gain.ARM_JUDGE) <= arms
    assert {"spa_reward", "spa_reward_nt", "spa_reward_eos4"} <= set(spa_gain.ARM_JUDGE)
    assert spa_gain.ARM_JUDGE["spa_reward_eos4"][1] == spa_gain.ARMS["spa_reward_eos4"]["expand.num_samples"] == 4
    assert spa_gain.ARMS["spa_reward_nt"] == {"expand.judge": "reward", "expand.drop_truncated": True}


def _complete_reward_stage(recipe, config_hash: str) -> Path:
    from spa_lite.layout import REWARD_STAGE, stage_dir

    d = stage_dir(recipe, REWARD_STAGE)
    (d / "adapter").mkdir(parents=True)
    (d / "adapter" / "weights.bin").write_bytes(b"w")
    (d / "manifest.json").write_text(f'{{"status": "complete", "config_hash": "{config_hash}"}}')
    return d


def test_reuse_reward_copies_only_a_complete_stage_with_the_same_hash(tmp_path):
    from spa_lite.config import load_recipe
    from spa_lite.layout import REWARD_STAGE, stage_dir
    from spa_lite.runs import stage_hash

    def rec(name, **over):
        return load_recipe("smollm2-reward", {"name": name, "run_dir": str(tmp_path), "seed": 42, **over})

    target = rec("s42-b", **spa_gain.ARMS["spa_reward_eos4"])
    want = stage_hash(target, REWARD_STAGE)
    # another seed's stage, a stage of another config, and an unfinished one are never copied
    _complete_reward_stage(rec("s43-a", seed=43), want)
    _complete_reward_stage(rec("s42-c"), "0" * 16)
    assert spa_gain.Bench.reuse_reward(target) is None
    assert not stage_dir(target, REWARD_STAGE).exists()
    # expand settings are not the reward stage's: spa_reward's adapter has the eos4 arm's hash
    src = rec("s42-a", **spa_gain.ARMS["spa_reward"])
    assert stage_hash(src, REWARD_STAGE) == want
    made = _complete_reward_stage(src, want)
    stale = stage_dir(target, REWARD_STAGE)
    (stale / "checkpoint").mkdir(parents=True)  # a half-trained stage is replaced, not merged
    assert spa_gain.Bench.reuse_reward(target) == made
    assert (stale / "adapter" / "weights.bin").read_bytes() == b"w" and not (stale / "checkpoint").exists()
    # a complete stage is left alone
    assert spa_gain.Bench.reuse_reward(target) is None


def test_cut_stats_counts_pairs_and_the_lean_where_one_response_was_cut():
    def row(c, r):
        return {"truncated_chosen": c, "truncated_rejected": r}

    rows = [row(True, False)] * 3 + [row(False, True)] + [row(True, True)] * 2 + [row(False, False)] * 4
    assert spa_gain.cut_stats(rows) == {"pairs_with_cut": 6, "one_cut_pairs": 4, "cut_chosen_frac": 0.75}
    # rows of an older run without the flags: nothing counted, no lean reported
    assert spa_gain.cut_stats([{}, {}]) == {"pairs_with_cut": 0, "one_cut_pairs": 0, "cut_chosen_frac": None}
