"""Batched sampling from whichever adapters are active on the model.

Two engines give the same interface (``sample_responses``):

* ``fast`` (default): spa-lite's own decoding loop. The frozen policy's active LoRA adapters are merged into
  a working copy of the base's linear layers (the base itself is untouched and every other tensor is shared);
  prompts enter longest first, each prefilled once for all of its samples; a row leaves the batch (and its KV
  cache) as soon as it ends its turn, and waiting prompts take the freed rows (continuous batching), so no
  step is spent on finished rows and the batch stays full; the KV cache grows in place, into spare room, not by
  concatenation (``_kv_buffers``). Each sequence draws from its own random stream,
  seeded by (seed, prompt index, sample index): its sample does not depend on the batch size, the order of
  the prompts or the other rows of its batch.
* ``hf`` (spa_lite/generation_hf.py): ``transformers.GenerationMixin.generate`` on the (unmerged) stack,
  batches in file order, one seed per batch; the engine spa-lite used before, kept as the reference of
  bench/bench_generation.py, for models whose generation_config asks for logits processors the fast loop
  does not apply, and wherever the fast loop's KV-cache patches fall outside the transformers releases they
  were tested with (``spa_lite.compat``).

The two engines draw different (equally distributed) samples for the same seed; greedy decoding (temperature
0) gives the same tokens up to float rounding (merged vs unmerged weights, other batch shapes), which can
flip an argmax between two near-equal logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import spa_lite.compat as compat
from spa_lite.generation_hf import generate_hf, left_padded
from spa_lite.sampling_copy import sampling_model


@dataclass
class Sample:
    text: str
    token_ids: list[int]  # the sampled response tokens, including the end-of-turn token if one was produced
    num_tokens: int
    truncated: bool  # hit max_new_tokens before an end-of-turn token
    logp: float | None = None  # log pi(token_ids | prompt) of the sampling policy at temperature 1 (record_logps)


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


# generation_config settings that add logits processors the fast loop does not implement: with any of them
# set, sampling goes through transformers' generate (engine "hf") so that it still applies them
_UNSUPPORTED = {"repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
                "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
                "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "min_length": (None, 0),
                "renormalize_logits": (None, False), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
                "eta_cutoff": (None, 0.0), "min_p": (None,)}


def unsupported_settings(model) -> list[str]:
    """generation_config settings of ``model`` that only the hf engine applies."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return []
    return [k for k, ok in _UNSUPPORTED.items() if getattr(gc, k, None) not in ok]


CPU_MIN_ROWS = 96  # see sample_responses(max_rows=...)


def _row_seed(seed: int, prompt: int, sample: int) -> int:
    h = hashlib.blake2b(f"{seed}/{prompt}/{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


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
    engine: str = "fast",
    merge: bool = True,
    max_rows: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[list[Sample]]:
    """Sample ``num_samples`` responses per chat prompt (temperature 0: greedy), batched with left padding.

    Args:
        seed: fast engine: sequence j of prompt k draws from a stream seeded by (seed, k, j), so a resumed
            expand (which skips finished shards, each with its own seed) draws what an uninterrupted one would,
            whatever the batch size. hf engine: batch b is seeded with ``seed + b``.
        batch_size: prompts decoded at once (each with its ``num_samples`` sequences); the fast engine keeps
            up to ``batch_size * num_samples`` rows in flight.
        on_batch: called with a number of finished prompts, every ``batch_size`` prompts and at the end
            (progress bars).
        record_logps: also return each sample's log-probability under the sampling policy at temperature 1
            (``Sample.logp``), read off the sampling pass itself, so Eq. 7 needs no second forward of pi_{i-1}.
            Temperature and top-p are applied after it; the draws are the same as without recording.
        engine: "fast" (spa-lite's loop, merged adapters) or "hf" (transformers' generate); see the module
            docstring. "fast" falls back to "hf" when the model's generation_config asks for a logits
            processor it does not apply (``unsupported_settings``).
        merge: fast engine: decode with the active adapters merged into a working copy (``spa_lite.sampling_copy.merged_copy``).
        max_rows: fast engine: sequences in flight at once. Default ``batch_size * num_samples``, and at least
            ``CPU_MIN_ROWS`` on a CPU, where a decoding step streams every weight once whatever the row count and
            a matrix product of 96 rows runs at about 1.5x the FLOP rate of one of 48 (2 cores, SmolLM2), so
            more rows cost less per token. The price is memory: SmolLM2's float32 KV cache is 46 KB per row and
            position, 0.5 GB for 96 rows of 120 positions.
        dtype: fast engine: decode with the merged copy's weights in this dtype (``spa_lite.sampling_copy.sampling_dtype`` picks
            bfloat16 on CPUs with bf16 matrix units). The samples then come from the policy rounded to that
            dtype, and recorded log-probs are that copy's, not the full-precision policy's.

    Returns:
        one list of ``num_samples`` samples per prompt, in prompt order.
    """
    if engine not in ("fast", "hf"):
        raise ValueError(f"engine '{engine}' is not fast or hf")
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}), batch_size ({batch_size}) and num_samples "
                         f"({num_samples}) must be >= 1")
    # outside the transformers releases its cache patches were tested with, the fast engine is not used
    if engine == "hf" or unsupported_settings(model) or not compat.fast_decoding_supported():
        return _sample_hf(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, on_batch=on_batch,
                          record_logps=record_logps)
    return _sample_fast(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, on_batch=on_batch,
                        record_logps=record_logps, merge=merge, max_rows=max_rows, dtype=dtype)


