"""The chunked log-prob path: spa_lite's pure-torch kernel (``logps.chunked_target_logps``, used when the
installed trl has no ``trl.kernels.ChunkedLogProbFunction``) gives the values and gradients of
``torch.log_softmax`` over full logits, and the DPO step through hidden states gives the loss, confidences and
gradients of the full-logits path, with either kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import margin_bound

from spa_lite import logps
from spa_lite.logps import TokenizedPair, chunked_target_logps, collate_pairs, encode_response
from spa_lite.losses import ConfidenceWindow
from spa_lite.models import load_base_model
from spa_lite.stack import LoraSettings, build_stack
from spa_lite.training import LoopSpec, pair_loss

KERNELS = ["torch"] + (["trl"] if logps.ChunkedLogProbFunction is not None else [])


def _reference(hidden, weight, bias, targets):
    """Independent computation: log_softmax over the full [N, V] logits, then the target column."""
    return torch.log_softmax(F.linear(hidden, weight, bias), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _inputs(n, h, v, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=dtype) * 2).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=dtype)
    return hidden, weight, b, targets, upstream


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 13, 100, None])
def test_chunked_logps_values_and_grads_equal_full_logits_float64(bias, chunk_rows):
    """13 rows in chunks of 1, 4 (13 = 3*4 + 1), 7, 13, 100 (> rows) and the default: float64 agrees with the
    full-logits reference to rounding, for the log-probs and the gradients w.r.t. hidden, weight and bias."""
    hidden, weight, b, targets, upstream = _inputs(13, 8, 50, bias, torch.float64)
    got = chunked_target_logps(hidden, weight, b, targets, chunk_rows)
    want = _reference(hidden, weight, b, targets)
    assert got.dtype == torch.float64 and got.shape == (13,)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    leaves = [hidden, weight] + ([b] if bias else [])
    g_got = torch.autograd.grad(got, leaves, upstream)
    g_want = torch.autograd.grad(want, leaves, upstream)
    for name, a, c in zip(("hidden", "weight", "bias"), g_got, g_want):
        assert c.abs().max() > 1e-3, name  # a real gradient, not zeros on both sides
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logps_float32_matches_and_returns_float32(bias):
    hidden, weight, b, targets, upstream = _inputs(37, 16, 300, bias, torch.float32, seed=1)
    got = chunked_target_logps(hidden, weight, b, targets, chunk_rows=5)
    want = _reference(hidden, weight, b, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    leaves = [hidden, weight] + ([b] if bias else [])
    for a, c in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_chunked_logps_bfloat16_scores_in_float32():
    """bf16 hidden states and head: the logits are rounded by the bf16 matmul only, the log-softmax runs in fp32."""
    hidden, weight, _, targets, _ = _inputs(9, 16, 64, False, torch.float32, seed=2)
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16()
    got = chunked_target_logps(h16, w16, None, targets, chunk_rows=4)
    want = torch.log_softmax(F.linear(h16, w16).float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert h16.grad.dtype == torch.bfloat16 and torch.isfinite(h16.grad.float()).all()


def test_chunked_logps_empty_rows_and_frozen_head():
    """No scored rows: an empty result, and backward still gives zero-size / zero gradients."""
    hidden, weight, b, targets, _ = _inputs(0, 8, 50, True, torch.float64)
    got = chunked_target_logps(hidden, weight, b, targets, chunk_rows=3)
    assert got.shape == (0,)
    gh, gw, gb = torch.autograd.grad(got.sum(), [hidden, weight, b])
    assert gh.shape == (0, 8) and torch.count_nonzero(gw) == 0 and torch.count_nonzero(gb) == 0
    # a frozen head (the LM head is not trained): only the hidden states get a gradient
    hidden, weight, _, targets, _ = _inputs(6, 8, 50, False, torch.float64)
    weight.requires_grad_(False)
    got = chunked_target_logps(hidden, weight, None, targets, chunk_rows=4)
    got.sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(_reference(hidden, weight, None, targets).sum(),
                                                                hidden)[0], atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked_target_logps(hidden, weight, None, targets, chunk_rows=0)


# --------------------------------------------------------------------------------------- on the tiny model


@pytest.fixture
def kernel(request, monkeypatch):
    """Run the fused path with TRL's kernel ("trl") or spa_lite's pure-torch one ("torch")."""
    if request.param == "torch":
        monkeypatch.setattr(logps, "ChunkedLogProbFunction", None)
    assert logps.logprob_kernel() == request.param
    return request.param


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    st = build_stack(base, tok, (), trainable="seed", lora=LoraSettings(r=4, alpha=8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in st.model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B = 0 would zero every gradient but B's
    return st


def _batch(tok, n=4):
    pairs = []
    for i in range(n):
        prompt = tok(f"Question {i}: how do plants grow?", add_special_tokens=False)["input_ids"]
        pairs.append(TokenizedPair(prompt, encode_response(tok, f"With light and water {i}." * (1 + i % 2)),
                                   encode_response(tok, f"no idea {i}")))
    return collate_pairs(pairs, tok.pad_token_id)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_fused_head_serves_without_trl_kernel(stack, kernel):
    fused = logps.fused_head(stack.model)
    assert fused is not None and fused[1] is stack.model.get_base_model().get_output_embeddings()
    batch = _batch(stack.tokenizer)
    with torch.no_grad():
        got = logps.hidden_sequence_logps(logps.backbone_hidden(fused[0], batch), fused[1], batch)
        want = logps.sequence_logps(logps.forward_logits(stack.model, batch), batch)
    assert (want < -1).all()  # sums over several tokens of a random model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_dpo_step_through_hidden_states_equals_logits_path(stack, kernel, monkeypatch):
    """One pair_loss with DND (lam 0.5) and refinement: loss, confidences, flags and every LoRA gradient are the
    same through the chunked kernel as through full logits (``fused_head`` forced to None)."""
    batch = _batch(stack.tokenizer)
    spec = LoopSpec(lr=1e-3, epochs=1, batch_size=4, grad_accum=1, beta=0.1, seed=0, ref=[], refine=True, dnd=True,
                    lam=0.5, k_percent=50.0, window=8)
    params = dict((n, p) for n, p in stack.model.named_parameters() if p.requires_grad)

    def step():
        stack.model.zero_grad(set_to_none=True)
        out = pair_loss(stack, batch, spec, ConfidenceWindow(spec.window, spec.k_percent), refining=True)
        out.loss.backward()
        return out, {n: p.grad.detach().clone() for n, p in params.items()}

    fused, fused_grads = step()
    monkeypatch.setattr(logps, "fused_head", lambda model: None)
    plain, plain_grads = step()
    assert abs(plain.loss.item() - 0.6931) > 1e-3  # the random adapter moves pi_theta off pi_ref
    with torch.no_grad():
        scale = logps.forward_logits(stack.model, batch).abs().max()
    tol = margin_bound(stack.model, scale, int(batch["loss_mask"].sum(1).max()), spec.beta, spec.lam)
    assert fused.loss.item() == pytest.approx(plain.loss.item(), abs=tol)
    torch.testing.assert_close(fused.confidences, plain.confidences, atol=tol / 4, rtol=0)  # sigmoid slope <= 1/4
    assert torch.equal(fused.flagged, plain.flagged) and plain.flagged.any()
    nonzero = 0
    for n, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[n], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
        nonzero += int(g.abs().max() > 1e-6)
    assert nonzero > len(plain_grads) // 2
