"""Verifier-free signs of poor self-labels (spa_lite/label_signs.py) and expand's manifest/warning for them."""

from __future__ import annotations

import json

import pytest

from spa_lite.label_signs import (
    AGREE_MIN,
    LENGTH_DROP,
    LENGTH_LEAN,
    TRUNC_LEAN,
    TRUNC_MIN_PAIRS,
    chosen_longer_share,
    label_signs,
)


def test_chosen_longer_share_counts_characters():
    assert chosen_longer_share([("aaa", "a"), ("a", "aaa"), ("ab", "ab"), ("abcd", "")]) == 0.5
    assert chosen_longer_share([]) is None


def test_each_sign_fires_past_its_threshold_and_not_before():
    gold = [("long answer", "x")] * 10 + [("x", "long answer")] * 10  # gold: chosen longer in half
    lean = [("long answer", "x")] * 14 + [("x", "long answer")] * 6  # 0.7: 0.2 above gold
    even = [("long answer", "x")] * 11 + [("x", "long answer")] * 9  # 0.55: 0.05 above gold
    short = [("long answer", "x")] * 6 + [("x", "long answer")] * 14  # 0.3: 0.2 below gold
    shortish = [("long answer", "x")] * 9 + [("x", "long answer")] * 11  # 0.45: 0.05 below gold
    assert 0.55 - 0.5 < LENGTH_LEAN < 0.7 - 0.5
    sig = label_signs(lean, gold)
    assert [s["sign"] for s in sig] == ["length_lean"] and (sig[0]["value"], sig[0]["gold"]) == (0.7, 0.5)
    sig = label_signs(short, gold)
    assert [s["sign"] for s in sig] == ["short_lean"] and (sig[0]["value"], sig[0]["gold"]) == (0.3, 0.5)
    assert label_signs(even, gold) == [] and label_signs(shortish, gold) == []
    # answers collapsing between iterations: D_i's mean sampled length under LENGTH_DROP x D_{i-1}'s
    assert 0.27 < LENGTH_DROP < 0.8
    sig = label_signs(even, gold, mean_tokens=(40.2, 11.0))  # the gain run's D_1 -> D_2
    assert [s["sign"] for s in sig] == ["length_drop"] and sig[0]["value"] == round(11.0 / 40.2, 4)
    assert label_signs(even, gold, mean_tokens=(40.0, 32.0)) == []  # 0.8x: shorter, not collapsing
    assert label_signs(even, gold, mean_tokens=(0.0, 0.0)) == []
    agree_half = [(0.7, 0.3), (0.7, 0.8)] * 10  # same side in 50% of pairs
    agree_most = [(0.7, 0.6)] * 16 + [(0.7, 0.3)] * 4
    assert 0.5 < AGREE_MIN < 0.8
    sig = label_signs(even, gold, agree_half)
    assert [s["sign"] for s in sig] == ["judges_disagree"] and sig[0]["value"] == 0.5
    assert label_signs(even, gold, agree_most) == []
    # with expand.length_balance on, the lean signs are read from the judged pairs and say the balance evened them
    for pairs, sign in ((lean, "length_lean"), (short, "short_lean")):
        plain, bal = label_signs(pairs, gold), label_signs(pairs, gold, balanced=True)
        assert [s["sign"] for s in bal] == [sign] and bal[0]["value"] == plain[0]["value"]
        assert "length_balance" not in plain[0]["message"]  # measured: it did not help (README)
        note = "; expand.length_balance evens the count (in tokens) in D_i, not the length gap"
        assert bal[0]["message"] == plain[0]["message"] + note


def test_expand_records_the_signs_and_warns_once_each(tiny_recipe, capsys):
    """A tiny random policy's D_1: the manifest holds exactly the signs label_signs computes from D_1's own rows
    and the gold pairs, and each is one warning line."""
    from spa_lite.data import load_pairs, pair_texts, shuffled
    from spa_lite.io import read_jsonl
    from spa_lite.layout import Stage, read_manifest, stage_dir
    from spa_lite.stages import expand, seed_dpo

    recipe = tiny_recipe()
    seed_dpo.run(recipe)
    capsys.readouterr()
    man = expand.run(recipe, 1)
    err = capsys.readouterr().err
    rows = [pair_texts(r) for _, r in read_jsonl(stage_dir(recipe, Stage("expand", 1)) / "data.jsonl")]
    gold = shuffled(load_pairs(recipe.data.seed_pairs, recipe.data.format), recipe.data.shuffle_seed)
    gold = [pair_texts(g) for g in gold[: recipe.data.seed_limit or len(gold)]]
    want = label_signs([(r["chosen"], r["rejected"]) for r in rows], [(g["chosen"], g["rejected"]) for g in gold])
    # the tiny gold pairs' chosen answer is never the longer one; a random policy's labels are: the sign is there
    assert [s["sign"] for s in want] == ["length_lean"]
    assert man["summary"]["label_signs"] == json.loads(json.dumps(want))
    assert read_manifest(recipe, Stage("expand", 1))["summary"]["label_signs"] == man["summary"]["label_signs"]
    lines = [ln for ln in err.splitlines() if ln.startswith("label sign (expand --iter 1)")]
    assert len(lines) == len(want)