def _sample_fast(model, tokenizer, prompts: Sequence[Sequence[dict]], *, num_samples: int, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int, batch_size: int,
                 on_batch: Callable[[int], None] | None, record_logps: bool, merge: bool, max_rows: int | None,
                 dtype: torch.dtype | None) -> list[list[Sample]]:
    """The fast engine on chat prompts (``_decode`` on the sampling copy); arguments as ``sample_responses``."""
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    min_new = int(getattr(getattr(model, "generation_config", None), "min_new_tokens", None) or 0)
    results: list[list[Sample] | None] = [None] * len(encoded)
    # longest first: a batch pads to prompts of similar length, and the largest batch comes first
    order = sorted(range(len(encoded)), key=lambda k: -len(encoded[k]))
    was_training = model.training
    model.eval()
    try:
        with sampling_model(model, merge, dtype) as work:
            device = next(work.parameters()).device
            on_done = _progress(tokenizer, results, batch_size, on_batch)
            _decode(work, encoded, order, capacity=_capacity(max_rows, batch_size, num_samples, device),
                    device=device, pad=pad, stops=stops, num_samples=num_samples, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new, temperature=temperature, top_p=top_p, seed=seed,
                    record_logps=record_logps, on_done=on_done)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _capacity(max_rows: int | None, batch_size: int, num_samples: int, device: torch.device) -> int:
    """Rows in flight at once: ``max_rows``, else a batch's rows and at least ``CPU_MIN_ROWS`` on a CPU."""
    capacity = max_rows or batch_size * num_samples
    if max_rows is None and device.type == "cpu":
        capacity = max(capacity, CPU_MIN_ROWS)
    return capacity


def _progress(tokenizer, results: list, batch_size: int,
              on_batch: Callable[[int], None] | None) -> Callable[[int, list], None]:
    """``_decode``'s ``on_done``: stores prompt k's samples in ``results[k]`` and reports progress every
    ``batch_size`` finished prompts and at the end, as the hf engine does per batch."""
    finished = 0

    def on_done(k: int, rows: list) -> None:
        nonlocal finished
        results[k] = [_to_sample(tokenizer, toks, trunc, lp) for toks, trunc, lp in rows]
        finished += 1
        if on_batch is not None and (finished % batch_size == 0 or finished == len(results)):
            on_batch(batch_size if finished % batch_size == 0 else finished % batch_size)

    return on_done


def _to_sample(tokenizer, toks: list[int], truncated: bool, logp: float | None) -> Sample:
    return Sample(tokenizer.decode(toks, skip_special_tokens=True).strip(), toks, len(toks), truncated, logp)


