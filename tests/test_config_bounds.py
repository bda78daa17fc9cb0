"""Numeric bounds live on the recipe fields (``config.setting(..., ge=, gt=, le=, lt=)``): validation reads them
from the fields, so a new bounded field needs no other edit, and the messages of the ranges that used to be a
separate table are unchanged, word for word."""

from __future__ import annotations

import dataclasses

import pytest

from spa_lite import config
from spa_lite.config import ExpandConfig, Recipe, load_recipe, setting, validate
from spa_lite.errors import SpaError


def _message(overrides: dict) -> str:
    with pytest.raises(SpaError) as e:
        load_recipe(None, overrides)
    return str(e.value)


# every range of the former config._RANGES table, a value outside it, and the exact message it gave
OLD_TABLE = [
    ("threads", 0, "threads: 0 must be >= 1"),
    ("model.lora_r", 0, "model.lora_r: 0 must be >= 1"),
    ("model.lora_alpha", 0, "model.lora_alpha: 0 must be > 0"),
    ("model.lora_dropout", 1.0, "model.lora_dropout: 1.0 must be >= 0 and < 1"),
    ("model.max_length", 1, "model.max_length: 1 must be >= 2"),
    ("model.max_prompt_length", 0, "model.max_prompt_length: 0 must be >= 1"),
    ("data.seed_limit", 0, "data.seed_limit: 0 must be >= 1"),
    ("data.iter_prompts", [8, 0, -1], "data.iter_prompts: 0 must be >= 1"),
    ("expand.temperature", -0.5, "expand.temperature: -0.5 must be >= 0"),
    ("expand.top_p", 0.0, "expand.top_p: 0.0 must be > 0 and <= 1"),
    ("expand.top_p", 1.5, "expand.top_p: 1.5 must be > 0 and <= 1"),
    ("expand.max_new_tokens", 0, "expand.max_new_tokens: 0 must be >= 1"),
    ("expand.batch_size", 0, "expand.batch_size: 0 must be >= 1"),
    ("expand.shard_size", 0, "expand.shard_size: 0 must be >= 1"),
    ("expand.judge_batch_size", 0, "expand.judge_batch_size: 0 must be >= 1"),
    ("expand.beta", 0.0, "expand.beta: 0.0 must be > 0"),
    ("train.window", 0, "train.window: 0 must be >= 1"),
    ("train.refine_start", 1.5, "train.refine_start: 1.5 must be >= 0 and <= 1"),
    ("train.lambdas", [0.5, -1.0], "train.lambdas: -1.0 must be >= 0"),
    # a non-finite value is no longer "inf must be >= 0" (it is >= 0): issue 23 made it say finite
    ("model.lora_dropout", float("nan"), "model.lora_dropout: nan must be a finite number (>= 0 and < 1)"),
    ("expand.temperature", float("inf"), "expand.temperature: inf must be a finite number (>= 0)"),
] + [row for s in ("seed_dpo", "train") for row in [
    (f"{s}.warmup_ratio", -0.1, f"{s}.warmup_ratio: -0.1 must be >= 0 and <= 1"),
    (f"{s}.weight_decay", -1.0, f"{s}.weight_decay: -1.0 must be >= 0"),
    (f"{s}.max_grad_norm", 0.0, f"{s}.max_grad_norm: 0.0 must be > 0"),
    (f"{s}.save_every", 0, f"{s}.save_every: 0 must be >= 1"),
    (f"{s}.label_smoothing", 0.5, f"{s}.label_smoothing: 0.5 must be >= 0 and < 0.5"),
    (f"{s}.dro_pieces", 0, f"{s}.dro_pieces: 0 must be >= 1"),
    (f"{s}.dro_xi_min", 1.0, f"{s}.dro_xi_min: 1.0 must be > 0 and < 1"),
    (f"{s}.dro_xi_min", 0.0, f"{s}.dro_xi_min: 0.0 must be > 0 and < 1"),
    (f"{s}.diverge_factor", 0.5, f"{s}.diverge_factor: 0.5 must be 0 (off) or > 1"),
]]


@pytest.mark.parametrize("key,value,message", OLD_TABLE, ids=[f"{k}={v}" for k, v, _ in OLD_TABLE])
def test_former_range_table_messages_are_unchanged(key, value, message):
    msg = _message({key: value})
    assert message in msg
    assert msg.count(f"{key}:") == 1  # one message per field, even for a list with several bad items


