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
    logp: float | None = None  # log pi(token_ids | prompt) of the sampling policy at temperature 1 (record_logps)


class _TokenLogpRecorder:
    """A logits processor that passes scores through and records log p(sampled token) under them.

    It runs before temperature and top-p (which ``sample_responses`` applies after it, not ``generate``), so the
    distribution it sees is the policy's own: log pi(y_t | x, y_<t), what Eq. 7 needs. At each call the last
    column of ``input_ids`` is the token drawn from the previous call's distribution; the final token is
    gathered by ``finish``. One [rows, V] log-softmax is alive at a time.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, generated tokens] log-probs of the generated tokens (positions after a stop are meaningless)."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, sequences[:, -1:].to(self.prev.device)).squeeze(1))
        out = torch.stack(self.steps, 1).float().cpu() if self.steps else torch.empty(sequences.shape[0], 0)
        self.prev, self.steps = None, []
        return out


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
    record_logps: bool = False,
) -> list[list[Sample]]:
    """Sample ``num_samples`` responses per chat prompt, batched with left padding.

    Each batch b is seeded with ``seed + b``, so the samples of a batch do not depend on the batches before
    it: a resumed expand (which skips finished shards) draws exactly what an uninterrupted one would.
    ``record_logps``: also return each sample's log-probability under the sampling policy at temperature 1
    (``Sample.logp``), read off the sampling pass itself, so Eq. 7 needs no second forward of pi_{i-1}.
    Temperature and top-p are applied as logits processors after the recorder; the draws are the same as
    without recording.

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
        sampling = temperature > 0
        recorder = None
        if record_logps:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

            recorder = _TokenLogpRecorder()
            procs = [recorder]
            if sampling and temperature != 1.0:
                procs.append(TemperatureLogitsWarper(temperature))
            if sampling and top_p < 1.0:
                procs.append(TopPLogitsWarper(top_p))
            # neutral values, so that generate builds no warper of its own ahead of the recorder
            extra = dict(logits_processor=LogitsProcessorList(procs), temperature=1.0 if sampling else None,
                         top_p=1.0 if sampling else None)
        else:
            extra = dict(temperature=temperature if sampling else None, top_p=top_p if sampling else None)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=sampling,
            top_k=0 if sampling else None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            eos_token_id=stops,
            pad_token_id=pad,
            use_cache=True,
            **extra,
        )
        token_lp = recorder.finish(out) if recorder is not None else None
        gen = out[:, width:].cpu().tolist()
        for r in range(len(chunk)):
            samples = []
            for s in range(num_samples):
                row = r * num_samples + s
                toks = gen[row]
                end = next((k for k, t in enumerate(toks) if t in stops), None)
                resp = toks if end is None else toks[: end + 1]
                text = tokenizer.decode(resp, skip_special_tokens=True).strip()
                lp = float(token_lp[row, : len(resp)].sum()) if token_lp is not None else None
                samples.append(Sample(text, resp, len(resp), end is None, lp))
            results.append(samples)
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    return results
