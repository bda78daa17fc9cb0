"""Eval-stage math: the fused (hidden-state) and logits paths agree, judge accuracy counts swapped
presentations correctly, and self-labelling noise is counted as defined."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spa_lite import evaluation, logps
from spa_lite.logps import tokenize_pair
from spa_lite.models import load_base_model
from spa_lite.stack import build_stack


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    torch.manual_seed(0)
    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    st = build_stack(base, tok, (), trainable="seed")
    with torch.no_grad():
        for n, p in st.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # make pi_0 differ from pi_init
    return st


def _pairs(tok, n=6):
    rows = [({"role": "user", "content": f"Question {i}?"}, f"Good answer {i}.", f"bad {i} lol") for i in range(n)]
    return [tokenize_pair(tok, [m], c, r, {"prompt": [m], "chosen": c, "rejected": r}) for m, c, r in rows]


def test_fused_and_logits_paths_give_the_same_confidences(stack, monkeypatch):
    pairs = _pairs(stack.tokenizer)
    flipped = np.array([False, True, False, False, True, False])
    assert logps.fused_head(stack.model) is not None
    fused = evaluation.pair_confidences(stack, pairs, ["seed"], [], [0.5, 0.25], 0.1, flipped)
    monkeypatch.setattr(evaluation, "fused_head", lambda model: None)
    plain = evaluation.pair_confidences(stack, pairs, ["seed"], [], [0.5, 0.25], 0.1, flipped)
    for k in plain:
        np.testing.assert_allclose(fused[k], plain[k], rtol=1e-5, atol=1e-6)
    # a flipped label turns the confidence c into 1 - c
    unflipped = evaluation.pair_confidences(stack, pairs, ["seed"], [], [0.5], 0.1, None)
    np.testing.assert_allclose(fused["eq9"][flipped], 1 - unflipped["eq9"][flipped], rtol=1e-5)


def test_judge_accuracy_is_invariant_to_presentation_order(stack):
    """Accuracy counts p > 0.5 for the gold-chosen response whichever slot it was shown in: with the
    no-reference judge and a length-biased toy pair set, recompute it by hand from response_logps."""
    from spa_lite.judge import response_logps

    pairs = _pairs(stack.tokenizer)
    acc = evaluation.judge_accuracy(stack, pairs, 0, ["none"])["none"]
    lp_c = response_logps(stack, ["seed"], [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs])
    lp_r = response_logps(stack, ["seed"], [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs])
    expected = float((lp_c > lp_r).float().mean())
    assert acc["n"] == len(pairs) and acc["accuracy"] == pytest.approx(expected)


def test_self_label_noise_counts():
    verify = lambda text, c: "ok" in text  # noqa: E731
    rows = [{"chosen": "ok", "rejected": "no", "constraint": {}},  # confirmed
            {"chosen": "no", "rejected": "ok", "constraint": {}},  # contradicted
            {"chosen": "ok", "rejected": "ok", "constraint": {}},  # undetermined
            {"chosen": "no", "rejected": "ok!", "constraint": {}}]  # contradicted
    flags = [{"row": 1, "flagged": True}, {"row": 0, "flagged": False}, {"row": 3, "flagged": False}]
    out = evaluation.self_label_noise(rows, verify, flags)
    assert (out["confirmed"], out["contradicted"], out["undetermined"]) == (1, 2, 1)
    assert out["contradicted_frac_of_decided"] == pytest.approx(2 / 3)
    assert out["flagged_pairs"] == 1 and out["contradicted_rate_flagged"] == 1.0
    assert out["contradicted_rate_unflagged"] == pytest.approx(1 / 2)  # rows 0 (confirmed) and 3 (contradicted)
