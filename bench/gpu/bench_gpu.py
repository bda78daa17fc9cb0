"""GPU benchmark of one SPA iteration on real model shapes: does a 4-bit SPA iteration at 1024 tokens fit a 16 GB card?

No weights can be downloaded on the benchmark machine, so the models are RANDOMLY initialised with the exact
shapes of Mistral-7B and Llama-3-8B (configs below), saved once as bf16 safetensors (with a generated
word-level tokenizer of the same vocabulary size) and loaded back through ``spa_lite.models.load_base_model``
with bitsandbytes 4-bit NF4 quantization, as a run would load them. Random weights give the same memory and the
same FLOPs as trained ones; only the text is meaningless.

Measured, on CUDA (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after a peak reset):

* **train**: ``spa_lite.training.run_dpo_loop`` for ``--steps`` optimizer steps of an SPA iteration (pi_ref = the
  frozen ``seed`` adapter, i.e. iteration 1; trainable ``iter1``; self-refinement (Eq. 10) and DND (Eq. 11-12,
  lambda 0.5) on from step 0), for every sequence length x pairs per micro-batch x gradient checkpointing off/on.
  Step time = median over the steps after the first (the first is reported apart: kernel selection, caches).
* **judge**: ``spa_lite.judge.judge_logprob`` (Eq. 7, judge = seed, reference = pi_init) in pairs/s.
* **generate**: ``spa_lite.generation.sample_responses`` with the seed adapter on, batched, every sequence forced
  to ``--gen-new-tokens`` tokens (generation_config.min_new_tokens), in generated tokens/s.
* each is compared with ``spa_lite.plan.plan_memory``'s estimate of the same setting (the planner's
  ``runtime_overhead_gb`` is CUDA context + allocator slack, which max_memory_allocated does not see; the
  comparison uses the planner's total minus that overhead, and the fit verdict uses the measured reserved peak
  plus the measured CUDA context).

``--dry-run`` runs every code path on the CPU with a scaled-down config (2 layers, hidden 256, float32, no
quantization): a test of the script, not a measurement (memory columns are empty).

    python bench/gpu/bench_gpu.py --model mistral-7b          # on a CUDA machine; see bench/gpu/README.md
    python bench/gpu/bench_gpu.py --model all --dry-run       # anywhere, ~1 min on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("SPA_LITE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GIB = 1024 ** 3

# Real shapes (the public config.json files of mistralai/Mistral-7B-v0.1 and meta-llama/Meta-Llama-3-8B).
MODELS = {
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                       max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, sliding_window=None),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False),
}
# --dry-run: the same architecture, scaled down (the vocabulary too, so a CPU step takes a second).
DRY = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=512, vocab_size=2048, max_position_embeddings=2048)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant", "system"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' </s> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant ' }}{% endif %}")


# --------------------------------------------------------------------------------------------- models


def model_config(name: str, dry_run: bool):
    from transformers import LlamaConfig, MistralConfig

    spec = dict(MODELS[name])
    kind = spec.pop("model_type")
    if dry_run:
        spec.update(DRY)
    spec.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return (MistralConfig if kind == "mistral" else LlamaConfig)(**spec)


def build_tokenizer(vocab_size: int, out: Path):
    """A word-level tokenizer with exactly ``vocab_size`` ids ('w4' ... ), so every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def build_model_dir(name: str, dry_run: bool, work: Path, device: str) -> Path:
    """Random weights of the real shapes, saved once (bf16 safetensors; float32 in a dry run)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = work / (f"{name}-dry" if dry_run else name)
    if (out / "READY").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(name, dry_run)
    dtype = torch.float32 if dry_run else torch.bfloat16
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7-8B parameters is fast on the GPU, minutes on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(cfg.vocab_size, out)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    (out / "READY").write_text(f"built in {time.perf_counter() - t0:.1f}s\n")
    print(f"built {out} in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


# --------------------------------------------------------------------------------------------- memory


class Mem:
    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def now_gib(self):
        return round(self.torch.cuda.memory_allocated() / GIB, 3) if self.cuda else None

    def peak(self) -> dict:
        if not self.cuda:
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        self.sync()
        return {"peak_allocated_gib": round(self.torch.cuda.max_memory_allocated() / GIB, 3),
                "peak_reserved_gib": round(self.torch.cuda.max_memory_reserved() / GIB, 3)}

    def context_gib(self):
        """Device memory in use that the caching allocator does not hold: the CUDA context and libraries."""
        if not self.cuda:
            return None
        free, total = self.torch.cuda.mem_get_info()
        return round((total - free - self.torch.cuda.memory_reserved()) / GIB, 3)


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


# --------------------------------------------------------------------------------------------- stack


def make_stack(model_dir: Path, args, work: Path):
    """pi_0 = base + a frozen random 'seed' adapter (saved and reloaded as a run does) + trainable 'iter1'."""
    import torch

    from spa_lite.models import load_base_model
    from spa_lite.stack import LoraSettings, build_stack, save_adapter

    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r)
    base, tok = load_base_model(str(model_dir), quantization=args.quantization, dtype=args.dtype, device=args.device)
    first = build_stack(base, tok, (), trainable="seed", lora=lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in first.model.named_parameters():
            if "lora_B" in n and ".seed." in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype))
    seed_dir = save_adapter(first.model, "seed", work / "adapters" / f"{model_dir.name}-r{args.lora_r}")
    base = first.model.unload()  # the bare base again (LoRA layers replaced by their base layers)
    torch.manual_seed(2)
    stack = build_stack(base, tok, [("seed", seed_dir)], trainable="iter1", lora=lora)
    return stack, tok


def set_checkpointing(stack, on: bool) -> None:
    """What load_base_model(gradient_checkpointing=True) does, toggled on the loaded model."""
    m = stack.model.get_base_model()
    if on:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    else:
        m.gradient_checkpointing_disable()
        if hasattr(m, "_require_grads_hook"):
            m.disable_input_require_grads()


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(len(SPECIAL), vocab) for _ in range(n)]


def random_pairs(n: int, seq_len: int, vocab: int, seed: int):
    """Pairs of exactly seq_len tokens (prompt = seq_len / 4; responses end with EOS), so no padding."""
    from spa_lite.logps import TokenizedPair

    rng = random.Random(seed)
    p_len = seq_len // 4
    r_len = seq_len - p_len
    return [TokenizedPair(random_ids(rng, p_len, vocab), random_ids(rng, r_len - 1, vocab) + [2],
                          random_ids(rng, r_len - 1, vocab) + [2], {"row": i}) for i in range(n)]


# --------------------------------------------------------------------------------------------- measurements


def plan_for(cfg, args, **kw) -> dict:
    from spa_lite.plan import plan_memory

    return plan_memory(cfg, args.card_gib, quantization="4bit" if args.quantization == "4bit" else "none",
                       dtype_bytes=4 if args.dtype == "float32" else 2, lora_r=args.lora_r, dnd=True, iteration=1,
                       lam=0.5, num_samples=2, **kw)


def measure_train(stack, cfg, args, mem: Mem, seq_len: int, pairs_per_step: int, ckpt: bool) -> dict:
    from spa_lite.training import LoopSpec, run_dpo_loop

    row = {"seq_len": seq_len, "pairs": pairs_per_step, "grad_ckpt": ckpt}
    plan = plan_for(cfg, args, seq_len=seq_len, batch_size=pairs_per_step, gradient_checkpointing=ckpt)
    st = plan["stages"]["train"]
    overhead = plan["stages"]["train"]["parts"]["runtime_overhead"]
    row.update(plan_peak_gib=st["peak_gb"], plan_model_gib=round(st["peak_gb"] - overhead, 3),
               plan_parts=st["parts"])
    set_checkpointing(stack, ckpt)
    pairs = random_pairs(pairs_per_step * args.steps, seq_len, cfg.vocab_size, seed=seq_len + pairs_per_step)
    spec = LoopSpec(lr=1e-4, epochs=1.0, batch_size=pairs_per_step, grad_accum=1, beta=0.1, seed=0, ref=["seed"],
                    refine=True, dnd=True, lam=0.5, alpha=0.1, k_percent=10.0, window=8, refine_start=0.0,
                    save_every=10 ** 9)
    times: list[float] = []
    mem.reset()
    mem.sync()
    last = [time.perf_counter()]

    def on_step(step, total, r):
        mem.sync()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    try:
        with tempfile.TemporaryDirectory(prefix="spa_gpu_bench_") as d:
            summary = run_dpo_loop(stack, pairs, spec, Path(d), on_step=on_step)
        row["status"] = "ok"
        row["loss_first"] = summary.get("first_loss")
    except Exception as e:  # an OOM is a result, not a failure of the benchmark
        if not is_oom(e):
            raise
        row["status"] = "oom"
        row["error"] = str(e).splitlines()[0][:300]
    finally:
        stack.model.zero_grad(set_to_none=True)
        set_checkpointing(stack, False)
    row.update(mem.peak())
    row["first_step_s"] = round(times[0], 4) if times else None
    rest = times[1:] if len(times) > 1 else times
    row["step_s_median"] = round(statistics.median(rest), 4) if rest else None
    row["tokens_per_s"] = (round(2 * pairs_per_step * seq_len / row["step_s_median"], 1)
                           if row["step_s_median"] else None)
    if row["peak_allocated_gib"] is not None:
        row["measured_over_plan"] = round(row["peak_allocated_gib"] / row["plan_model_gib"], 3)
    mem.reset()
    return row


def measure_judge(stack, cfg, args, mem: Mem) -> dict:
    from spa_lite.judge import judge_logprob

    rng = random.Random(7)
    n, P, R = args.judge_pairs, args.prompt_len, args.gen_new_tokens
    prompts = [random_ids(rng, P, cfg.vocab_size) for _ in range(n)]
    y1 = [random_ids(rng, R - 1, cfg.vocab_size) + [2] for _ in range(n)]
    y2 = [random_ids(rng, R - 1, cfg.vocab_size) + [2] for _ in range(n)]
    plan = plan_for(cfg, args, seq_len=P + R, batch_size=1, judge_batch_size=args.judge_batch, prompt_len=P,
                    max_new_tokens=R, gen_batch_size=args.gen_prompts)
    out = {"pairs": n, "judge_batch": args.judge_batch, "prompt_len": P, "response_len": R}
    stack.model.eval()
    judge_logprob(stack, ["seed"], [], prompts[: args.judge_batch], y1[: args.judge_batch], y2[: args.judge_batch],
                  batch_size=args.judge_batch)  # warm-up
    mem.reset()
    mem.sync()
    t0 = time.perf_counter()
    try:
        rows = judge_logprob(stack, ["seed"], [], prompts, y1, y2, beta=0.1, batch_size=args.judge_batch)
        mem.sync()
        dt = time.perf_counter() - t0
        out.update(status="ok", seconds=round(dt, 3), pairs_per_s=round(len(rows) / dt, 3))
    except Exception as e:
        if not is_oom(e):
            raise
        out.update(status="oom", error=str(e).splitlines()[0][:300])
    out.update(mem.peak())
    exp = plan["stages"]["expand"]
    out["plan_expand_peak_gib"] = exp["peak_gb"]
    out["plan_expand_model_gib"] = round(exp["peak_gb"] - exp["parts"]["runtime_overhead"], 3)
    mem.reset()
    return out


def measure_generation(stack, tok, cfg, args, mem: Mem) -> dict:
    from spa_lite.generation import sample_responses

    rng = random.Random(11)
    P, N = args.prompt_len, args.gen_new_tokens
    prompts = [[{"role": "user", "content": " ".join(f"w{i}" for i in random_ids(rng, P - 4, cfg.vocab_size))}]
               for _ in range(args.gen_prompts)]
    gen_cfg = stack.model.get_base_model().generation_config
    old = gen_cfg.min_new_tokens
    gen_cfg.min_new_tokens = N  # every sequence does the same work
    out = {"prompts": len(prompts), "num_samples": 2, "batch_size": args.gen_prompts, "prompt_len": P,
           "max_new_tokens": N}
    try:
        with stack.use(["seed"]) as m:
            sample_responses(m, tok, prompts[:1], num_samples=2, max_new_tokens=4, seed=0, batch_size=1)  # warm-up
            mem.reset()
            mem.sync()
            t0 = time.perf_counter()
            try:
                res = sample_responses(m, tok, prompts, num_samples=2, max_new_tokens=N, temperature=0.7, seed=0,
                                       batch_size=args.gen_prompts)
                mem.sync()
                dt = time.perf_counter() - t0
                toks = sum(s.num_tokens for ss in res for s in ss)
                out.update(status="ok", seconds=round(dt, 3), generated_tokens=toks, tokens_per_s=round(toks / dt, 1))
            except Exception as e:
                if not is_oom(e):
                    raise
                out.update(status="oom", error=str(e).splitlines()[0][:300])
    finally:
        gen_cfg.min_new_tokens = old
    out.update(mem.peak())
    plan = plan_for(cfg, args, seq_len=P + N, batch_size=1, judge_batch_size=args.judge_batch, prompt_len=P,
                    max_new_tokens=N, gen_batch_size=args.gen_prompts)
    exp = plan["stages"]["expand"]
    out["plan_expand_peak_gib"] = exp["peak_gb"]
    out["plan_expand_model_gib"] = round(exp["peak_gb"] - exp["parts"]["runtime_overhead"], 3)
    mem.reset()
    return out


# --------------------------------------------------------------------------------------------- driver


def machine(args) -> dict:
    import peft
    import torch
    import transformers

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "device": args.device,
            "cpu_count": os.cpu_count()}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except Exception as e:
        info["bitsandbytes"] = f"not importable: {e}"
    if args.device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_total_gib=round(p.total_memory / GIB, 2))
    return info


def run_model(name: str, args, work: Path) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    mem = Mem(args.device)
    if mem.cuda:
        torch.cuda.init()
        torch.zeros(1, device=args.device)  # create the context before reading its size
    context = mem.context_gib()
    t0 = time.perf_counter()
    model_dir = build_model_dir(name, args.dry_run, work, args.device if mem.cuda else "cpu")
    build_s = time.perf_counter() - t0
    cfg = model_config(name, args.dry_run)
    mem.reset()
    t0 = time.perf_counter()
    stack, tok = make_stack(model_dir, args, work)
    load = {"build_or_reuse_s": round(build_s, 1), "load_and_stack_s": round(time.perf_counter() - t0, 1),
            "resident_after_load_gib": mem.now_gib(), **mem.peak(), "cuda_context_gib": context}
    n_params = sum(p.numel() for p in stack.model.parameters())
    result = {
        "benchmark": "gpu", "model": name, "dry_run": args.dry_run,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine(args),
        "settings": {k: v for k, v in vars(args).items() if k not in {"model"}},
        "config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size")},
        "stored_parameters": n_params, "load": load, "train": [], "notes": [
            "random weights of the real shapes (no download possible); memory and FLOPs match trained weights",
            "plan_model_gib = plan_memory's peak minus its runtime_overhead_gb; compare with peak_allocated_gib",
            "fits_card: peak_reserved_gib + cuda_context_gib <= card_gib",
        ],
    }
    for L in args.seq_lens:
        for B in args.pairs:
            for ck in (False, True):
                row = measure_train(stack, cfg, args, mem, L, B, ck)
                if row["peak_reserved_gib"] is not None:
                    row["fits_card"] = bool(row["status"] == "ok" and
                                            row["peak_reserved_gib"] + (context or 0.0) <= args.card_gib)
                result["train"].append(row)
                print(f"  train L={L} pairs={B} ckpt={ck}: {row['status']} step {row['step_s_median']}s "
                      f"peak {row['peak_allocated_gib']} GiB (plan {row['plan_model_gib']})", flush=True)
    if not args.skip_judge:
        result["judge"] = measure_judge(stack, cfg, args, mem)
    if not args.skip_generate:
        result["generation"] = measure_generation(stack, tok, cfg, args, mem)
    result["verdict"] = verdict(result, args)
    del stack
    mem.reset()
    return result


def verdict(result: dict, args) -> dict:
    """The question the benchmark answers, for the longest sequence length measured."""
    L = max(args.seq_lens)
    rows = [r for r in result["train"] if r["seq_len"] == L and r["status"] == "ok"]
    if not rows or rows[0].get("peak_reserved_gib") is None:
        return {"question": f"does a {args.quantization} SPA iteration at {L} tokens fit a {args.card_gib} GiB card?",
                "answer": "not measured (dry run or no CUDA)"}
    fitting = [r for r in rows if r.get("fits_card")]
    best = min(fitting, key=lambda r: (r["step_s_median"] or 1e9) / r["pairs"]) if fitting else None
    return {
        "question": f"does a {args.quantization} SPA iteration at {L} tokens fit a {args.card_gib} GiB card?",
        "answer": "yes" if best else "no",
        "fastest_fitting": None if best is None else {k: best[k] for k in ("pairs", "grad_ckpt", "peak_reserved_gib",
                                                                          "step_s_median", "plan_peak_gib")},
        "expand_fits": all(result.get(k, {}).get("peak_reserved_gib", 0) + (result["load"]["cuda_context_gib"] or 0)
                           <= args.card_gib for k in ("judge", "generation") if k in result),
    }


def print_table(res: dict) -> None:
    print(f"\n== {res['model']}{' (DRY RUN: scaled-down config, CPU)' if res['dry_run'] else ''} ==")
    ld = res["load"]
    print(f"resident after load: {ld['resident_after_load_gib']} GiB; CUDA context: {ld['cuda_context_gib']} GiB")
    hdr = f"{'L':>5} {'pairs':>5} {'ckpt':>5} {'status':>6} {'step s':>8} {'tok/s':>9} {'alloc GiB':>10} " \
          f"{'resv GiB':>9} {'plan GiB':>9} {'meas/plan':>9} {'fits':>5}"
    print(hdr)
    print("-" * len(hdr))

    def f(v):
        return "-" if v is None else str(v)

    for r in res["train"]:
        print(f"{r['seq_len']:>5} {r['pairs']:>5} {str(r['grad_ckpt']):>5} {r['status']:>6} {f(r['step_s_median']):>8} "
              f"{f(r['tokens_per_s']):>9} {f(r['peak_allocated_gib']):>10} {f(r['peak_reserved_gib']):>9} "
              f"{r['plan_model_gib']:>9} {f(r.get('measured_over_plan')):>9} {f(r.get('fits_card')):>5}")
    if "judge" in res:
        j = res["judge"]
        print(f"judge: {j['status']} {f(j.get('pairs_per_s'))} pairs/s (batch {j['judge_batch']}), peak "
              f"{f(j['peak_allocated_gib'])} GiB (plan expand {j['plan_expand_model_gib']})")
    if "generation" in res:
        g = res["generation"]
        print(f"generate: {g['status']} {f(g.get('tokens_per_s'))} tokens/s ({g['prompts']} prompts x 2, "
              f"{g['max_new_tokens']} new), peak {f(g['peak_allocated_gib'])} GiB (plan expand {g['plan_expand_model_gib']})")
    v = res["verdict"]
    fastest = f"; fastest fitting: {v['fastest_fitting']}" if v.get("fastest_fitting") else ""
    print(f"{v['question']} -> {v['answer']}" + fastest)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mistral-7b", choices=[*MODELS, "all"])
    p.add_argument("--dry-run", action="store_true", help="scaled-down config on the CPU: validates the code path")
    p.add_argument("--device", default=None, help="default: cuda (cpu in a dry run)")
    p.add_argument("--quantization", default=None, choices=["4bit", "none"], help="default: 4bit (none in a dry run)")
    p.add_argument("--dtype", default=None, help="compute dtype; default bfloat16 (float32 in a dry run)")
    p.add_argument("--seq-lens", default=None, help="comma-separated; default 512,1024 (64,128 in a dry run)")
    p.add_argument("--pairs", default="1,2", help="preference pairs per micro-batch, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per setting; default 4 (2 dry)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--judge-pairs", type=int, default=None)
    p.add_argument("--judge-batch", type=int, default=8)
    p.add_argument("--gen-prompts", type=int, default=None, help="prompts in one batch (x2 samples each)")
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--gen-new-tokens", type=int, default=None)
    p.add_argument("--skip-judge", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--card-gib", type=float, default=15.0,
                   help="usable memory of the card judged against (a '16 GB' T4 reports 15 GiB)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "spa_gpu_models"),
                   help="where the random models are saved once (~15 GB per real model)")
    p.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    a = p.parse_args(argv)
    dry = a.dry_run
    a.device = a.device or ("cpu" if dry else "cuda")
    a.quantization = a.quantization or ("none" if dry else "4bit")
    a.dtype = a.dtype or ("float32" if dry else "bfloat16")
    a.seq_lens = [int(x) for x in (a.seq_lens or ("64,128" if dry else "512,1024")).split(",")]
    a.pairs = [int(x) for x in a.pairs.split(",")]
    a.steps = a.steps or (2 if dry else 4)
    a.judge_pairs = a.judge_pairs or (4 if dry else 32)
    a.judge_batch = min(a.judge_batch, a.judge_pairs)
    a.gen_prompts = a.gen_prompts or (2 if dry else 16)
    a.prompt_len = a.prompt_len or (16 if dry else 256)
    a.gen_new_tokens = a.gen_new_tokens or (8 if dry else 300)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to validate the script on the CPU", file=sys.stderr)
        return 2
    if args.quantization == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            print(f"4-bit needs bitsandbytes ({e}); carry its wheel (bench/gpu/README.md) or use --quantization none",
                  file=sys.stderr)
            return 2
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    names = list(MODELS) if args.model == "all" else [args.model]
    rc = 0
    for name in names:
        try:
            res = run_model(name, args, work)
        except Exception:
            traceback.print_exc()
            rc = 1
            continue
        out = Path(args.out_dir) / f"gpu_{name}{'_dryrun' if args.dry_run else ''}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        print_table(res)
        print(f"wrote {out}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
