"""Batched sampling from whichever adapters are active on the model.

Two engines give the same interface (``sample_responses``):

* ``fast`` (default): spa-lite's own decoding loop. The frozen policy's active LoRA adapters are merged into
  a working copy of the base's linear layers (the base itself is untouched and every other tensor is shared),
  prompts run longest first in batches of similar length, each prompt is prefilled once for all of its
  samples, and a row leaves the batch (and its KV cache) as soon as it ends its turn. Each sequence draws
  from its own random stream, seeded by (seed, prompt index, sample index): its sample does not depend on
  the batch size, the order of the prompts or the other rows of its batch.
* ``hf``: ``transformers.GenerationMixin.generate`` on the (unmerged) stack, batches in file order, one seed
  per batch; the engine spa-lite used before, kept as the reference of bench/bench_generation.py and for
  models whose generation_config asks for logits processors the fast loop does not apply.

The two engines draw different (equally distributed) samples for the same seed; greedy decoding (temperature
0) gives the same tokens up to float rounding (merged vs unmerged weights, other batch shapes), which can
flip an argmax between two near-equal logits.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator, Sequence
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


def _is_plain_lora_linear(mod) -> bool:
    """A peft LoRA Linear over an ordinary nn.Linear, with no variant (DoRA) or bias among its adapters."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(mod, LoraLinear) or type(mod.get_base_layer()) is not torch.nn.Linear:
        return False
    return not getattr(mod, "lora_variant", None) and not any(getattr(mod, "lora_bias", {}).values())


def _can_merge(model) -> bool:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(_is_plain_lora_linear(m) for m in layers) and not getattr(model, "is_quantized", False)


@torch.no_grad()
def merged_copy(model):
    """A plain transformers model computing what the peft ``model`` computes with its active adapters.

    Every LoRA-wrapped linear layer of the copy holds W + sum_a scaling_a B_a A_a over the active adapters
    (W alone where adapters are disabled); every other tensor (embeddings, norms, rotary buffers, the
    linear layers no adapter targets) is shared with ``model``, not copied. The base is not modified.
    Returns None where merging does not apply (no LoRA layers, quantized or non-Linear bases, DoRA).
    """
    if not _can_merge(model):
        return None
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    memo = {id(t): t for t in list(inner.parameters()) + list(inner.buffers())}
    work = copy.deepcopy(inner, memo)  # module tree only: every tensor is in memo, so shared
    for name, mod in list(work.named_modules()):
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        lin = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        weight = base.weight
        active = [] if mod.disable_adapters else [a for a in mod.active_adapters if a in mod.lora_A]
        if active:
            weight = weight.detach().clone()
            for a in active:  # the same delta, in the same order, that peft's merge adds
                weight += mod.get_delta_weight(a).to(weight.dtype)
        lin.weight = torch.nn.Parameter(weight, requires_grad=False)
        if base.bias is not None:
            lin.bias = base.bias
        parent_name, _, attr = name.rpartition(".")
        setattr(work.get_submodule(parent_name) if parent_name else work, attr, lin)
    work.eval()
    return work


@contextlib.contextmanager
def sampling_model(model, merge: bool = True) -> Iterator[object]:
    """The model to decode with: ``merged_copy(model)`` when possible (and ``merge``), else ``model`` itself.

    The merged copy is dropped on exit; only its merged linear weights were new memory.
    """
    work = merged_copy(model) if merge else None
    try:
        yield model if work is None else work
    finally:
        del work


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
) -> list[list[Sample]]:
    """Sample ``num_samples`` responses per chat prompt (temperature 0: greedy), batched with left padding.

    Args:
        seed: fast engine: sequence j of prompt k draws from a stream seeded by (seed, k, j), so a resumed
            expand (which skips finished shards, each with its own seed) draws what an uninterrupted one would,
            whatever the batch size. hf engine: batch b is seeded with ``seed + b``.
        batch_size: prompts per batch (each with its ``num_samples`` sequences).
        on_batch: called with the number of prompts of each finished batch (progress bars).
        record_logps: also return each sample's log-probability under the sampling policy at temperature 1
            (``Sample.logp``), read off the sampling pass itself, so Eq. 7 needs no second forward of pi_{i-1}.
            Temperature and top-p are applied after it; the draws are the same as without recording.
        engine: "fast" (spa-lite's loop, merged adapters) or "hf" (transformers' generate); see the module
            docstring. "fast" falls back to "hf" when the model's generation_config asks for a logits
            processor it does not apply (``unsupported_settings``).
        merge: fast engine: decode with the active adapters merged into a working copy (``merged_copy``).

    Returns:
        one list of ``num_samples`` samples per prompt, in prompt order.
    """
    if engine not in ("fast", "hf"):
        raise ValueError(f"engine '{engine}' is not fast or hf")
    if engine == "hf" or unsupported_settings(model):
        return _sample_hf(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, on_batch=on_batch,
                          record_logps=record_logps)
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
        with sampling_model(model, merge) as work:
            device = next(work.parameters()).device
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                out = _decode_batch(work, [encoded[k] for k in idx], idx, device=device, pad=pad, stops=stops,
                                    num_samples=num_samples, max_new_tokens=max_new_tokens, min_new_tokens=min_new,
                                    temperature=temperature, top_p=top_p, seed=seed, record_logps=record_logps)
                for k, rows in zip(idx, out):
                    results[k] = [_to_sample(tokenizer, toks, trunc, lp) for toks, trunc, lp in rows]
                if on_batch is not None:
                    on_batch(len(idx))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _to_sample(tokenizer, toks: list[int], truncated: bool, logp: float | None) -> Sample:
    return Sample(tokenizer.decode(toks, skip_special_tokens=True).strip(), toks, len(toks), truncated, logp)