def test_truncation_lean_counts_only_pairs_with_one_cut_response():
    gold = [("long answer", "x")] * 10 + [("x", "long answer")] * 10
    even = [("long answer", "x")] * 10 + [("x", "long answer")] * 10  # no length sign
    assert 0.5 < TRUNC_LEAN < 0.94 and TRUNC_MIN_PAIRS <= 38  # the dev samples' smaller count of one-cut pairs
    lean = [(True, False)] * 16 + [(False, True)] * 4  # chose the cut one in 16 of 20
    other = [(True, True)] * 50 + [(False, False)] * 50  # both or neither cut: no information on the lean
    for cut in (lean, lean + other, other + lean):
        sig = label_signs(even, gold, cut=cut)
        assert [s["sign"] for s in sig] == ["truncation_lean"]
        assert (sig[0]["value"], sig[0]["pairs"]) == (0.8, 20) and "drop_truncated" in sig[0]["message"]
        assert "reward_cut_eos" in sig[0]["message"]
    assert label_signs(even, gold, cut=[(True, False)] * 15 + [(False, True)] * 5) == []  # 0.75: not above
    assert label_signs(even, gold, cut=[(True, False)] * (TRUNC_MIN_PAIRS - 1) + other) == []  # too few pairs
    assert label_signs(even, gold, cut=[(False, True)] * 20) == []  # choosing the finished answer is no sign
    assert label_signs(even, gold) == []


def test_expand_reads_the_rows_cut_flags_for_truncation_lean(tiny_recipe, monkeypatch):
    """expand hands label_signs each judged row's (chosen cut, rejected cut): with every chosen response cut and no
    rejected one, the sign is in the manifest and counts every row; the tiny model's own rows (every response cut
    at max_new_tokens) give no one-cut pair and no sign."""
    import spa_lite.label_signs as ls
    from spa_lite.stages import expand, seed_dpo

    monkeypatch.setattr(ls, "TRUNC_MIN_PAIRS", 1)
    plain = tiny_recipe()
    seed_dpo.run(plain)
    man = expand.run(plain, 1)
    assert man["summary"]["truncated"] == man["summary"]["pairs"] > 0  # every pair holds a cut response...
    assert "truncation_lean" not in [s["sign"] for s in man["summary"]["label_signs"]]  # ...but no one-cut pair

    real_row = expand._row

    def cut_chosen(*a):
        row = real_row(*a)
        row["truncated_chosen"], row["truncated_rejected"] = True, False
        return row

    monkeypatch.setattr(expand, "_row", cut_chosen)
    recipe = tiny_recipe(name="cut")
    seed_dpo.run(recipe)
    man = expand.run(recipe, 1)
    sig = [s for s in man["summary"]["label_signs"] if s["sign"] == "truncation_lean"]
    assert len(sig) == 1 and sig[0]["value"] == 1.0 and sig[0]["pairs"] == man["summary"]["pairs"] > 0


@pytest.mark.parametrize("bad", [[], [("", "")]])
def test_no_sign_without_data(bad):
    assert label_signs(bad, []) == [] and label_signs([], bad) == []


def test_expand_reads_the_previous_iterations_mean_length_for_length_drop(tiny_recipe):
    """From iteration 2 on, expand hands label_signs D_{i-1}'s and D_i's mean sampled tokens (its manifests'
    sampled_tokens / samples); iteration 1, or a previous manifest without counts, gives None."""
    from types import SimpleNamespace

    from spa_lite.io import atomic_write_json
    from spa_lite.layout import Stage, stage_dir
    from spa_lite.stages.expand import _mean_tokens

    recipe = tiny_recipe()
    now = {"samples": 100, "sampled_tokens": 1100}
    st = SimpleNamespace(recipe=recipe, stage=Stage("expand", 2))
    assert _mean_tokens(st, now) is None  # no D_1 manifest
    atomic_write_json(stage_dir(recipe, Stage("expand", 1)) / "manifest.json",
                      {"summary": {"samples": 50, "sampled_tokens": 2010}})
    assert _mean_tokens(st, now) == (40.2, 11.0)
    assert _mean_tokens(SimpleNamespace(recipe=recipe, stage=Stage("expand", 1)), now) is None
    assert _mean_tokens(st, {"samples": 0, "sampled_tokens": 0}) is None


