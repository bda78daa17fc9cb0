"""Tokenised pairs, padded batches and per-sequence log-probabilities.

A batch of B pairs is one forward pass over 2B rows: rows [0, B) are the chosen responses, rows [B, 2B)
the rejected ones, each after its prompt. ``loss_mask`` marks response tokens, the only ones scored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import trl
from trl.trainer.utils import selective_log_softmax

from spa_lite.generation import encode_prompt

try:
    from trl.kernels import ChunkedLogProbFunction
except ImportError:  # trl < 1.15 has no chunked log-prob kernel: log-probs go through full logits
    ChunkedLogProbFunction = None

log = logging.getLogger(__name__)


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
# (and, for DND, their mix). Here the backbone returns hidden states, and TRL's chunked log-prob kernel
# projects only the response positions through the LM head, tile by tile, recomputing tiles in backward.
# Because the head is affine, the DND mix of logits (1 + lam) W h_theta - lam W h_ref (+ b) equals the head
# applied to the mixed hidden states (1 + lam) h_theta - lam h_ref: Eq. 12 costs one more chunked pass.

_VOCAB_TILE = 8192
_HEAD_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_warned_no_kernel = False


def chunked_kernel_available() -> bool:
    """True when the installed TRL has its chunked log-prob kernel (``trl.kernels.ChunkedLogProbFunction``)."""
    return ChunkedLogProbFunction is not None


def head_is_affine(config) -> bool:
    """True when the model's LM head is a plain affine map (no soft-capping or logit rescaling)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return all(getattr(cfg, attr, None) in (None, 1.0) for attr in _HEAD_SCALES)


def _warn_no_kernel_once() -> None:
    global _warned_no_kernel
    if not _warned_no_kernel:
        _warned_no_kernel = True
        log.warning("trl %s has no chunked log-prob kernel (trl.kernels.ChunkedLogProbFunction, trl >= 1.15): "
                    "log-probs go through full [N, L, V] logits, which needs more memory (install trl>=1.15,<1.17 "
                    "for the fused path)", trl.__version__)


def fused_head(model):
    """(backbone, lm_head) when log-probs can be computed from hidden states, else None (use logits).

    Without TRL's chunked kernel this logs a warning once per process and returns None.
    """
    if ChunkedLogProbFunction is None:
        _warn_no_kernel_once()
        return None
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
    lp = ChunkedLogProbFunction.apply(h, head.weight, head.bias, targets, 1.0, _VOCAB_TILE, None, 1.0, ())[0]
    rows = mask.nonzero()[:, 0]
    return torch.zeros(hidden.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp.float())
