"""Tokenised pairs, padded batches and per-sequence log-probabilities.

A batch of B pairs is one forward pass over 2B rows: rows [0, B) are the chosen responses, rows [B, 2B)
the rejected ones, each after its prompt. ``loss_mask`` marks response tokens, the only ones scored.
``batch_logps`` is the one place that turns a batch into the log-probs that training (Eq. 3, 10), the judge
(Eq. 7) and evaluation (Eq. 9, 11-12) read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl.trainer.utils import selective_log_softmax

from spa_lite.generation import encode_prompt

try:
    from trl.kernels import ChunkedLogProbFunction
except ImportError:  # trl < 1.15 has no chunked log-prob kernel: spa_lite's own (chunked_target_logps) serves
    ChunkedLogProbFunction = None


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    meta: dict = field(default_factory=dict)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response tokens as the model would end them: the text, then the end-of-turn (EOS) token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids) + [tokenizer.eos_token_id]


def tokenize_pair(tokenizer, prompt: Sequence[dict], chosen: str, rejected: str, meta: dict | None = None) -> TokenizedPair:
    return TokenizedPair(
        encode_prompt(tokenizer, prompt), encode_response(tokenizer, chosen), encode_response(tokenizer, rejected),
        meta or {},
    )


def truncate_pair(tp: TokenizedPair, max_length: int, max_prompt_length: int) -> TokenizedPair:
    """A pair that fits ``max_length`` as it is, or its truncation as the paper's TRL fork did it (``keep_end``).

    A pair fits when prompt + longer response <= ``max_length``; then nothing changes, a prompt longer than
    ``max_prompt_length`` included. Otherwise the prompt keeps its last ``max_prompt_length`` tokens (the turn the
    response answers) and each response its first ``max_length - len(prompt)`` tokens, which is TRL's
    ``DataCollatorForPreference(max_length, truncation_mode="keep_start")`` on the shortened prompt. A truncated
    pair's ``meta["truncated"]`` is True (a cut response loses its end-of-turn token, as in TRL).
    """
    p, c, r = tp.prompt_ids, tp.chosen_ids, tp.rejected_ids
    if len(p) + max(len(c), len(r)) <= max_length:
        return tp
    p = p[-max_prompt_length:]
    room = max_length - len(p)  # >= 1: the recipe checks max_prompt_length < max_length
    return TokenizedPair(p, c[:room], r[:room], {**tp.meta, "truncated": True})


def collate_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows with a mask over the response tokens."""
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        loss[i, len(p) : n] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    prompts = [p.prompt_ids for p in pairs] * 2
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return collate_sequences(prompts, responses, pad_id)


def forward_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    return out.logits


def token_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, zero outside the response. Shape [N, L-1], float32."""
    ids = batch["input_ids"][:, 1:].to(logits.device)
    mask = batch["loss_mask"][:, 1:].to(logits.device)
    lp = selective_log_softmax(logits[:, :-1].float(), ids)
    return lp * mask


def sequence_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of response-token log-probabilities per row, shape [N]."""
    return token_logps(logits, batch).sum(-1)


