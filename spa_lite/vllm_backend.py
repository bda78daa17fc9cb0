"""Optional vLLM generation backend for ``expand`` (``pip install 'spa-lite[vllm]'``).

The transformers backend (``spa_lite.generation.sample_responses``) samples from pi_{i-1} by switching the
stack's adapters on in place. vLLM serves ONE LoRA adapter per request over a base it loads itself, so the
policy pi_k = base + seed + iter1 + ... + iter{k} is first exported as one exact adapter with concatenated
ranks (``spa_lite.merge.export_single_adapter``, rank R = sum of the stacked ranks, scaling 1), and vLLM is
started with ``max_lora_rank >= R``::

    sampler = VLLMSampler(base_path, max_lora_rank=64)            # once per process; vLLM is imported here
    adapter = prepare_adapter(stack_or_recipe, k=i - 1, out_dir=...)  # pi_{i-1} as one adapter
    samples = sampler.sample(prompts, adapter, num_samples=2, max_new_tokens=300, temperature=0.7, seed=s)
    # -> list (one per prompt) of lists of spa_lite.generation.Sample, as sample_responses returns

Judging (Eq. 7) stays on the transformers stack: it needs log-probabilities of both the judge and the
reference policy, which the stack gives with one base in memory.

What differs from the transformers backend (read before comparing runs):

* **D_i is not byte-identical.** vLLM has its own sampler (its own RNG streams, top-p implementation, fused
  kernels, batch-dependent floating-point order, bf16/fp16 logits), so the same seed gives different
  responses than ``sample_responses``, and a vLLM run's D_i differs from a transformers run's. Within vLLM
  the draws are seeded per request: prompt j of a call gets seed ``seed + j * num_samples`` and vLLM gives
  its n-th sample ``seed + j * num_samples + n`` (V1 parallel sampling), so a shard's samples do not depend
  on which other shards ran, as in the transformers backend; vLLM itself only promises "mostly" repeatable
  seeded sampling (batch composition can flip near-ties).
* **Prompts are encoded by spa-lite**, not by vLLM: chat messages go through ``encode_prompt`` with
  spa-lite's tokenizer (same chat template, same fallback template) and are passed as token ids, and
  responses are decoded with the same tokenizer and rules (cut after the first stop token, special tokens
  skipped, stripped), so the prompt the judge scores is exactly the prompt that was sampled from.
* **A 4-bit base.** spa-lite trains and judges on a bitsandbytes NF4 base (QLoRA). vLLM cannot take that
  in-memory model; it loads the checkpoint itself. Two choices:

  - ``quantization="bitsandbytes"`` (the default here): vLLM quantizes the full-precision checkpoint in
    flight to 4 bits with bitsandbytes, so the sampled policy is a 4-bit base + pi_k's LoRA like the one that
    trains and judges, in ~1/4 of the memory. vLLM's kernels are not transformers' and its quantization
    settings are its own, so logits still differ in low bits. RECOMMENDED for runs that train on a 4-bit
    base, and the only option for a 7-8B model on a 16 GB card, where vLLM and the transformers stack share
    the GPU (bf16 weights alone would be ~15 GB).
  - ``quantization=None``: vLLM serves the base in ``dtype`` (bf16). Faster (no de-quantization in the
    matmuls) but the policy sampled from is base + LoRA, not NF4(base) + LoRA: it differs from the trained
    policy by the base's quantization error, slightly off-policy for SPA. Use it where memory allows and
    throughput matters more, or when the run itself trains on a full-precision base (``quantization: none``).

* **Memory.** vLLM pre-allocates ``gpu_memory_utilization`` of the GPU for weights and KV cache. In an
  ``expand`` that also holds the transformers stack for judging, keep it well below 1 (default 0.45) or
  sample all shards first and ``close()`` the sampler before judging. Set ``max_model_len`` to prompt +
  ``max_new_tokens`` for models with long contexts: vLLM otherwise reserves room for one full-context
  sequence at start-up.
* **Adapter rank.** vLLM accepts only a few ``max_lora_rank`` values (1, 8, 16, 32, 64, 128, 256, 320, 512
  in recent versions); ``vllm_lora_rank`` rounds up to one. R grows with k (three r=16 adapters: R = 48, so 64),
  so start the engine with the rank of the LAST policy it will serve, or start a new one.
* ``truncated`` is True when no stop token was produced within ``max_new_tokens`` (vLLM's
  ``finish_reason == "length"``); an EOS that is exactly the last allowed token counts as not truncated, as in
  the transformers backend.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig

from spa_lite.errors import SpaError
from spa_lite.generation import Sample, encode_prompt
from spa_lite.layout import policy_label
from spa_lite.merge import export_single_adapter
from spa_lite.models import load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'spa-lite[vllm]'"
# vLLM's LoRAConfig.max_lora_rank is a Literal of these values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Linear modules vLLM can carry LoRA on in Llama/Mistral-style models (it packs q/k/v and gate/up itself).
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def import_vllm():
    """Import vllm, or raise SpaError saying how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as e:  # also a broken install (a missing CUDA library raises ImportError too)
        raise SpaError(f"the vLLM generation backend needs the 'vllm' package ({e}): {INSTALL_HINT}") from None