def _decode_batch(model, chunk: list[list[int]], prompt_index: list[int], *, device, pad: int, stops: list[int],
                  num_samples: int, max_new_tokens: int, min_new_tokens: int, temperature: float, top_p: float,
                  seed: int, record_logps: bool) -> list[list[tuple[list[int], bool, float | None]]]:
    """Decode one batch of prompts; per prompt, ``num_samples`` (tokens, truncated, logp) in sample order."""
    from transformers import TopPLogitsWarper

    n, width = len(chunk), max(len(x) for x in chunk)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, x in enumerate(chunk):
        ids[r, width - len(x) :] = torch.tensor(x)
        mask[r, width - len(x) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    # prefill each prompt once, then give each of its samples a copy of its cache
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    rows = n * num_samples
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, 0)
        mask = mask.repeat_interleave(num_samples, 0)
        pos = pos.repeat_interleave(num_samples, 0)
    sampling = temperature > 0
    uniforms = None
    if sampling:
        gens = [torch.Generator().manual_seed(_row_seed(seed, k, j)) for k in prompt_index for j in range(num_samples)]
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=g, dtype=torch.float64) for g in gens]).to(device)
    top_p_warper = TopPLogitsWarper(top_p) if sampling and top_p < 1.0 else None
    stop_t = torch.tensor(stops, device=device)
    alive = torch.arange(rows, device=device)  # original row of each row still in the batch
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long)
    logps = torch.zeros((rows, max_new_tokens), dtype=torch.float64) if record_logps else None
    length = torch.full((rows,), max_new_tokens, dtype=torch.long)
    ended = torch.zeros(rows, dtype=torch.bool)
    last_pos = pos[:, -1]
    for t in range(max_new_tokens):
        scores = logits.float()
        if t < min_new_tokens:
            scores = scores.index_fill(1, stop_t, float("-inf"))
        if sampling:
            s = scores / temperature if temperature != 1.0 else scores
            if top_p_warper is not None:
                s = top_p_warper(None, s)
            probs = torch.softmax(s, dim=-1)
            cdf = probs.cumsum(-1)
            u = uniforms[alive, t].to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
            # a token of zero probability (filtered by top-p) is never chosen, even at a float boundary
            zero = probs.gather(1, nxt[:, None]).squeeze(1) <= 0
            if zero.any():
                nxt[zero] = probs[zero].argmax(-1)
        else:
            nxt = scores.argmax(-1)
        cpu_alive = alive.cpu()
        tokens[cpu_alive, t] = nxt.cpu()
        if logps is not None:
            lp = torch.log_softmax(logits.float(), dim=-1).gather(1, nxt[:, None]).squeeze(1)
            logps[cpu_alive, t] = lp.double().cpu()
        stop = torch.isin(nxt, stop_t) if t >= min_new_tokens else torch.zeros_like(nxt, dtype=torch.bool)
        if stop.any():
            done = cpu_alive[stop.cpu()]
            length[done] = t + 1
            ended[done] = True
        if t == max_new_tokens - 1:
            break
        keep = ~stop
        if not keep.any():
            break
        if not keep.all():  # finished rows leave the batch and its cache
            kidx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(kidx)
            alive, nxt, mask, last_pos = alive[kidx], nxt[kidx], mask[kidx], last_pos[kidx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = out.logits[:, -1, :]
    res = []
    for r in range(n):
        per = []
        for j in range(num_samples):
            row = r * num_samples + j
            L = int(length[row])
            lp = float(logps[row, :L].sum()) if logps is not None else None
            per.append((tokens[row, :L].tolist(), not bool(ended[row]), lp))
        res.append(per)
    return res


@torch.no_grad()
def _sample_hf(
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
    """The hf engine: transformers' generate on the stack, batches in prompt order, batch b seeded with seed + b."""
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
