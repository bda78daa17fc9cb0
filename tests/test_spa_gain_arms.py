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