@torch.no_grad()
def extrapolated_logps(policy_logits: torch.Tensor, ref_logits: torch.Tensor, lam: float,
                       batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 12: log-probs under softmax((1 + lambda) h_theta - lambda h_ref), token by token, summed per row.

    Computed row by row so that only one extra [L, V] buffer is alive, not a third [N, L, V] tensor.
    """
    out = torch.empty(policy_logits.shape[0], device=policy_logits.device, dtype=torch.float32)
    for i in range(policy_logits.shape[0]):
        mix = (1.0 + lam) * policy_logits[i : i + 1].float() - lam * ref_logits[i : i + 1].float()
        row = {k: v[i : i + 1] for k, v in batch.items()}
        out[i] = sequence_logps(mix, row)[0]
    return out


# --- Fused path: log-probabilities from hidden states, without [N, L, V] logits --------------------------------
# The largest buffers of a DPO step on a small model are the full-vocabulary logits of policy and reference
# (and, for DND, their mix). Here the backbone returns hidden states, and a chunked log-prob kernel projects
# only the response positions through the LM head, a chunk at a time, recomputing each chunk in backward: TRL's
# (trl >= 1.15) when installed, else spa_lite's pure-torch ``chunked_target_logps``.
# Because the head is affine, the DND mix of logits (1 + lam) W h_theta - lam W h_ref (+ b) equals the head
# applied to the mixed hidden states (1 + lam) h_theta - lam h_ref: Eq. 12 costs one more chunked pass.

_VOCAB_TILE = 8192
# Logits per chunk of the torch kernel: 2^24 fp32 values (64 MiB), e.g. 341 rows of SmolLM2's 49,152 tokens.
_CHUNK_ELEMENTS = 1 << 24
_HEAD_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def chunked_kernel_available() -> bool:
    """True: log-probs of an affine LM head are computed in chunks from hidden states, with TRL's kernel when the
    installed trl has it (``trl.kernels.ChunkedLogProbFunction``, trl >= 1.15), else with spa_lite's pure-torch
    ``chunked_target_logps``. ``logprob_kernel()`` says which."""
    return True


def logprob_kernel() -> str:
    """Which chunked log-prob kernel ``hidden_sequence_logps`` uses: "trl" or "torch" (spa_lite's own)."""
    return "trl" if ChunkedLogProbFunction is not None else "torch"


def head_is_affine(config) -> bool:
    """True when the model's LM head is a plain affine map (no soft-capping or logit rescaling)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all(getattr(cfg, attr, None) in (None, 1.0) for attr in _HEAD_SCALES)


class _ChunkedTargetLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ W^T + b)[target] per row, in row chunks; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are scored in fp32
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_rows):
            z = F.linear(hidden[s : s + chunk_rows], weight, bias).to(acc)
            t = targets[s : s + chunk_rows].unsqueeze(-1)
            out[s : s + chunk_rows] = z.gather(-1, t).squeeze(-1) - torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = grad_out.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        # weight and bias gradients accumulate over chunks in the scoring dtype (fp32 at least), not per chunk in bf16
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk_rows):
            h = hidden[s : s + ctx.chunk_rows]
            g_out = grad_out[s : s + ctx.chunk_rows]
            z = F.linear(h, weight, bias).to(acc)
            # d log p_t / dz_j = 1[j = t] - p_j; the chunk's softmax and gradient overwrite its logits in place
            g = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True)).exp_()
            g.mul_(-g_out.unsqueeze(-1))
            g.scatter_add_(-1, targets[s : s + ctx.chunk_rows].unsqueeze(-1), g_out.unsqueeze(-1))
            if need_h:
                grad_h[s : s + ctx.chunk_rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(g.t(), h.to(acc))
            if need_b:
                grad_b.add_(g.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def chunked_target_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight^T + bias)[targets] per row, [N], without an [N, V] logits tensor.

    The result is float32 (float64 for float64 inputs) whatever the dtype of ``hidden``.

    Pure torch, differentiable in ``hidden``, ``weight`` and ``bias``: the rows go through the head
    ``chunk_rows`` at a time (by default as many as fit 2^24 logits) and backward recomputes each chunk's
    logits, so no [rows, V] buffer outlives its chunk.

    Args:
        hidden: [N, H] hidden states (the scored positions only).
        weight: [V, H] LM head weight; bias: [V] or None.
        targets: [N] token ids (long).
        chunk_rows: rows per chunk (>= 1); None: ``_CHUNK_ELEMENTS // V``.
    """
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedTargetLogProbs.apply(hidden, weight, bias, targets.long(), int(chunk_rows))


def fused_head(model):
    """(backbone, lm_head) when log-probs can be computed from hidden states, else None (use logits).

    None for a head that is not a plain ``nn.Linear`` (e.g. LoRA-wrapped) or rescales its logits, and for a
    model without a separate decoder.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not head_is_affine(base.config):
        return None  # a non-affine or rescaled head: keep the plain logits path
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # e.g. a LoRA-wrapped lm_head
        return None
    try:
        backbone = base.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return (backbone, head) if backbone is not None else None


def backbone_hidden(backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states [N, L, H] (after the last norm) with whatever adapters are active."""
    device = next(backbone.parameters()).device
    out = backbone(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False)
    return out.last_hidden_state


def hidden_sequence_logps(hidden: torch.Tensor, head: torch.nn.Linear, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of response-token log-probs per row from hidden states, [N], float32; differentiable in ``hidden``."""
    mask = batch["loss_mask"][:, 1:].to(hidden.device)
    targets = batch["input_ids"][:, 1:].to(hidden.device)[mask]
    h = hidden[:, :-1][mask]
    if ChunkedLogProbFunction is not None:
        lp = ChunkedLogProbFunction.apply(h, head.weight, head.bias, targets, 1.0, _VOCAB_TILE, None, 1.0, ())[0]
    else:
        lp = chunked_target_logps(h, head.weight, head.bias, targets)
    rows = mask.nonzero()[:, 0]
    return torch.zeros(hidden.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp.float())


# --- One log-prob core: policy, reference and extrapolated log-probs of a batch -------------------------------


@dataclass
class BatchLogps:
    """Summed response log-probs per row of one batch, [N] float32 each."""

    policy: torch.Tensor  # log pi_policy(y|x); differentiable when computed with ``train=True``
    ref: torch.Tensor | None  # log pi_ref(y|x); None without a reference
    extrapolated: dict[float, torch.Tensor]  # Eq. 12 per lambda: softmax((1 + lam) h_policy - lam h_ref); no gradient


def _forward(stack, names: Sequence[str], batch: dict[str, torch.Tensor], fused: bool, mode: str | None):
    """(hidden states, LM head) of ``batch`` under adapters ``names`` when ``fused``, else (logits, None).

    ``mode`` "train" or "eval" switches the model first; None leaves it as the caller set it.
    """
    with stack.use(names) as m:
        if mode == "train":
            m.train()  # LoRA dropout, if any, and gradient checkpointing act in train mode only
        elif mode == "eval":
            m.eval()
        if not fused:
            return forward_logits(m, batch), None
        backbone, head = fused_head(m)  # the model in use: a duck-typed stack may hold one model per policy
        return backbone_hidden(backbone, batch), head


def _summed(out: torch.Tensor, head, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return sequence_logps(out, batch) if head is None else hidden_sequence_logps(out, head, batch)


def batch_logps(stack, batch: dict[str, torch.Tensor], policy: Sequence[str], ref: Sequence[str] | None = None,
                lambdas: Sequence[float] = (), *, train: bool = False) -> BatchLogps:
    """Log-probs of every row of ``batch`` under the policy, the reference and, for DND, their extrapolation.

    Models with an affine LM head (``fused_head``) are scored from hidden states, the response positions only,
    without [N, L, V] logits; a sharded base all-gathers inside the model's forward only, so it takes the logits
    path. The reference runs first, without gradient; the extrapolations (Eq. 12, one per lambda) too.

    Args:
        stack: a ``PolicyStack`` (or anything with ``model``, ``sharded`` and ``use(names)``).
        policy: adapters of the scored policy; ref: adapters of the reference ([] = pi_init), None: none.
        lambdas: Eq. 12's lambda per extrapolation (needs ``ref``).
        train: the policy's log-probs carry gradients and run in train mode, the reference's in eval mode;
            False leaves modes and gradient mode as the caller set them.
    """
    if lambdas and ref is None:
        raise ValueError("Eq. 12 extrapolates the policy away from a reference: pass ref")
    fused = not stack.sharded and fused_head(stack.model) is not None
    ref_out = ref_lp = None
    if ref is not None:
        with torch.no_grad():
            ref_out, ref_head = _forward(stack, ref, batch, fused, "eval" if train else None)
            ref_lp = _summed(ref_out, ref_head, batch)
    pol_out, head = _forward(stack, policy, batch, fused, "train" if train else None)
    pol_lp = _summed(pol_out, head, batch)
    mixes = {}
    with torch.no_grad():
        for lam in lambdas:
            if fused:  # the head is affine: W((1 + lam) h_theta - lam h_ref) + b is Eq. 12's mix of logits
                mixes[lam] = hidden_sequence_logps((1.0 + lam) * pol_out.detach() - lam * ref_out, head, batch)
            else:
                mixes[lam] = extrapolated_logps(pol_out.detach(), ref_out, lam, batch)
    return BatchLogps(pol_lp, ref_lp, mixes)
