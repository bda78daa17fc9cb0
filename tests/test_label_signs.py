"""Verifier-free signs of poor self-labels (spa_lite/label_signs.py) and expand's manifest/warning for them."""

from __future__ import annotations

import json
import logging

import pytest

from spa_lite.label_signs import AGREE_MIN, FLAT_BELOW, LENGTH_LEAN, chosen_longer_share, label_signs


def test_chosen_longer_share_counts_characters():
    assert chosen_longer_share([("aaa", "a"), ("a", "aaa"), ("ab", "ab"), ("abcd", "")]) == 0.5
    assert chosen_longer_share([]) is None


def test_each_sign_fires_past_its_threshold_and_not_before():
    gold = [("long answer", "x")] * 5 + [("x", "long answer")] * 5  # gold: chosen longer in half
    lean = [("long answer", "x")] * 8 + [("x", "long answer")] * 2  # 0.8: 0.3 from gold
    even = [("long answer", "x")] * 6 + [("x", "long answer")] * 4  # 0.6: 0.1 from gold
    assert 0.6 - 0.5 < LENGTH_LEAN < 0.8 - 0.5
    assert [s["sign"] for s in label_signs(lean, [0.9] * 10, gold)] == ["length_lean"]
    assert label_signs(even, [0.9] * 10, gold) == []
    flat = [FLAT_BELOW - 0.01] * 6 + [0.9] * 4  # 60% under the bar
    sharp = [FLAT_BELOW - 0.01] * 4 + [0.9] * 6
    assert [s["sign"] for s in label_signs(even, flat, gold)] == ["flat_confidence"]
    assert label_signs(even, sharp, gold) == []
    agree_half = [(0.7, 0.3), (0.7, 0.8)] * 5  # same side in 50% of pairs
    agree_most = [(0.7, 0.6)] * 8 + [(0.7, 0.3)] * 2
    assert 0.5 < AGREE_MIN < 0.8
    sig = label_signs(even, [0.9] * 10, gold, agree_half)
    assert [s["sign"] for s in sig] == ["judges_disagree"] and sig[0]["value"] == 0.5
    assert label_signs(even, [0.9] * 10, gold, agree_most) == []


def test_expand_records_the_signs_and_warns_once_each(tiny_recipe, caplog):
    """A tiny random policy's D_1 against gold pairs whose chosen side is never longer: the manifest holds
    exactly the signs label_signs computes from D_1's own rows, and each is one warning line."""
    from spa_lite.data import load_pairs, pair_texts, shuffled
    from spa_lite.io import read_jsonl
    from spa_lite.runs import Stage, read_manifest, stage_dir
    from spa_lite.stages import expand, seed_dpo

    recipe = tiny_recipe()
    seed_dpo.run(recipe)
    with caplog.at_level(logging.WARNING, logger="spa_lite"):
        man = expand.run(recipe, 1)
    rows = [pair_texts(r) for _, r in read_jsonl(stage_dir(recipe, Stage("expand", 1)) / "data.jsonl")]
    gold = shuffled(load_pairs(recipe.data.seed_pairs, recipe.data.format), recipe.data.shuffle_seed)
    gold = [pair_texts(g) for g in gold[: recipe.data.seed_limit or len(gold)]]
    want = label_signs([(r["chosen"], r["rejected"]) for r in rows], [r["confidence"] for r in rows],
                       [(g["chosen"], g["rejected"]) for g in gold])
    assert man["summary"]["label_signs"] == json.loads(json.dumps(want))
    assert read_manifest(recipe, Stage("expand", 1))["summary"]["label_signs"] == man["summary"]["label_signs"]
    lines = [r.getMessage() for r in caplog.records if "expand --iter 1" in r.getMessage()]
    assert len(lines) == len(want)


@pytest.mark.parametrize("bad", [[], [("", "")]])
def test_no_sign_without_data(bad):
    assert label_signs(bad, [], []) == []
