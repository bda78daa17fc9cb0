"""The one log-prob core (``logps.batch_logps``) that training, the judge and evaluation read, the loss choice
(``losses.preference_loss``), the loop's confidence exchange and LoopSpec's defaults."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import margin_bound

from spa_lite import logps
from spa_lite.config import TrainConfig
from spa_lite.dro import dro_dpo_loss
from spa_lite.logps import batch_logps, collate_pairs, tokenize_pair
from spa_lite.losses import ConfidenceWindow, label_smoothing_weights, preference_loss, refined_dpo_loss
from spa_lite.models import load_base_model
from spa_lite.stack import LoraSettings, build_stack
from spa_lite.training import LoopSpec, _SharedWindow


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    torch.manual_seed(0)
    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    st = build_stack(base, tok, (), trainable="seed", lora=LoraSettings(dropout=0.0))
    with torch.no_grad():
        for n, p in st.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # pi_theta differs from pi_init
    return st


def _batch(tok, n=3):
    pairs = [tokenize_pair(tok, [{"role": "user", "content": f"Question {i}?"}], f"Good answer {i}.", f"bad {i}")
             for i in range(n)]
    return collate_pairs(pairs, tok.pad_token_id)


def _by_hand(logits, batch):
    """Independent sum of response-token log-probs: log_softmax over the full vocabulary, token t from t - 1."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (lp * batch["loss_mask"][:, 1:]).sum(-1)


def test_core_matches_log_softmax_by_hand(stack):
    """Policy, pi_init reference and the Eq. 12 mix, from hidden states, equal float64 log-softmax sums of logits."""
    batch, lam = _batch(stack.tokenizer), 0.5
    assert logps.fused_head(stack.model) is not None  # the hidden-state path is the one under test
    with torch.no_grad():
        got = batch_logps(stack, batch, ["seed"], [], (lam,))
        with stack.use(["seed"]) as m:
            pol = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with stack.use([]) as m:
            ref = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tokens = int(batch["loss_mask"].sum(1).max())
    # margin_bound covers four sums at beta = 1: one sum is a quarter of it
    tol = margin_bound(stack.model, max(pol.abs().max(), ref.abs().max()), tokens, 1.0, lam) / 4
    want = {"policy": _by_hand(pol, batch), "ref": _by_hand(ref, batch),
            "mix": _by_hand((1 + lam) * pol.double() - lam * ref.double(), batch)}
    assert (want["policy"] - want["ref"]).abs().max() > 10 * tol  # the adapter moves the policy off pi_init
    assert (want["mix"] - want["policy"]).abs().max() > 10 * tol  # and the extrapolation moves it further
    for name, value in (("policy", got.policy), ("ref", got.ref), ("mix", got.extrapolated[lam])):
        assert value.dtype == torch.float32 and value.shape == (6,), name
        torch.testing.assert_close(value.double(), want[name], atol=tol, rtol=0, msg=lambda m, k=name: f"{k}: {m}")


def test_core_gradients_and_modes(stack):
    """train=True: only the policy's log-probs carry gradients, and the model is left in train mode; train=False
    leaves the mode as it was and without a reference returns none."""
    batch = _batch(stack.tokenizer, 2)
    out = batch_logps(stack, batch, ["seed"], [], (0.25,), train=True)
    assert out.policy.requires_grad and not out.ref.requires_grad and not out.extrapolated[0.25].requires_grad
    assert stack.model.training
    out.policy.sum().backward()
    grads = [p.grad for p in stack.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().max() > 0 for g in grads)
    stack.model.zero_grad(set_to_none=True)
    stack.model.eval()
    with torch.no_grad():
        alone = batch_logps(stack, batch, ["seed"])
    assert not stack.model.training and alone.ref is None and alone.extrapolated == {}
    torch.testing.assert_close(alone.policy, out.policy.detach(), atol=1e-6, rtol=0)  # no dropout: same values
    with pytest.raises(ValueError, match="reference"):
        batch_logps(stack, batch, ["seed"], None, (0.5,))