class _Rows:
    """The rows being decoded: their KV cache, attention mask, positions, last logits and bookkeeping."""

    def __init__(self) -> None:
        self.cache = None
        self.mask = self.pos = self.logits = None
        self.meta: list[tuple[int, int]] = []  # (prompt, sample) of each row
        self.step: list[int] = []  # tokens generated so far by each row

    def __len__(self) -> int:
        return len(self.meta)

    def add(self, cache, mask, pos, logits, meta) -> None:
        """Append rows (their own prefill): both caches are left-padded to the same length, then stacked."""
        if self.cache is None:
            self.cache, self.mask, self.pos, self.logits = cache, mask, pos, logits
        else:
            t_old, t_new = self.mask.shape[1], mask.shape[1]
            width = max(t_old, t_new)
            compat.append_cache_rows(self.cache, cache, lambda x: _left_pad(x, width))
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)], 0)
            self.pos = torch.cat([self.pos, pos], 0)
            self.logits = torch.cat([self.logits, logits], 0)
        self.meta += meta
        self.step += [0] * len(meta)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices); columns that are padding in every remaining row are dropped."""
        self.cache.batch_select_indices(rows)
        self.mask, self.pos, self.logits = self.mask[rows], self.pos[rows], self.logits[rows]
        keep = rows.tolist()
        self.meta = [self.meta[r] for r in keep]
        self.step = [self.step[r] for r in keep]
        used = self.mask.any(0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            compat.drop_cache_columns(self.cache, first)
            self.mask = self.mask[:, first:]


KV_ROOM = 16  # tokens of spare room a row's KV buffer gets whenever it is (re)allocated


def _kv_buffers(cache) -> None:
    """Let every layer of the transformers DynamicCache ``cache`` append a decoding step in place, with
    ``KV_ROOM`` spare positions per (re)allocation (``spa_lite.compat.grow_kv_in_place``, a class swap)."""
    compat.grow_kv_in_place(cache, KV_ROOM)


_GrowingLayer = compat.GrowingLayer  # the swapped-in layer class (tests look for it here)
_out_cache = compat.output_cache


def _left_pad(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    short = width - x.shape[dim]
    if short <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = short
    return torch.cat([x.new_zeros(shape), x], dim)


def _decode(model, encoded: list[list[int]], order: list[int], *, capacity: int, device, pad: int,
            stops: list[int], num_samples: int, max_new_tokens: int, min_new_tokens: int, temperature: float,
            top_p: float, seed: int, record_logps: bool, on_done: Callable[[int, list], None]) -> None:
    """Decode every prompt of ``order`` with at most ``capacity`` rows at once (continuous batching).

    Prompts enter in ``order`` (prefilled together, once for all of their samples) whenever a quarter of the
    rows are free; a row leaves as soon as it ends its turn or reaches ``max_new_tokens``. ``on_done(k,
    [(tokens, truncated, logp)] * num_samples)`` receives each prompt as its last sample ends.
    """
    from transformers import TopPLogitsWarper

    sampling = temperature > 0
    top_p_warper = TopPLogitsWarper(top_p) if sampling and top_p < 1.0 else None
    stop_t = torch.tensor(stops, device=device)
    cache_arg = compat.cache_argument(model)
    rows = _Rows()
    outs = _Outputs(num_samples, record_logps, on_done)
    queue = list(order)
    per_prompt = max(1, capacity // num_samples)
    while queue or len(rows):
        free = (capacity - len(rows)) // num_samples
        if queue and (not len(rows) or free >= max(1, per_prompt // 4)):
            take, queue = queue[:free], queue[free:]
            cache, mask, pos, logits = _prefill(model, [encoded[k] for k in take], pad=pad, device=device,
                                                num_samples=num_samples)
            meta = [(k, j) for k in take for j in range(num_samples)]
            outs.open(meta, seed=seed, max_new_tokens=max_new_tokens, sampling=sampling)
            rows.add(cache, mask, pos[:, -1], logits, meta)
            _kv_buffers(rows.cache)
        scores = rows.logits.float()
        steps = torch.tensor(rows.step, device=device)
        scores = _block_stops(scores, steps, stop_t, min_new_tokens)
        if sampling:
            nxt = _draw(scores, temperature, top_p_warper, outs.uniforms(rows), device)
        else:
            nxt = scores.argmax(-1)
        # the policy's own log-prob at temperature 1, before min-length, temperature and top-p
        lp = _token_logps(rows.logits, nxt) if record_logps else None
        stop = torch.isin(nxt, stop_t) & (steps >= min_new_tokens)
        full = steps + 1 >= max_new_tokens
        ended = (stop | full).cpu()
        outs.record(rows, nxt.cpu().tolist(), lp, ended, stop.cpu())
        if ended.all():
            rows = _Rows()
            continue
        _advance(model, rows, nxt, ended, device=device, cache_arg=cache_arg)


def _prefill(model, chunk: list[list[int]], *, pad: int, device, num_samples: int):
    """Prefill the prompts ``chunk`` together (left-padded); returns the cache, attention mask, positions and
    last logits of their rows, each prompt's repeated for its ``num_samples`` samples."""
    ids, mask = left_padded(chunk, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache, logits = _out_cache(out), out.logits[:, -1, :]
    if num_samples > 1:  # each sample starts from a copy of its prompt's cache
        cache.batch_repeat_interleave(num_samples)
        logits, mask, pos = (x.repeat_interleave(num_samples, 0) for x in (logits, mask, pos))
    return cache, mask, pos, logits


def _block_stops(scores: torch.Tensor, steps: torch.Tensor, stop_t: torch.Tensor, min_new_tokens: int) -> torch.Tensor:
    """``scores`` with the stop tokens at -inf in rows that have generated fewer than ``min_new_tokens``."""
    if min_new_tokens:
        early = steps < min_new_tokens
        if early.any():
            blocked = scores.index_fill(1, stop_t, float("-inf"))
            scores = torch.where(early[:, None], blocked, scores)
    return scores


def _draw(scores: torch.Tensor, temperature: float, top_p_warper, uniform: list[float], device) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with the row's own uniform draw (``uniform``), after
    temperature and top-p."""
    s = scores / temperature if temperature != 1.0 else scores
    if top_p_warper is not None:
        s = top_p_warper(None, s)
    probs = torch.softmax(s, dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.tensor(uniform, dtype=cdf.dtype, device=device)[:, None] * cdf[:, -1:]
    nxt = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    zero = probs.gather(1, nxt[:, None]).squeeze(1) <= 0  # never a token top-p removed, even at a float edge
    if zero.any():
        nxt[zero] = probs[zero].argmax(-1)
    return nxt


def _token_logps(logits: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[nxt] per row, as float64 on the CPU."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None]).squeeze(1).double().cpu()


def _advance(model, rows: _Rows, nxt: torch.Tensor, ended: torch.Tensor, *, device, cache_arg: str) -> None:
    """Drop the rows that ``ended``, then run one decoding step of the others on their new tokens ``nxt``."""
    if ended.any():
        rows.keep((~ended).nonzero().squeeze(1).to(device))
        nxt = nxt[~ended.to(device)]
    rows.mask = torch.cat([rows.mask, rows.mask.new_ones((rows.mask.shape[0], 1))], 1)
    rows.pos = rows.pos + 1
    out = model(input_ids=nxt[:, None], attention_mask=rows.mask, position_ids=rows.pos[:, None],
                use_cache=True, **{cache_arg: rows.cache})
    rows.cache, rows.logits = _out_cache(out), out.logits[:, -1, :]


class _Outputs:
    """What each row has produced (tokens, log-prob) and its random stream, until its prompt is done."""

    def __init__(self, num_samples: int, record_logps: bool, on_done: Callable[[int, list], None]) -> None:
        self.num_samples, self.record_logps, self.on_done = num_samples, record_logps, on_done
        self.tokens: dict[tuple[int, int], list[int]] = {}
        self.logp: dict[tuple[int, int], float] = {}
        self.uniform: dict[tuple[int, int], torch.Tensor] = {}
        self.pending: dict[int, dict] = {}  # prompt -> {sample: (tokens, truncated, logp)} of its ended rows

    def open(self, meta: list[tuple[int, int]], *, seed: int, max_new_tokens: int, sampling: bool) -> None:
        """Start rows ``meta`` ((prompt, sample) each); a sampled row draws its uniforms from its own stream."""
        for key in meta:
            self.tokens[key] = []
            self.logp[key] = 0.0
            if sampling:
                g = torch.Generator().manual_seed(_row_seed(seed, *key))
                self.uniform[key] = torch.rand(max_new_tokens, generator=g, dtype=torch.float64)

    def uniforms(self, rows: _Rows) -> list[float]:
        """Each row's uniform draw for its current step."""
        return [float(self.uniform[key][t]) for key, t in zip(rows.meta, rows.step, strict=True)]

    def record(self, rows: _Rows, nxt: list[int], lp: torch.Tensor | None, ended: torch.Tensor,
               stop: torch.Tensor) -> None:
        """Append each row's token ``nxt[r]`` (and log-prob), advance its step, and close the rows that ended."""
        for r, key in enumerate(rows.meta):
            self.tokens[key].append(nxt[r])
            if self.record_logps:
                self.logp[key] += float(lp[r])
            rows.step[r] += 1
            if ended[r]:
                self._close(key, truncated=not bool(stop[r]))  # truncated: no end of turn

    def _close(self, key: tuple[int, int], truncated: bool) -> None:
        k = key[0]
        done = self.pending.setdefault(k, {})
        done[key[1]] = (self.tokens.pop(key), truncated, self.logp.pop(key) if self.record_logps else None)
        self.uniform.pop(key, None)
        if len(done) == self.num_samples:
            self.on_done(k, [done[j] for j in range(self.num_samples)])
            del self.pending[k]


def _sample_hf(model, tokenizer, prompts: Sequence[Sequence[dict]], **kw) -> list[list[Sample]]:
    """The hf engine (``spa_lite.generation_hf.generate_hf``) on chat prompts; ``kw`` as ``sample_responses``."""
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    rows = generate_hf(model, [encode_prompt(tokenizer, p) for p in prompts], stops=stops, pad=pad, **kw)
    return [[_to_sample(tokenizer, *row) for row in per_prompt] for per_prompt in rows]
