"""Eq. 7's sigmoid stays finite for any z: a large ``expand.beta`` with ``judge_ref: none`` reaches |z| > 709,
where ``math.exp(-z)`` overflows."""

from __future__ import annotations

import math

import pytest
import torch

from spa_lite.judge import judge_logprob, stable_sigmoid
from spa_lite.models import load_base_model
from spa_lite.stack import build_stack


def test_stable_sigmoid_extremes():
    with pytest.raises(OverflowError):  # what the plain formula did
        1.0 / (1.0 + math.exp(1000.0))
    assert stable_sigmoid(-1000.0) == 0.0
    assert stable_sigmoid(1000.0) == 1.0
    assert stable_sigmoid(0.0) == 0.5
    assert stable_sigmoid(-math.inf) == 0.0 and stable_sigmoid(math.inf) == 1.0


def test_stable_sigmoid_agrees_with_torch():
    # float64 on both sides: each result is a few roundings of exp and one division, so a relative error of a
    # few ulps (2.2e-16 each); the range stops where exp(-|z|) leaves the normal doubles (|z| ~ 708)
    zs = torch.cat([torch.linspace(-700.0, 700.0, 2801, dtype=torch.float64),
                    torch.tensor([-1e-12, 1e-12, -36.7, 36.7], dtype=torch.float64)])
    want = torch.sigmoid(zs)
    for z, w in zip(zs.tolist(), want.tolist()):
        assert stable_sigmoid(z) == pytest.approx(w, rel=8 * 2.2e-16, abs=0.0), z


def test_judge_with_huge_beta_gives_finite_probabilities(tiny_model_dir):
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    stack = build_stack(base, tok, [])
    prompts = [tok("Name a fast animal.", add_special_tokens=False)["input_ids"]] * 2
    y1 = [tok(" A cheetah.", add_special_tokens=False)["input_ids"]] * 2
    y2 = [tok(" Probably a snail on a lazy day.", add_special_tokens=False)["input_ids"]] * 2
    rows = judge_logprob(stack, [], None, prompts, y1, y2, beta=1e4)
    back = judge_logprob(stack, [], None, prompts, y2, y1, beta=1e4)
    z = 1e4 * (rows[0]["logratio_1"] - rows[0]["logratio_2"])
    assert abs(z) > 709  # the case that raised OverflowError
    for r, b in zip(rows, back):
        assert r["p"] in (0.0, 1.0) and r["p"] + b["p"] == 1.0
