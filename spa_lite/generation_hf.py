"""The ``hf`` sampling engine: ``transformers.GenerationMixin.generate`` on the (unmerged) stack.

spa-lite's reference engine (``spa_lite.generation.sample_responses(..., engine="hf")``): what bench/
bench_generation.py compares the fast loop with, and the engine for models whose generation_config asks for
logits processors the fast loop does not apply. It works on token ids; ``spa_lite.generation`` encodes the chat
prompts and decodes the responses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper


class _TokenLogpRecorder:
    """A logits processor that passes scores through and records log p(sampled token) under them (hf engine).

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


@torch.no_grad()
def generate_hf(
    model,
    encoded: list[list[int]],
    *,
    stops: list[int],
    pad: int,
    num_samples: int = 2,
    max_new_tokens: int = 300,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    record_logps: bool = False,
) -> list[list[tuple[list[int], bool, float | None]]]:
    """Sample with transformers' generate: batches in prompt order, batch b seeded with ``seed + b``.

    Args:
        encoded: the prompts' token ids (left-padded with ``pad`` per batch).
        stops: token ids that end a response (kept as its last token).
        Others: as ``spa_lite.generation.sample_responses``.

    Returns:
        per prompt, ``num_samples`` tuples (response tokens, truncated: no stop token, log-prob or None).
    """
    device = next(model.parameters()).device
    results: list[list[tuple[list[int], bool, float | None]]] = []
    was_training = model.training
    model.eval()
    for b, start in enumerate(range(0, len(encoded), batch_size)):
        chunk = encoded[start : start + batch_size]
        ids, mask = left_padded(chunk, pad)
        torch.manual_seed(seed + b)
        sampling = temperature > 0
        recorder, extra = _sampling_kwargs(temperature, top_p, record_logps)
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
        results += _responses(out[:, ids.shape[1] :].cpu().tolist(), token_lp, len(chunk), num_samples, stops)
        if on_batch is not None:
            on_batch(len(chunk))
    model.train(was_training)
    return results


def left_padded(chunk: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of the prompts ``chunk``, left-padded with ``pad`` to the longest."""
    width = max(len(x) for x in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for r, x in enumerate(chunk):
        ids[r, width - len(x) :] = torch.tensor(x)
        mask[r, width - len(x) :] = 1
    return ids, mask


def _sampling_kwargs(temperature: float, top_p: float, record_logps: bool) -> tuple[_TokenLogpRecorder | None, dict]:
    """(log-prob recorder or None, generate's sampling keywords). With a recorder, temperature and top-p run
    as logits processors after it, and generate gets neutral values so that it builds no warper of its own
    ahead of the recorder."""
    sampling = temperature > 0
    if not record_logps:
        return None, dict(temperature=temperature if sampling else None, top_p=top_p if sampling else None)
    recorder = _TokenLogpRecorder()
    procs = [recorder]
    if sampling and temperature != 1.0:
        procs.append(TemperatureLogitsWarper(temperature))
    if sampling and top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return recorder, dict(logits_processor=LogitsProcessorList(procs), temperature=1.0 if sampling else None,
                          top_p=1.0 if sampling else None)


def _responses(gen: list[list[int]], token_lp: torch.Tensor | None, prompts: int, num_samples: int,
               stops: list[int]) -> list[list[tuple[list[int], bool, float | None]]]:
    """Per prompt of a batch, its samples cut after their first stop token: (tokens, truncated, log-prob)."""
    results = []
    for r in range(prompts):
        samples = []
        for s in range(num_samples):
            row = r * num_samples + s
            toks = gen[row]
            end = next((k for k, t in enumerate(toks) if t in stops), None)
            resp = toks if end is None else toks[: end + 1]
            lp = float(token_lp[row, : len(resp)].sum()) if token_lp is not None else None
            samples.append((resp, end is None, lp))
        results.append(samples)
    return results
