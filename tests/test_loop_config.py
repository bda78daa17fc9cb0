"""Every key of the recipe's `seed_dpo` and `train` sections reaches the training loop's LoopSpec.

Each key is set to a value different from its default and from every other key's, through load_recipe's
overrides (the path of YAML and `--set`); the LoopSpec the stage builds must carry it (train.lambdas as the
iteration's lambda). A key that no LoopSpec field receives fails here, instead of doing nothing in a run.
"""

from __future__ import annotations

import dataclasses

import pytest

from spa_lite.config import SeedDPOConfig, TrainConfig, load_recipe
from spa_lite.stages import seed_dpo, train
from spa_lite.training import LoopSpec

# what a key becomes in LoopSpec when it is not the field of the same name
DERIVED = {"lambdas"}
# read by the train stage itself (which rows train on which label), not by the loop: tests/test_inspect.py
# ::test_train_stage_trains_on_the_human_labels checks that it reaches the rows
STAGE_LEVEL = {"audit_labels"}


def _distinct_values(cls) -> dict:
    """A valid, non-default value per field; numbers are all different from one another."""
    out = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            out[f.name] = not default
        elif f.name == "loss":
            out[f.name] = "dro"
        elif f.name == "lambdas":
            out[f.name] = [0.3, 0.2]
        elif f.name in ("batch_size", "grad_accum", "save_every", "dro_pieces", "window"):
            out[f.name] = default + 3 + i
        elif f.name == "alpha":
            out[f.name] = 0.17
        elif f.name in ("k_percent",):
            out[f.name] = 12.5
        elif f.name == "diverge_factor":  # 0 (off) or > 1
            out[f.name] = 2.5
        elif isinstance(default, float):
            out[f.name] = round(default * 1.5 + 0.01 * (i + 1), 6)
        else:
            raise AssertionError(f"no test value for {cls.__name__}.{f.name}: add one here")
        assert out[f.name] != default, f.name
    return out


def test_train_config_extends_seed_dpo_with_the_same_defaults():
    seed_fields = {f.name: f for f in dataclasses.fields(SeedDPOConfig)}
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(seed_fields) <= set(train_fields)
    for name, f in seed_fields.items():
        if name != "epochs":  # one pass per SPA iteration, three over the gold seed pairs
            assert train_fields[name].default == f.default, name


@pytest.mark.parametrize("section", ["seed_dpo", "train"])
def test_every_recipe_key_reaches_the_loop(section):
    cls = SeedDPOConfig if section == "seed_dpo" else TrainConfig
    values = _distinct_values(cls)
    recipe = load_recipe(None, {f"{section}.{k}": v for k, v in values.items()} | {"seed": 7})
    spec = seed_dpo.loop_spec(recipe) if section == "seed_dpo" else train.loop_spec(recipe, 2, ["seed", "iter1"])
    loop_fields = {f.name for f in dataclasses.fields(LoopSpec)}
    for key, value in values.items():
        if key in DERIVED or key in STAGE_LEVEL:
            continue
        assert key in loop_fields, f"{section}.{key} does not reach the training loop"
        assert getattr(spec, key) == value, key
    if section == "train":
        assert spec.lam == 0.2 and spec.ref == ["seed", "iter1"] and spec.seed == 9  # lambda of iteration 2
        assert spec.dnd is (values["dnd"] and values["refine"])
    else:
        assert spec.ref == [] and spec.seed == 7 and spec.refine is False and spec.dnd is False


def test_defaults_give_the_loop_of_before():
    """With a default recipe the specs equal the ones the stages built field by field before."""
    r = load_recipe(None)
    c = r.seed_dpo
    assert seed_dpo.loop_spec(r) == LoopSpec(
        lr=c.lr, epochs=c.epochs, batch_size=c.batch_size, grad_accum=c.grad_accum, beta=c.beta, seed=r.seed,
        ref=[], warmup_ratio=c.warmup_ratio, weight_decay=c.weight_decay, max_grad_norm=c.max_grad_norm,
        save_every=c.save_every, loss=c.loss, label_smoothing=c.label_smoothing, dro_epsilon=c.dro_epsilon,
        dro_pieces=c.dro_pieces, dro_xi_min=c.dro_xi_min)
    t = r.train
    assert train.loop_spec(r, 1, ["seed"]) == LoopSpec(
        lr=t.lr, epochs=t.epochs, batch_size=t.batch_size, grad_accum=t.grad_accum, beta=t.beta, seed=r.seed + 1,
        ref=["seed"], warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        save_every=t.save_every, refine=t.refine, alpha=t.alpha, k_percent=t.k_percent, window=t.window,
        refine_start=t.refine_start, dnd=t.dnd and t.refine, lam=0.5, loss=t.loss, label_smoothing=t.label_smoothing,
        dro_epsilon=t.dro_epsilon, dro_pieces=t.dro_pieces, dro_xi_min=t.dro_xi_min)