def _spec(**kw):
    base = dict(loss="dpo", alpha=0.1, label_smoothing=0.0, dro_epsilon=0.0, dro_pieces=8, dro_xi_min=1e-3)
    return SimpleNamespace(**{**base, **kw})


def test_preference_loss_chooses_the_loss():
    logits = torch.tensor([-2.0, -0.3, 0.0, 0.8, 3.0], dtype=torch.float64)
    flagged = torch.tensor([False, True, False, True, False])
    dpo, stats = preference_loss(logits, flagged, _spec())
    assert stats == {} and dpo.item() == pytest.approx(refined_dpo_loss(logits, flagged, 0.1).sum().item(), abs=0)
    # dro at epsilon 0 is the refined loss: -log sigma(m) + s [log sigma(m) - log sigma(-m)], summed
    s = label_smoothing_weights(flagged, 0.1, 0.0, logits.dtype)
    want = (-F.logsigmoid(logits) + s * (F.logsigmoid(logits) - F.logsigmoid(-logits))).sum().item()
    dro0, stats0 = preference_loss(logits, flagged, _spec(loss="dro"))
    assert dro0.item() == pytest.approx(want, abs=1e-12) and dpo.item() == pytest.approx(want, abs=1e-12)
    assert stats0["dro_pairs_moved"] == 0.0
    dro, stats = preference_loss(logits, flagged, _spec(loss="dro", dro_epsilon=0.05))
    worst, _ = dro_dpo_loss(logits, 0.05, 8, 1e-3)
    assert stats["dro_pairs_moved"] > 0 and dro.item() > dro0.item() + 1e-3  # the worst case costs more
    assert dro.item() == pytest.approx(want + 5 * (worst.item() - F.softplus(-logits).mean().item()), abs=1e-12)
    with pytest.raises(ValueError, match="sigmoid"):
        preference_loss(logits, flagged, _spec(loss="sigmoid"))


class _TwoProcesses:
    """Process ``rank`` of two; the other one holds ``other``."""

    enabled, world = True, 2

    def __init__(self, other, rank=0):
        self.other, self.rank = other, rank

    def all_gather_object(self, obj):
        return [obj, self.other] if self.rank == 0 else [self.other, obj]


def test_shared_window_pushes_confidences_in_single_process_order():
    """Process r holds global positions r, r + 2, ...: [0.1, 0.3, 0.5] and [0.2, 0.4] are pairs 0-4 in order."""
    window = ConfidenceWindow(size=4, k_percent=50.0)
    tau = _SharedWindow(window, _TwoProcesses([0.2, 0.4])).push([0.1, 0.3, 0.5])
    assert list(window.values) == [0.2, 0.3, 0.4, 0.5] and tau == pytest.approx(0.35)
    # a micro-batch of one pair: process 1 has none and still pushes process 0's confidence
    assert _SharedWindow(window, _TwoProcesses([0.9], rank=1)).push([]) == pytest.approx(0.45)
    alone = ConfidenceWindow(size=4, k_percent=50.0)
    _SharedWindow(alone, SimpleNamespace(enabled=False)).push([0.7, 0.6])
    assert list(alone.values) == [0.7, 0.6]


def test_loop_spec_takes_every_recipe_default_from_the_recipe():
    """One definition per default: a LoopSpec field named like a ``train`` setting defaults to the recipe's value,
    except refine and dnd, which are off unless the stage turns them on (seed DPO never refines)."""
    recipe = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    shared = [f for f in dataclasses.fields(LoopSpec) if f.name in recipe and f.default is not dataclasses.MISSING]
    assert len(shared) >= 14
    for f in shared:
        if f.name in ("refine", "dnd"):
            assert f.default is False and recipe[f.name] is True, f.name
        else:
            assert f.default == recipe[f.name], f.name