def _balanced_reference(rows: list[dict]) -> list[dict]:
    """expand.length_balance written the other way round: keep, of each side (chosen longer / chosen shorter), its
    n most confident rows (earlier first among equals), n the smaller side's size, and every equal-length row."""
    sides: dict[int, list[int]] = {1: [], -1: []}
    keep = set()
    for i, r in enumerate(rows):
        d = (r["len_chosen"] > r["len_rejected"]) - (r["len_chosen"] < r["len_rejected"])
        if d:
            sides[d].append(i)
        else:
            keep.add(i)
    n = min(len(s) for s in sides.values())
    for s in sides.values():
        keep |= set(sorted(s, key=lambda i: (-rows[i]["confidence"], i))[:n])
    return [rows[i] for i in sorted(keep)]


def test_length_balance_keeps_the_most_confident_of_each_side_equal_in_number():
    import random

    from spa_lite.stages.expand import length_balance

    rng = random.Random(0)
    for trial in range(300):
        n = rng.randrange(0, 30)
        rows = [{"id": k, "len_chosen": rng.randrange(1, 6), "len_rejected": rng.randrange(1, 6),
                 # coarse confidences: ties happen, and the tie rule is checked with them
                 "confidence": rng.choice([0.5, 0.55, 0.6, 0.9]) if trial % 2 else rng.random() / 2 + 0.5}
                for k in range(n)]
        got, dropped = length_balance(rows)
        assert got == _balanced_reference(rows), trial
        assert dropped == n - len(got)
        longer = sum(r["len_chosen"] > r["len_rejected"] for r in got)
        shorter = sum(r["len_chosen"] < r["len_rejected"] for r in got)
        assert longer == shorter
    # every pair on one side: only the equal-length pairs are left
    one = [{"len_chosen": 2, "len_rejected": 5, "confidence": 0.9}] * 3 + [{"len_chosen": 4, "len_rejected": 4,
                                                                            "confidence": 0.6}]
    assert length_balance(one) == ([one[3]], 3)
    assert length_balance([]) == ([], 0)


def test_expand_length_balance_writes_the_balanced_pairs_and_counts_the_rest(tiny_recipe, monkeypatch):
    """expand.length_balance through the stage: D_1 (data.jsonl) is all shards' rows balanced as the reference does
    it, the manifest counts the dropped rows, and the option does not change the shards. The tiny random model
    never samples EOS (every response has max_new_tokens tokens), so each row's token lengths are set by a rule
    that makes two of three rows chosen-longer: the balance must then drop rows across shards."""
    import itertools

    from spa_lite.data import pair_texts
    from spa_lite.io import read_json, read_jsonl
    from spa_lite.layout import Stage, stage_dir
    from spa_lite.runs import stage_config
    from spa_lite.stages import expand, seed_dpo

    real_row, k = expand._row, itertools.count()

    def leaning_row(*a):
        row = real_row(*a)
        row["len_chosen"], row["len_rejected"] = (5, 9) if next(k) % 3 == 2 else (9, 5)
        return row

    monkeypatch.setattr(expand, "_row", leaning_row)
    seen = []  # the rows the signs were computed from (the equality below alone could compare [] with [])
    real_signs = expand.d_label_signs
    monkeypatch.setattr(expand, "d_label_signs", lambda recipe, rows, *a: seen.append(list(rows)) or real_signs(recipe, rows, *a))
    recipe = tiny_recipe(**{"expand.length_balance": True})
    assert stage_config(recipe, Stage("expand", 1))["expand"]["length_balance"] is True
    assert "length_balance" not in stage_config(tiny_recipe(), Stage("expand", 1))["expand"]
    seed_dpo.run(recipe)
    man = expand.run(recipe, 1)
    d = stage_dir(recipe, Stage("expand", 1))
    shards = sorted((d / "shards").glob("*.json"))
    shard_rows = [r for f in shards for r in read_json(f)["rows"]]
    assert len(shards) > 1 and len(shard_rows) == 8
    want = _balanced_reference(shard_rows)
    assert 0 < len(want) < len(shard_rows)
    got = [pair_texts(r) for _, r in read_jsonl(d / "data.jsonl")]  # TRL's conversational rows: back to texts
    assert [(r["chosen"], r["rejected"]) for r in got] == [(r["chosen"], r["rejected"]) for r in want]
    assert man["summary"]["pairs"] == len(want)
    assert man["summary"]["length_balance_dropped"] == len(shard_rows) - len(want)
    # the label signs describe the judge's own labels: every judged row, before the balance
    from spa_lite.data import load_pairs, shuffled

    gold = [pair_texts(r) for r in shuffled(load_pairs(recipe.data.seed_pairs, recipe.data.format),
                                            recipe.data.shuffle_seed)][: recipe.data.seed_limit]
    assert len(seen) == 1 and len(seen[0]) == len(shard_rows) > len(want)
    assert sorted((r["chosen"], r["rejected"]) for r in seen[0]) == sorted((r["chosen"], r["rejected"]) for r in shard_rows)
    assert man["summary"]["label_signs"] == label_signs([(r["chosen"], r["rejected"]) for r in shard_rows],
                                                        [(g["chosen"], g["rejected"]) for g in gold], balanced=True)
