"""Batched sampling from whichever adapters are active on the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    text: str
    token_ids: list[int]  # the sampled response tokens, including the end-of-turn token if one was produced
    num_tokens: int
    truncated: bool  # hit max_new_tokens before an end-of-turn token


def encode_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant turn's header."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    *,
    num_samples: int = 2,
    max_new_tokens: int = 300,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[Sample]]:
    """Sample ``num_samples`` responses per chat prompt, batched with left padding.

    Each batch b is seeded with ``seed + b``, so the samples of a batch do not depend on the batches before
    it: a resumed expand (which skips finished shards) draws exactly what an uninterrupted one would.

    Returns:
        one list of ``num_samples`` samples per prompt, in prompt order.
    """
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    results: list[list[Sample]] = []
    was_training = model.training
    model.eval()
    for b, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start : start + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, x in enumerate(chunk):
            ids[r, width - len(x) :] = torch.tensor(x)
            mask[r, width - len(x) :] = 1
        torch.manual_seed(seed + b)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            top_k=0 if temperature > 0 else None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
        )
        gen = out[:, width:].cpu().tolist()
        for r in range(len(chunk)):
            samples = []
            for s in range(num_samples):
                toks = gen[r * num_samples + s]
                end = next((k for k, t in enumerate(toks) if t in stops), None)
                resp = toks if end is None else toks[: end + 1]
                text = tokenizer.decode(resp, skip_special_tokens=True).strip()
                samples.append(Sample(text, resp, len(resp), end is None))
            results.append(samples)
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    return results
