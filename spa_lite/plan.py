"""A memory planner for spa-lite's stages on one accelerator: estimate the peak, and find settings that fit.

Everything here is an ESTIMATE from the model's config, not a measurement. It counts the tensors spa-lite's
code keeps alive at its peak (weights, adapters, AdamW states, the tensors autograd saves for the backward
pass, the logits of ``spa_lite.training.pair_loss``, the KV cache of generation) and adds a fixed runtime
overhead. What it does not see: allocator fragmentation and caching (the PyTorch CUDA caching allocator
usually holds 5-20% more than is live), CUDA context and kernels (~0.5-1 GiB, ``runtime_overhead_gb``),
temporary buffers inside fused kernels, bitsandbytes' de-quantization scratch, and padding (rows are padded
to the longest in a batch; ``seq_len`` is taken as that length, so ``max_length`` is the worst case).
``tests/test_plan.py`` compares the model-dependent part with measured CPU peaks (float32): see there for
the tolerance that holds.

Formulae (T = tokens in a forward pass = rows x seq_len; b = compute dtype bytes; c = 4 if b < 4 else 0,
the float32 copy peft makes of a layer's input for float32 LoRA weights; h hidden, q = heads x head_dim,
I intermediate, a heads, s seq_len, V vocab, n LoRA targets per layer, r rank):

* base weights: linear weights of the decoder x (b, or 0.5 + 1/64 + 4/(64*256) bytes for NF4 with double
  quantization, block 64); embeddings, lm_head (unless tied) and norms stay in b.
* each LoRA adapter: r * (in + out) per target module, float32 (peft up-casts half-precision adapters);
  the trainable one needs 16 bytes per parameter (weight, grad, AdamW exp_avg and exp_avg_sq, all fp32).
* saved activations per decoder layer and token, LoRA on all linear layers of a Llama-style block
  (SwiGLU MLP, RMSNorm, no dropout, SDPA attention). This is Korthikanti et al. 2022 (``sbh(34 + 5as/h)``
  bytes per layer for 16-bit activations) re-derived for LoRA: a frozen linear saves nothing for its own
  backward, but its LoRA A saves the input (and its fp32 copy when c > 0); there is no dropout mask;
  a gated MLP of width I replaces the 4h GELU MLP:
      attention: 4h (RMSNorm's fp32 input) + (b + 3c) h + (4b + c) q + 4a  [+ b a s with the "math" kernel]
      MLP:       4h + (b + 2c) h + (4b + c) I
      LoRA:      4 r n
  With gradient checkpointing: b h per layer and token (the layer inputs) plus one layer's activations
  (recomputed during the backward pass).
* logits, per token of the batch, the largest of three moments of a training step:
      end of forward:    reference b V + policy b V + its fp32 copy c V (``token_logps`` up-casts)
                         [+ DND (Eq. 12), one row at a time: (8 + c) s V, not a third [2B, L, V] tensor]
      start of backward: (2b + c + 4) V: policy logits, fp32 copy, the fp32 gradient and the gradient of the
                         half-precision logits (``pair_loss`` has dropped the reference logits by then)
      reference forward: (b + c + 4) V (logits, fp32 copy, log-softmax temporaries).
  Measured on CPU in float32 (b = 4, c = 0) the logits cost 3.0 x 4 T V bytes, which is 12 T V: the backward
  term; the half-precision terms are derived, not measured.
  With an affine LM head (the default path) no [T, V] logits exist: the chunked log-prob kernel that runs holds
  one tile of the R scored positions (``kernel_tile_bytes``): TRL's, up to 4096 rows x 8192 vocabulary entries
  x (b + 16) bytes; spa_lite's torch kernel, up to 2^24 logits in whole rows x 12 bytes (measured for float32
  in tests/test_plan.py).
* generation (expand): KV cache 2 x layers x kv_heads x head_dim x b per token for
  batch x num_samples rows of (prompt + new tokens), the prefill's transient activations of one layer and
  last-token logits; judging (Eq. 7) is a no-grad forward over 2 x judge_batch rows with (b + c + 4) V per
  token for the logits and the log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights, fp8 absmax per 64, fp32 absmax per 256 blocks
#: Base-weight quantizations the planner (and spa_lite.models.resolve_precision) know.
QUANTIZATIONS = ("4bit", "none")


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated: bool

    @classmethod
    def from_config(cls, cfg) -> Dims:
        h = int(cfg.hidden_size)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or h // heads)
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * h)
        gated = getattr(cfg, "model_type", "llama") not in {"gpt2", "gpt_neox", "opt", "phi", "falcon", "bloom"}
        return cls(h, int(cfg.num_hidden_layers), heads, kv, hd, inter, int(cfg.vocab_size),
                   bool(getattr(cfg, "tie_word_embeddings", False)), gated)

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the linear layers of one decoder block (all-linear LoRA targets)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden)]
        mlp = [(self.hidden, self.intermediate)] * (2 if self.gated else 1) + [(self.intermediate, self.hidden)]
        return attn + mlp

    def decoder_linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes())

    def other_params(self) -> int:
        emb = self.vocab * self.hidden
        return emb * (1 if self.tied else 2) + self.hidden * (2 * self.layers + 1)

    def lora_params(self, r: int) -> int:
        return self.layers * sum(r * (i + o) for i, o in self.linear_shapes())


#: The chunked log-prob kernels ``spa_lite.logps.logprob_kernel()`` names; None is the full-logits path.
LOGPROB_KERNELS = ("trl", "torch")


def kernel_tile_bytes(kernel: str, rows: int, vocab: int, dtype_bytes: int) -> int:
    """Peak bytes of a chunked log-prob kernel's tile when it scores ``rows`` positions over ``vocab`` tokens.

    "trl" (``trl.kernels.ChunkedLogProbFunction``): up to 4096 rows x 8192 vocabulary entries, the matmul tile and
    four fp32 temporaries. "torch" (``spa_lite.logps.chunked_target_logps``): whole vocabulary rows, as many as
    fit 2^24 logits, three fp32 buffers of them at the backward's peak: the previous chunk's gradient (still
    referenced while the next chunk is computed), the chunk's fp32 logits and logsumexp's temporary (a half-
    precision chunk's own logits, b bytes, are freed once copied to fp32).
    """
    if kernel == "trl":
        return min(rows, 4096) * min(8192, vocab) * (dtype_bytes + 16)
    if kernel == "torch":
        return min(rows, max(1, 2**24 // vocab)) * vocab * 12
    raise ValueError(f"logprob_kernel must be one of {', '.join(LOGPROB_KERNELS)} or None, got {kernel!r}")


def activation_bytes_per_token_layer(d: Dims, dtype_bytes: int, lora_r: int, seq_len: int,
                                     attention: str = "flash") -> float:
    """Bytes autograd keeps per token and decoder layer for LoRA training (see the module docstring)."""
    b, c = dtype_bytes, (4 if dtype_bytes < 4 else 0)
    h, q, inter = d.hidden, d.heads * d.head_dim, d.intermediate
    attn = 4 * h + (b + 3 * c) * h + (4 * b + c) * q + 4 * d.heads
    if attention == "math":
        attn += b * d.heads * seq_len
    n_up = 2 if d.gated else 1
    # saved per token: gate (and up) outputs, the activation's output and the product feeding down_proj's LoRA A
    mlp = 4 * h + (b + n_up * c) * h + (2 * n_up * b + c) * inter
    return attn + mlp + 4 * lora_r * len(d.linear_shapes())


def plan_memory(
    model_config,
    gpu_mem_gb: float,
    quantization: str = "4bit",
    dtype_bytes: int = 2,
    lora_r: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    gradient_checkpointing: bool = False,
    dnd: bool = True,
    *,
    iteration: int = 1,
    lam: float = 0.5,
    attention: str = "flash",
    gen_batch_size: int = 16,
    num_samples: int = 2,
    prompt_len: int = 256,
    max_new_tokens: int = 300,
    judge_batch_size: int = 8,
    runtime_overhead_gb: float = 0.75,
    logprob_kernel: str | None = "trl",
    fsdp_shards: int = 1,
) -> dict:
    """Estimate the peak memory of each stage (GiB) and whether it fits in ``gpu_mem_gb``.

    Args:
        model_config: a transformers ``PretrainedConfig`` (Llama-style fields; others are approximated).
        quantization: "4bit" (NF4 base, QLoRA) or "none".
        dtype_bytes: compute dtype size (2 for bf16/fp16, 4 for fp32).
        seq_len: tokens per padded row (prompt + response; ``model.max_length`` is the worst case).
        batch_size: preference PAIRS per micro-batch (2 x batch_size rows per forward).
        iteration: SPA iteration i for the ``train`` stage (i frozen adapters below the trainable one).
        attention: "flash" (fused SDPA kernels, no s^2 buffer) or "math" (scores materialised).
        runtime_overhead_gb: CUDA context, kernels and allocator slack, added to every stage.
        logprob_kernel: the chunked log-prob kernel that runs (``spa_lite.logps.logprob_kernel()``: "trl" or
            "torch") on spa-lite's default path for models with an affine LM head (``logps.fused_head``):
            log-probs come from hidden states, so instead of [T, V] logits only the kernel's tile
            (``kernel_tile_bytes``) and three [R, H] fp32 hidden-state copies of the R scored (response)
            positions are alive; R per row is ``seq_len - prompt_len`` (the length budget left after the
            prompt; ``seq_len // 2`` when ``prompt_len >= seq_len``). None: the full-logits path (a head that
            is not affine).
        fsdp_shards: processes the training stages shard over (FSDP2, ``spa_lite.fsdp``): base weights,
            adapters and optimizer state per process are 1/N, plus two gathered decoder layers (the one
            computing and the next being all-gathered); sharded training uses the logits path.
            ``expand`` does not shard.

    Returns:
        {"stages": {"seed_dpo"|"train"|"expand": {"parts": {name: GiB}, "peak_gb", "fits"}},
         "peak_gb", "fits", "gpu_mem_gb", "inputs"}. Parts are estimates; see the module docstring.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be '4bit' or 'none', got {quantization!r}")
    if logprob_kernel is not None and logprob_kernel not in LOGPROB_KERNELS:
        raise ValueError(f"logprob_kernel must be one of {', '.join(LOGPROB_KERNELS)} or None, got {logprob_kernel!r}")
    s = _Setup(Dims.from_config(model_config), quantization=quantization, b=dtype_bytes, lora_r=lora_r,
               seq_len=seq_len, batch_size=batch_size, gradient_checkpointing=gradient_checkpointing, dnd=dnd,
               iteration=iteration, attention=attention, gen_batch_size=gen_batch_size, num_samples=num_samples,
               prompt_len=prompt_len, max_new_tokens=max_new_tokens, judge_batch_size=judge_batch_size,
               overhead=runtime_overhead_gb, logprob_kernel=logprob_kernel, fsdp_shards=fsdp_shards)
    stages = {
        "seed_dpo": _train_parts(s, 0, False),
        "train": _train_parts(s, iteration, dnd),
        "expand": _expand_parts(s, iteration),
    }
    out = {}
    for name, parts in stages.items():
        peak = sum(parts.values())
        out[name] = {"parts": {k: round(v, 4) for k, v in parts.items()}, "peak_gb": round(peak, 3),
                     "fits": peak <= gpu_mem_gb}
    peak = max(v["peak_gb"] for v in out.values())
    return {
        "stages": out, "peak_gb": peak, "fits": peak <= gpu_mem_gb, "gpu_mem_gb": gpu_mem_gb, "inputs": s.inputs(),
        "params": {"base": s.d.decoder_linear_params() + s.d.other_params(), "lora_per_adapter": s.lora},
    }


@dataclass(frozen=True)
class _Setup:
    """What every stage's estimate shares: the model's dimensions and the settings planned for."""

    d: Dims
    quantization: str
    b: int  # compute dtype bytes
    lora_r: int
    seq_len: int
    batch_size: int
    gradient_checkpointing: bool
    dnd: bool
    iteration: int
    attention: str
    gen_batch_size: int
    num_samples: int
    prompt_len: int
    max_new_tokens: int
    judge_batch_size: int
    overhead: float  # GiB added to every stage
    logprob_kernel: str | None
    fsdp_shards: int

    def __post_init__(self) -> None:
        if self.fsdp_shards < 1:
            raise ValueError(f"fsdp_shards must be >= 1, got {self.fsdp_shards}")

    @property
    def c(self) -> int:
        """Bytes of the float32 copy peft makes of a half-precision layer input (0 in float32)."""
        return 4 if self.b < 4 else 0

    @property
    def wbytes(self) -> float:
        """Bytes per decoder linear weight."""
        return NF4_BYTES if self.quantization == "4bit" else self.b

    @property
    def weights(self) -> float:
        """The base's weights, GiB."""
        d = self.d
        return (d.decoder_linear_params() * self.wbytes + d.other_params() * self.b) * (1 / GIB)

    @property
    def lora(self) -> int:
        """Parameters of one adapter."""
        return self.d.lora_params(self.lora_r)

    @property
    def shard(self) -> float:
        return 1 / self.fsdp_shards

    @property
    def layer_gathered(self) -> float:
        """GiB of the two whole decoder layers a sharded process holds (the one computing, the next gathered)."""
        if self.fsdp_shards <= 1:
            return 0.0
        return 2 * (self.d.decoder_linear_params() / max(self.d.layers, 1)) * self.wbytes * (1 / GIB)

    def inputs(self) -> dict:
        """The settings, as ``plan_memory`` reports them."""
        return dict(quantization=self.quantization, dtype_bytes=self.b, lora_r=self.lora_r, seq_len=self.seq_len,
                    batch_size=self.batch_size, gradient_checkpointing=self.gradient_checkpointing, dnd=self.dnd,
                    iteration=self.iteration, attention=self.attention, gen_batch_size=self.gen_batch_size,
                    num_samples=self.num_samples, prompt_len=self.prompt_len, max_new_tokens=self.max_new_tokens,
                    judge_batch_size=self.judge_batch_size, fsdp_shards=self.fsdp_shards,
                    logprob_kernel=self.logprob_kernel)


def _train_parts(s: _Setup, n_frozen: int, with_dnd: bool) -> dict:
    """GiB per part at the peak of a DPO step with ``n_frozen`` adapters below the trainable one."""
    g = 1 / GIB
    rows = 2 * s.batch_size
    T = rows * s.seq_len
    return {
        "base_weights": s.weights * s.shard + s.layer_gathered,
        "frozen_adapters": n_frozen * s.lora * 4 * g * s.shard,
        "trainable_adapter_and_adamw": s.lora * 16 * g * s.shard,
        "activations": _saved_activation_bytes(s, rows, T) * g,
        "logits": _logits_bytes(s, rows, T, with_dnd) * g,
        "runtime_overhead": s.overhead,
    }


def _saved_activation_bytes(s: _Setup, rows: int, T: int) -> float:
    """Bytes autograd keeps for the backward pass of ``rows`` rows, ``T`` tokens in all."""
    d, b = s.d, s.b
    per_layer = activation_bytes_per_token_layer(d, b, s.lora_r, s.seq_len, s.attention)
    if s.gradient_checkpointing:
        acts = T * (d.layers * b * d.hidden + per_layer)
    else:
        acts = T * d.layers * per_layer
    acts += T * (4 * d.hidden + b * d.hidden)  # final norm
    acts += rows * s.seq_len * s.seq_len * b  # 4-D attention mask shared by the layers
    return acts


def _logits_bytes(s: _Setup, rows: int, T: int, with_dnd: bool) -> float:
    """Bytes of the log-prob computation at its largest moment of a step (see the module docstring)."""
    b, c, V = s.b, s.c, s.d.vocab
    if s.logprob_kernel is not None and s.fsdp_shards == 1:
        # the fused kernel projects only scored (response) positions: the length budget left after the prompt
        R = rows * (s.seq_len - s.prompt_len if 0 < s.prompt_len < s.seq_len else s.seq_len // 2)
        return kernel_tile_bytes(s.logprob_kernel, R, V, b) + R * s.d.hidden * 4 * (3 if with_dnd else 2)
    forward_end = T * V * (b + b + c) + ((2 * 4 + c) * s.seq_len * V if with_dnd else 0)
    backward_start = T * V * (2 * b + c + 4)  # policy logits, fp32 copy, their grads (ref logits freed)
    ref_phase = T * V * (b + c + 4)
    return max(forward_end, backward_start, ref_phase)


def _expand_parts(s: _Setup, n_frozen: int) -> dict:
    """GiB per part at the peak of expand: generation's KV cache or judging's logits, whichever is larger."""
    d, b, c, g = s.d, s.b, s.c, 1 / GIB
    rows = s.gen_batch_size * s.num_samples
    total = s.prompt_len + s.max_new_tokens
    kv = 2 * d.layers * d.kv_heads * d.head_dim * b * rows * total
    prefill = rows * s.prompt_len * (b * (2 * d.hidden + 2 * d.heads * d.head_dim + 3 * d.intermediate)
                                     + (b * d.heads * s.prompt_len if s.attention == "math" else 0))
    gen_peak = kv + prefill + rows * d.vocab * 4 * 3
    jT = 2 * s.judge_batch_size * total
    head = kernel_tile_bytes(s.logprob_kernel, jT, d.vocab, b) if s.logprob_kernel else jT * d.vocab * (b + c + 4)
    judge_peak = head + jT * b * (2 * d.hidden + d.intermediate)
    return {
        "base_weights": s.weights,
        "frozen_adapters": n_frozen * s.lora * 4 * g,
        "kv_cache_or_judge": max(gen_peak, judge_peak) * g,
        "runtime_overhead": s.overhead,
    }


def _divisors_desc(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def fit(
    model_config,
    gpu_mem_gb: float,
    quantization: str = "4bit",
    dtype_bytes: int = 2,
    lora_r: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    grad_accum: int = 8,
    gradient_checkpointing: bool = False,
    dnd: bool = True,
    *,
    min_seq_len: int = 128,
    headroom: float = 0.9,
    **plan_kwargs,
) -> dict:
    """Find micro-batch / grad accumulation / checkpointing / sequence length that fit in ``gpu_mem_gb``.

    The effective batch ``batch_size * grad_accum`` (pairs per optimizer step) is kept: only divisors of it are
    tried as micro-batch sizes, so the optimisation is unchanged. Search order (first that fits wins):
    the given settings; smaller micro-batches without checkpointing; checkpointing with micro-batches from
    the given one down; then ``seq_len`` halved (not below ``min_seq_len``; longer pairs would be skipped,
    which changes the data) with checkpointing and micro-batch 1 upwards. Generation batches are halved
    separately until the expand stage fits. ``headroom`` keeps a fraction of the memory free for what the
    estimate misses.

    Returns:
        {"fits": bool, "batch_size", "grad_accum", "gradient_checkpointing", "seq_len", "gen_batch_size",
         "judge_batch_size", "effective_batch", "changed": [...], "plan": plan_memory(...) of the choice}
    """
    budget = gpu_mem_gb * headroom
    eff = batch_size * grad_accum

    def train_peak(bs, ckpt, L, **kw) -> float:
        p = plan_memory(model_config, gpu_mem_gb, quantization, dtype_bytes, lora_r, L, bs, ckpt, dnd,
                        **{**plan_kwargs, **kw})
        return max(p["stages"]["seed_dpo"]["peak_gb"], p["stages"]["train"]["peak_gb"])

    candidates = [(batch_size, gradient_checkpointing, seq_len)]
    candidates += [(bs, gradient_checkpointing, seq_len) for bs in _divisors_desc(eff) if bs < batch_size]
    candidates += [(bs, True, seq_len) for bs in _divisors_desc(eff) if bs <= batch_size]
    L = seq_len // 2
    while L >= min_seq_len:
        candidates += [(bs, True, L) for bs in _divisors_desc(eff) if bs <= batch_size]
        L //= 2
    choice = None
    for bs, ckpt, L in candidates:
        if train_peak(bs, ckpt, L) <= budget:
            choice = (bs, ckpt, L)
            break
    fits = choice is not None
    bs, ckpt, L = choice or (1, True, max(min_seq_len, 1))

    gen_bs = plan_kwargs.pop("gen_batch_size", 16)
    judge_bs = plan_kwargs.pop("judge_batch_size", 8)

    def expand_peak(gb, jb):
        p = plan_memory(model_config, gpu_mem_gb, quantization, dtype_bytes, lora_r, L, bs, ckpt, dnd,
                        gen_batch_size=gb, judge_batch_size=jb, **plan_kwargs)
        return p["stages"]["expand"]["peak_gb"]

    while expand_peak(gen_bs, judge_bs) > budget and (gen_bs > 1 or judge_bs > 1):
        gen_bs, judge_bs = max(1, gen_bs // 2), max(1, judge_bs // 2)
    fits = fits and expand_peak(gen_bs, judge_bs) <= budget
    plan = plan_memory(model_config, gpu_mem_gb, quantization, dtype_bytes, lora_r, L, bs, ckpt, dnd,
                       gen_batch_size=gen_bs, judge_batch_size=judge_bs, **plan_kwargs)
    changed = []
    if bs != batch_size:
        changed.append(f"batch_size {batch_size} -> {bs}, grad_accum {grad_accum} -> {eff // bs}")
    if ckpt != gradient_checkpointing:
        changed.append("gradient_checkpointing on")
    if L != seq_len:
        changed.append(f"seq_len {seq_len} -> {L} (longer pairs are skipped)")
    return {
        "fits": fits, "batch_size": bs, "grad_accum": eff // bs, "gradient_checkpointing": ckpt, "seq_len": L,
        "gen_batch_size": gen_bs, "judge_batch_size": judge_bs, "effective_batch": eff, "changed": changed,
        "budget_gb": round(budget, 3), "plan": plan,
    }