def _lora_request_class():
    try:
        return importlib.import_module("vllm.lora.request").LoRARequest
    except ImportError as e:
        raise SpaError(f"vllm.lora.request.LoRARequest is not importable ({e}): {INSTALL_HINT}") from None


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of rank ``rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise SpaError(f"an adapter of rank {rank} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]}); "
                   "export a policy with fewer stacked adapters or lower ranks, or use the transformers backend")


def adapter_rank(adapter_dir: str | Path) -> int:
    """The LoRA rank r recorded in a peft adapter folder's adapter_config.json."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.exists():
        raise SpaError(f"{adapter_dir} is not a LoRA adapter folder (no adapter_config.json); "
                       "make one with spa_lite.vllm_backend.prepare_adapter")
    cfg = json.loads(path.read_text())
    ranks = [int(cfg.get("r", 0))] + [int(v) for v in (cfg.get("rank_pattern") or {}).values()]
    return max(ranks)


def prepare_adapter(stack_or_recipe, k: int, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Export pi_k (adapters seed..iter{k}) as the ONE LoRA adapter vLLM serves; see ``merge.export_single_adapter``.

    Args:
        stack_or_recipe: a loaded ``PolicyStack`` holding seed..iter{k} (left unchanged) or a ``Recipe`` (the
            run's saved adapters are loaded over its base).
        k: the policy index; expand for iteration i samples from pi_{i-1}, so k = i - 1.
        out_dir: written atomically (adapter_config.json, adapter_model.safetensors, spa_export.json).

    Returns:
        out_dir. Its rank is ``adapter_rank(out_dir)``; vLLM needs ``max_lora_rank >= vllm_lora_rank(rank)``.

    Raises:
        SpaError: from the export (DoRA, modules_to_save, ...), or if the adapter carries LoRA on modules
        vLLM does not serve (embeddings, lm_head).
    """
    out = export_single_adapter(stack_or_recipe, k, out_dir, base_model_name_or_path=base_model_name_or_path)
    cfg = json.loads((out / "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    foreign = sorted(set(targets) - VLLM_LORA_MODULES)
    if foreign:
        raise SpaError(f"{policy_label(k)}'s adapter has LoRA on {foreign}; vLLM serves LoRA on {sorted(VLLM_LORA_MODULES)} "
                       "only (use the transformers backend, or train with lora_target_modules: all-linear)")
    return out


def completion_to_sample(completion, tokenizer, stop_ids: Sequence[int]) -> Sample:
    """One vLLM ``CompletionOutput`` (``.token_ids``, ``.text``, ``.finish_reason``, ``.stop_reason``) as a Sample.

    The response is cut after its first stop token and decoded like ``sample_responses`` does. When vLLM
    reports a stop on a stop token that its ``token_ids`` leave out (``stop_reason`` = that id, or None for
    EOS), the token is appended, so ``token_ids`` ends with the end-of-turn token whenever one was produced:
    the judge scores the response as the policy produced it, EOS included.
    """
    stops = set(int(s) for s in stop_ids)
    toks = [int(t) for t in completion.token_ids]
    finish = getattr(completion, "finish_reason", None)
    if finish not in ("stop", "length"):
        raise SpaError(f"vLLM returned a response with finish_reason={finish!r} (aborted?); rerun the shard")
    if finish == "stop" and not any(t in stops for t in toks):
        reason = getattr(completion, "stop_reason", None)
        if isinstance(reason, int):
            toks.append(reason)
        elif reason is None and stops:  # stopped at EOS without reporting it among the tokens
            eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
            toks.append(int(eos) if eos in stops else min(stops))
        # a stop STRING (spa-lite sets none) leaves the tokens as they are
    end = next((i for i, t in enumerate(toks) if t in stops), None)
    resp = toks if end is None else toks[: end + 1]
    if tokenizer is not None:
        text = tokenizer.decode(resp, skip_special_tokens=True).strip()
    else:
        text = (completion.text or "").strip()
    return Sample(text, resp, len(resp), end is None)


def outputs_to_samples(outputs: Sequence, tokenizer, stop_ids: Sequence[int], num_samples: int) -> list[list[Sample]]:
    """vLLM ``RequestOutput``s (one per prompt, in prompt order) as lists of ``num_samples`` Samples.

    The n completions of a request are put in their sampling order (``CompletionOutput.index``): older vLLM
    versions returned them sorted by cumulative log-probability, which would make y1 the likelier response
    in every pair.
    """
    results = []
    for j, out in enumerate(outputs):
        comps = list(out.outputs)
        comps.sort(key=lambda c: getattr(c, "index", 0))
        if len(comps) == 1 and num_samples > 1:  # greedy: one request, repeated like num_return_sequences
            comps = comps * num_samples
        if len(comps) != num_samples:
            raise SpaError(f"vLLM returned {len(comps)} completions for prompt {j}, expected {num_samples}")
        results.append([completion_to_sample(c, tokenizer, stop_ids) for c in comps])
    return results


def _stop_ids_for(base_path: str, tokenizer) -> list[int]:
    """EOS of the tokenizer plus the model's generation_config eos ids (as ``generation.stop_token_ids``)."""
    ids = {tokenizer.eos_token_id}
    try:
        gen_eos = GenerationConfig.from_pretrained(base_path).eos_token_id
    except Exception:  # no generation_config.json: the tokenizer's EOS alone
        gen_eos = None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return sorted(int(i) for i in ids if i is not None)


def _resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    # as spa_lite.models.resolve_precision on CUDA; vLLM's own "auto" would take a float32 checkpoint's dtype
    return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float16"


class VLLMSampler:
    """Sampling from pi_init or an exported single adapter with vLLM; returns ``spa_lite.generation.Sample``s.

    Args:
        base_path: the base model (a local checkpoint folder, a hub id, or a bundled alias such as "smollm2").
            For a 4-bit run give the same full-precision checkpoint the run loads; see ``quantization``.
        max_lora_rank: rank of the largest adapter this engine will serve (rounded up to a value vLLM takes).
        dtype: "auto" (bf16 where supported, else fp16), "bfloat16", "float16" or "float32".
        gpu_memory_utilization: fraction of the GPU vLLM reserves for weights and KV cache.
        seed: the engine's seed (each request also gets its own seed in ``sample``).
        quantization: "bitsandbytes" (default: in-flight 4-bit, recommended for runs on a 4-bit base) or None
            (serve the base in ``dtype``); any other vLLM quantization name is passed through.
        max_model_len: longest prompt + response in tokens (None: the model's context length).
        tokenizer: spa-lite's tokenizer for the base (default: ``spa_lite.models.load_tokenizer(base_path)``).
        llm: an already built ``vllm.LLM`` (or a stand-in, in tests); skips building one.
        **llm_kwargs: passed to ``vllm.LLM`` (e.g. ``enforce_eager=True``, ``enable_prefix_caching=True``).
    """

    def __init__(self, base_path: str, max_lora_rank: int = 64, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.45, seed: int = 0, *, quantization: str | None = "bitsandbytes",
                 max_model_len: int | None = None, tokenizer=None, llm=None, **llm_kwargs):
        vllm = import_vllm()  # lazily: spa-lite works without vLLM; the error says how to get it

        self.base_path = resolve_model_path(base_path)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.base_path)
        self.max_lora_rank = vllm_lora_rank(max_lora_rank)
        self.stop_ids = _stop_ids_for(self.base_path, self.tokenizer)
        self._lora_ids: dict[tuple, int] = {}
        self._vllm = vllm
        if llm is None:
            kwargs = dict(model=self.base_path, tokenizer=self.base_path, enable_lora=True,
                          max_lora_rank=self.max_lora_rank, max_loras=1, dtype=_resolve_dtype(dtype),
                          gpu_memory_utilization=gpu_memory_utilization, seed=seed, trust_remote_code=False)
            if quantization:
                kwargs["quantization"] = quantization
            if max_model_len:
                kwargs["max_model_len"] = int(max_model_len)
            kwargs.update(llm_kwargs)
            llm = vllm.LLM(**kwargs)
        self.llm = llm

    @classmethod
    def from_recipe(cls, recipe, max_k: int, **kwargs) -> VLLMSampler:
        """An engine for a run's policies up to pi_{max_k}: its base, its precision, rank (max_k + 1) x lora_r."""
        m = recipe.model
        quant = m.quantization
        if quant == "auto":
            quant = "4bit" if torch.cuda.is_available() else "none"
        kwargs.setdefault("quantization", "bitsandbytes" if quant == "4bit" else None)
        kwargs.setdefault("dtype", m.dtype)
        kwargs.setdefault("seed", recipe.seed)
        # expand's prompts are not cut to max_prompt_length; leave room for the longest the recipe trains on
        kwargs.setdefault("max_model_len", max(m.max_length, m.max_prompt_length + recipe.expand.max_new_tokens))
        return cls(m.name_or_path, max_lora_rank=(max_k + 1) * m.lora_r, **kwargs)

    def lora_request(self, adapter_dir: str | Path | None):
        """A ``LoRARequest`` for an exported adapter (None: no adapter, i.e. pi_init).

        Each distinct adapter gets its own integer id; a folder re-exported in place (new file time or size) gets
        a new one, since vLLM caches adapters by id and would otherwise serve the old weights.
        """
        if adapter_dir is None:
            return None
        path = Path(adapter_dir).resolve()
        rank = adapter_rank(path)
        if rank > self.max_lora_rank:
            raise SpaError(f"adapter {path} has rank {rank} but this vLLM engine was started with max_lora_rank="
                           f"{self.max_lora_rank}; start one with max_lora_rank={vllm_lora_rank(rank)}")
        weights = path / "adapter_model.safetensors"
        st = weights.stat() if weights.exists() else None
        key = (str(path), st.st_mtime_ns if st else None, st.st_size if st else None)
        if key not in self._lora_ids:
            self._lora_ids[key] = len(self._lora_ids) + 1  # vLLM ids start at 1
        lid = self._lora_ids[key]
        return _lora_request_class()(f"spa-{path.name}-{lid}", lid, str(path))

    def encode(self, prompts: Sequence) -> list[list[int]]:
        """Token ids of each prompt: a list of ints is taken as it is, a list of chat messages is encoded."""
        out = []
        for p in prompts:
            p = list(p)
            if p and all(isinstance(t, int) for t in p):
                out.append([int(t) for t in p])
            elif p and all(isinstance(m, dict) for m in p):
                out.append(encode_prompt(self.tokenizer, p))
            else:
                raise SpaError("a prompt must be a non-empty list of token ids or of chat messages {role, content}")
        return out

    def sampling_params(self, j: int, num_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                        seed: int):
        greedy = temperature <= 0
        return self._vllm.SamplingParams(
            n=1 if greedy else num_samples,
            temperature=0.0 if greedy else float(temperature),
            top_p=1.0 if greedy else float(top_p),
            max_tokens=int(max_new_tokens),
            seed=int(seed) + j * num_samples,  # vLLM gives the n-th sample seed + n: no two draws share a seed
            stop_token_ids=list(self.stop_ids),
            skip_special_tokens=True,
        )

    def sample(self, prompts: Sequence, adapter_dir: str | Path | None = None, *, num_samples: int = 2,
               max_new_tokens: int = 300, temperature: float = 0.7, top_p: float = 1.0, seed: int = 0,
               use_tqdm: bool = False) -> list[list[Sample]]:
        """Sample ``num_samples`` responses per prompt from base + ``adapter_dir`` (None: pi_init).

        Args:
            prompts: token-id lists (as ``encode_prompt`` makes) or chat message lists.
            adapter_dir: an adapter made by ``prepare_adapter`` (pi_k), or None for the bare base.

        Returns:
            one list of ``num_samples`` Samples per prompt, in prompt order, like ``sample_responses``.
        """
        if not prompts:
            return []
        ids = self.encode(prompts)
        request = self.lora_request(adapter_dir)
        params = [self.sampling_params(j, num_samples, max_new_tokens, temperature, top_p, seed)
                  for j in range(len(ids))]
        inputs = [{"prompt_token_ids": x} for x in ids]  # vllm.inputs.TokensPrompt is this TypedDict
        outputs = self.llm.generate(inputs, params, lora_request=request, use_tqdm=use_tqdm)
        if len(outputs) != len(ids):
            raise SpaError(f"vLLM returned {len(outputs)} results for {len(ids)} prompts")
        return outputs_to_samples(outputs, self.tokenizer, self.stop_ids, num_samples)

    def as_sample_fn(self, adapter_dir: str | Path | None) -> Callable[..., list[list[Sample]]]:
        """A drop-in for ``sample_responses(model, tokenizer, prompts, ...)`` that samples with vLLM instead.

        ``model``, ``tokenizer`` and ``batch_size`` are accepted and ignored (vLLM batches by itself);
        ``on_batch`` is called once with the number of prompts.
        """
        def fn(model, tokenizer, prompts, *, num_samples=2, max_new_tokens=300, temperature=0.7, top_p=1.0, seed=0,
               batch_size=None, on_batch=None):
            out = self.sample(prompts, adapter_dir, num_samples=num_samples, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed)
            if on_batch is not None:
                on_batch(len(prompts))
            return out

        return fn

    def close(self) -> None:
        """Drop the engine and return its GPU memory (best effort: vLLM keeps some state per process)."""
        llm, self.llm = self.llm, None
        del llm
        try:
            dist = importlib.import_module("vllm.distributed.parallel_state")
            for name in ("destroy_model_parallel", "destroy_distributed_environment"):
                if hasattr(dist, name):
                    getattr(dist, name)()
        except Exception as e:  # a stand-in engine, or a vLLM without these helpers
            log.debug("vLLM teardown: %s", e)
        gc.collect()
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