# the bounds validate() used to spell out by hand: same key and bound, now with the value (and the reason)
HAND_WRITTEN = [
    ("iterations", -1, "iterations: -1 must be >= 0"),
    ("expand.num_samples", 1, "expand.num_samples: 1 must be >= 2 (a pair needs two responses)"),
    ("train.alpha", 0.5, "train.alpha: 0.5 must be >= 0 and < 0.5 (0.5 would erase the label)"),
    ("train.k_percent", 100.0, "train.k_percent: 100.0 must be > 0 and < 100"),
    ("train.k_percent", 0.0, "train.k_percent: 0.0 must be > 0 and < 100"),
] + [row for s in ("seed_dpo", "train") for row in [
    (f"{s}.lr", 0.0, f"{s}.lr: 0.0 must be > 0"), (f"{s}.epochs", -1.0, f"{s}.epochs: -1.0 must be > 0"),
    (f"{s}.beta", 0.0, f"{s}.beta: 0.0 must be > 0"), (f"{s}.batch_size", 0, f"{s}.batch_size: 0 must be >= 1"),
    (f"{s}.grad_accum", 0, f"{s}.grad_accum: 0 must be >= 1"),
    (f"{s}.dro_epsilon", -0.1, f"{s}.dro_epsilon: -0.1 must be >= 0"),
]]


@pytest.mark.parametrize("key,value,message", HAND_WRITTEN, ids=[f"{k}={v}" for k, v, _ in HAND_WRITTEN])
def test_bounds_that_validate_spelled_out_come_from_the_fields(key, value, message):
    assert message in _message({key: value})


def _bounded_fields():
    for section in ("",) + config.SECTIONS:
        obj = getattr(Recipe(), section) if section else Recipe()
        for f in dataclasses.fields(obj):
            if "bounds" in f.metadata:
                yield (f"{section}.{f.name}" if section else f.name), f, getattr(obj, f.name)


def test_every_bound_holds_its_default_and_refuses_beyond_each_end():
    seen = 0
    for key, f, default in _bounded_fields():
        b = f.metadata["bounds"]
        assert all(b.allows(x) for x in (default if isinstance(default, list) else [default]) if x is not None), key
        outside = ([b.lo if not b.lo_ok else b.lo - 1] if b.lo is not None else []) + \
                  ([b.hi if not b.hi_ok else b.hi + 1] if b.hi is not None else [])
        assert outside, key
        for x in outside:
            kind = type(default[0] if isinstance(default, list) else default)
            x = float(x) if kind is float else x  # the value as load_recipe coerces it
            value = [x] if isinstance(default, list) else x
            assert f"{key}: {x!r} must be {b}" in _message({key: value}), (key, x)
            seen += 1
        if isinstance(default, float):
            assert f"{key}: nan must be" in _message({key: float("nan")}), key
    assert seen >= 61  # 50 bounded keys when this was written (train repeats seed_dpo's), 11 bounded at both ends


def test_a_new_bounded_field_is_validated_with_no_other_edit():
    """A field added through ``setting`` alone (here on a subclass of the expand section) is checked by
    validate(), shown with its bounds, and a value inside them passes."""
    Knobs = dataclasses.make_dataclass("Knobs", [
        ("new_rate", float, setting(0.25, "a new knob", gt=0, le=1, why="it is a rate")),
        ("new_count", list[int], setting(factory=lambda: [3], help="new counts", ge=2)),
        ("new_free", float, setting(1.0, "unbounded, still finite"))], bases=(ExpandConfig,))
    recipe = Recipe()
    recipe.expand = Knobs()
    assert validate(recipe) == []
    recipe.expand.new_rate, recipe.expand.new_count, recipe.expand.new_free = 0.0, [5, 1], float("inf")
    assert validate(recipe) == ["expand.new_rate: 0.0 must be > 0 and <= 1 (it is a rate)",
                                "expand.new_count: 1 must be >= 2", "expand.new_free: inf must be a finite number"]
    assert str(dataclasses.fields(Knobs)[-3].metadata["bounds"]) == "> 0 and <= 1"
    with pytest.raises(ValueError, match="one lower bound"):
        setting(1, "two lower bounds", ge=0, gt=0)


def test_reference_shows_the_bounds():
    ref = config.recipe_reference()
    assert "| `expand.top_p` | `1.0` | > 0 and <= 1 | nucleus sampling |" in ref
    assert "| `seed_dpo.diverge_factor` | `0.0` | 0 (off) or > 1 |" in ref
    assert "| `seed_dpo.loss` | `dpo` |  |" in ref  # a string field has no bounds
