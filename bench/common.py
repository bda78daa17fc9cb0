"""Shared pieces of the spa-lite benchmarks: arguments, machine info, data, adapters, result files, and the
workers that each benchmark runs in a fresh subprocess (``python bench/common.py --worker KIND --cfg JSON``).

Every worker imports the same heavy modules (torch, transformers, peft, trl, datasets, spa_lite) before it
records its baseline memory, so "peak minus baseline" compares like with like across implementations.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("SPA_LITE_QUIET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DISABLE_TQDM", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------- arguments


def add_common_args(p: argparse.ArgumentParser, name: str, repeats: int) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (bundled), a local checkpoint folder, or 'tiny' (random 2-layer test model)")
    p.add_argument("--quick", action="store_true", help="tiny sizes; a smoke test of the script, not a measurement")
    p.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats of each side")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"))
    p.add_argument("--threads", type=int, default=0, help="torch threads in every process (0 = torch's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)


def resolve_model(arg: str) -> str:
    """'tiny' builds (once per machine) the test suite's random Llama; aliases resolve to the cached folder."""
    if arg == "tiny":
        d = Path(tempfile.gettempdir()) / "spa_bench_tiny_model"
        if not (d / "model.safetensors").exists():
            sys.path.insert(0, str(REPO / "tests"))
            from conftest import build_tiny_model_dir

            d.mkdir(parents=True, exist_ok=True)
            build_tiny_model_dir(d)
        return str(d)
    from spa_lite.models import resolve_model_path

    return resolve_model_path(arg)


def machine_info(threads: int = 0, device: str = "cpu") -> dict:
    import peft
    import torch
    import transformers
    import trl

    if threads:
        torch.set_num_threads(threads)
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "device": device,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(name: str, num: str, den: str, sides: dict, op: str, target: float, key: str = "median") -> dict:
    a, b = sides[num][key], sides[den][key]
    value = a / b if a is not None and b else None
    ok = None if value is None else (value <= target if op == "<=" else value >= target)
    return {"name": name, "numerator": num, "denominator": den, "value": value, "target": f"{op} {target}",
            "pass": ok}


def write_result(args, name: str, settings: dict, sides: dict, ratios: list[dict], notes: list[str],
                 machine: dict) -> Path:
    payload = {
        "benchmark": name,
        "command": " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable]
                            + [os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0]]
                            + sys.argv[1:]),
        "quick": bool(args.quick),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine, "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": settings,
        "sides": sides,
        "ratios": ratios,
        "notes": notes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out}")
    for r in ratios:
        v = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        print(f"  {r['name']}: {v}  (target {r['target']}: {'PASS' if r['pass'] else 'FAIL'})")
    return out


def side(metric: str, unit: str, higher_is_better: bool, raw: list[dict], key: str) -> dict:
    vals = [r.get(key) for r in raw]
    return {"metric": metric, "unit": unit, "higher_is_better": higher_is_better, "repeats": vals,
            "median": median(vals), "raw": raw}


# --------------------------------------------------------------------------------------------- subprocesses


def run_worker(kind: str, cfg: dict, timeout: float = 3600) -> dict:
    """Run one worker in a fresh interpreter and return the JSON it prints on its 'RESULT ' line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--cfg", json.dumps(cfg)]
    t0 = time.perf_counter()
    # glibc keeps freed small-heap blocks in its arenas, so a process's peak RSS also counts memory that was
    # free but not returned; allocations of 64 KiB and more as mmaps go back to the OS on free, and peak RSS
    # tracks peak live memory (what CUDA's max_memory_allocated measures). Same setting for every side.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:] + "\n")
        raise RuntimeError(f"worker {kind} {cfg.get('impl')} failed (rc={proc.returncode})")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def _rss_mib() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / MIB  # Linux: KiB, macOS: bytes


def _status_mib(field: str) -> float | None:
    """VmHWM / VmRSS from /proc/self/status, in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_hwm() -> dict:
    """After loading: drop the loading transient from the high-water mark (Linux >= 4.0: clear_refs 5), so
    the peak read at the end covers the resident models plus training/judging, not from_pretrained's copies."""
    import gc

    gc.collect()
    rss = _status_mib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ok = True
    except OSError:
        ok = False
    return {"loaded_rss_mib": rss, "hwm_reset": ok}


def finish_memory(res: dict, base_rss: float, loaded: dict) -> dict:
    hwm = _status_mib("VmHWM")
    res["after_load_rss_minus_baseline_mib"] = None if loaded["loaded_rss_mib"] is None else loaded["loaded_rss_mib"] - base_rss
    res["post_load_peak_minus_baseline_mib"] = hwm - base_rss if (hwm is not None and loaded["hwm_reset"]) else None
    res["hwm_reset"] = loaded["hwm_reset"]
    return res


def _current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        return None


# --------------------------------------------------------------------------------------------- data


def word_tokens(tok) -> list[int]:
    """Token ids that are a whole space-prefixed lowercase word and round-trip alone, so that a text made of
    them tokenizes to exactly those ids (pre-tokenizers split at spaces). Falls back to letters for tiny
    tokenizers with few merges."""
    words = []
    for i in range(len(tok)):
        s = tok.decode([i])
        if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha() and s[1:].islower():
            if tok(s, add_special_tokens=False)["input_ids"] == [i]:
                words.append(i)
        if len(words) >= 4000:
            break
    if len(words) < 20:  # tiny tokenizer: a space and a letter are separate tokens; use " x" pieces
        for c in "abcdefghijklmnopqrstuvwxyz":
            ids = tok(" " + c, add_special_tokens=False)["input_ids"]
            if tok.decode(ids) == " " + c:
                words.append(tuple(ids))
    return words


def _text_of(tok, pool, n_tokens, rng) -> str:
    parts, count = [], 0
    while count < n_tokens:
        w = pool[rng.randrange(len(pool))]
        ids = list(w) if isinstance(w, tuple) else [w]
        if count + len(ids) > n_tokens and count > 0:
            break
        parts.append(tok.decode(ids))
        count += len(ids)
    return "".join(parts)


def make_text_rows(tok, n: int, prompt_len: int, resp_len: int, seed: int = 0) -> list[dict]:
    """n preference rows of random words: prompt/chosen/rejected strings of about the requested token lengths."""
    import random

    rng = random.Random(seed)
    pool = word_tokens(tok)
    rows = []
    for _ in range(n):
        rows.append({"prompt": _text_of(tok, pool, prompt_len, rng),
                     "chosen": _text_of(tok, pool, resp_len - 1, rng),  # + EOS = resp_len tokens
                     "rejected": _text_of(tok, pool, resp_len - 1, rng)})
    return rows


def tokenize_like_trl(tok, row: dict):
    """The ids TRL's DPOTrainer derives from a non-conversational row (EOS appended to the responses)."""
    from spa_lite.logps import TokenizedPair

    eos = tok.eos_token
    p = tok(row["prompt"])["input_ids"]
    c = tok(row["prompt"] + row["chosen"] + eos)["input_ids"]
    r = tok(row["prompt"] + row["rejected"] + eos)["input_ids"]
    assert c[: len(p)] == p and r[: len(p)] == p, "prompt is not a token prefix"
    return TokenizedPair(list(p), list(c[len(p):]), list(r[len(p):]))


def make_seed_adapter(model_path: str, out_dir: Path, r: int = 16, seed: int = 0, scale: float = 0.02) -> str:
    """A saved LoRA adapter with non-zero B (so pi_{i-1} != pi_init): the frozen 'seed' adapter of the stack."""
    import torch
    from peft import get_peft_model

    from spa_lite.models import load_base_model
    from spa_lite.stack import LoraSettings, save_adapter

    if (out_dir / "adapter_config.json").exists():
        return str(out_dir)
    base, _ = load_base_model(model_path, quantization="none", device="cpu", dtype="float32")
    model = get_peft_model(base, LoraSettings(r=r, alpha=2 * r).to_peft(), adapter_name="seed")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    save_adapter(model, "seed", out_dir)
    return str(out_dir)


def adapter_dir(model_path: str, r: int, seed: int) -> str:
    import hashlib

    digest = hashlib.sha1(str(Path(model_path).resolve()).encode()).hexdigest()[:10]
    key = f"{Path(model_path).name}-r{r}-s{seed}-{digest}"
    return make_seed_adapter(model_path, Path(tempfile.gettempdir()) / "spa_bench_adapters" / key, r=r, seed=seed)


# --------------------------------------------------------------------------------------------- workers


class ThreeCopyStack:
    """Duck-types PolicyStack for ``pair_loss`` with three separate full models (the naive implementation)."""

    def __init__(self, theta, ref, init, tokenizer, ref_names, theta_names):
        self.theta_model, self.ref_model, self.init_model = theta, ref, init
        self.tokenizer = tokenizer
        self.ref_names, self.theta = list(ref_names), list(theta_names)
        self.model = theta  # pair_loss asks the model in use for its backbone and head
        self.sharded = False  # no FSDP: the fused log-prob path, as PolicyStack unsharded

    @property
    def prev(self):
        return self.ref_names

    def trainable_parameters(self):
        return [p for p in self.theta_model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def use(self, names):
        names = list(names)
        if names == self.theta:
            yield self.theta_model
        elif names == self.ref_names:
            yield self.ref_model
        elif not names:
            yield self.init_model
        else:
            raise KeyError(names)


def _imports():
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl import DPOConfig, DPOTrainer  # noqa: F401

    import spa_lite.judge  # noqa: F401
    import spa_lite.training  # noqa: F401

    return torch


def strip_stale_gguf(model) -> bool:
    """The cached SmolLM2 checkpoint is de-quantized float32, but its config.json still carries the GGUF
    ``quantization_config``, so transformers marks the model quantized and Trainer refuses to train it.
    Drop that stale marker (the weights are plain float32 tensors either way)."""
    q = getattr(model, "hf_quantizer", None)
    if q is None or str(getattr(q.quantization_config, "quant_method", "")).lower().split(".")[-1] != "gguf":
        return False
    model.hf_quantizer = None
    model.is_quantized = False  # from_pretrained sets these as instance attributes
    if "quantization_method" in vars(model):
        del model.quantization_method
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return True


def _load(cfg):
    from spa_lite.models import load_base_model

    model, tok = load_base_model(cfg["model"], quantization="none", device=cfg["device"], dtype=cfg.get("dtype", "auto"),
                                 gradient_checkpointing=bool(cfg.get("ckpt", False)))
    strip_stale_gguf(model)  # same on every side, so no side differs by it
    return model, tok


def _sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker_train(cfg: dict) -> dict:
    """One SPA-iteration training run of ``cfg['steps']`` optimizer steps by one implementation."""
    torch = _imports()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"].startswith("cuda")
    base_rss = _rss_mib()
    torch.manual_seed(cfg["seed"])
    impl, B, steps = cfg["impl"], cfg["batch_size"], cfg["steps"]
    frozen = cfg["frozen"]
    tmp = Path(tempfile.mkdtemp(prefix="spa_bench_"))
    base, tok = _load(cfg)
    rows = make_text_rows(tok, B * steps, cfg["prompt_len"], cfg["response_len"], seed=cfg["seed"])
    pairs = [tokenize_like_trl(tok, r) for r in rows]
    lens = sorted({len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs})
    times: list[float] = []
    extra: dict = {}

    if impl in ("spa", "spa_plain"):
        from spa_lite.stack import LoraSettings, build_stack
        from spa_lite.training import LoopSpec, run_dpo_loop

        stack = build_stack(base, tok, [("seed", cfg["adapter"])] if frozen else [], trainable="iter1",
                            lora=LoraSettings(r=cfg["lora_r"], alpha=2 * cfg["lora_r"]))
        refined = impl == "spa"
        loaded = reset_hwm()
        spec = LoopSpec(lr=1e-4, epochs=1.0, batch_size=B, grad_accum=1, beta=0.1, seed=cfg["seed"],
                        ref=["seed"] if frozen else [], warmup_ratio=0.0, save_every=10**9,
                        refine=refined, dnd=refined, lam=0.5, refine_start=0.0, window=50, k_percent=10.0, alpha=0.1)
        stamps = []

        def on_step(step, total, row):
            _sync(torch, cfg["device"])
            stamps.append(time.perf_counter())

        _sync(torch, cfg["device"])
        t0 = time.perf_counter()
        summary = run_dpo_loop(stack, pairs, spec, tmp / "run", on_step=on_step)
        times = [b - a for a, b in zip([t0] + stamps[:-1], stamps)]
        extra = {"spa_steps": summary["steps"], "first_loss": summary["first_loss"],
                 "last_flagged_frac": summary["last10"].get("flagged_frac")}
    elif impl == "threecopy":
        import copy

        from peft import PeftModel, get_peft_model

        from spa_lite.logps import collate_pairs
        from spa_lite.losses import ConfidenceWindow
        from spa_lite.stack import LoraSettings
        from spa_lite.training import LoopSpec, pair_loss

        init_model = base  # pi_init: the bare base (resident: a naive SPA iteration also judges with it)
        ref_model = copy.deepcopy(base)  # pi_ref = pi_{i-1}, its own full copy with the seed adapter merged in
        if frozen:
            ref_model = PeftModel.from_pretrained(ref_model, cfg["adapter"], adapter_name="seed").merge_and_unload()
        ref_model.requires_grad_(False)
        theta_model = get_peft_model(copy.deepcopy(ref_model), LoraSettings(r=cfg["lora_r"], alpha=2 * cfg["lora_r"]).to_peft(),
                                     adapter_name="iter1")  # pi_theta: a third full copy + the trainable LoRA
        st = ThreeCopyStack(theta_model, ref_model, init_model, tok, ["seed"] if frozen else ["__ref__"], ["iter1"])
        spec = LoopSpec(lr=1e-4, epochs=1.0, batch_size=B, grad_accum=1, beta=0.1, seed=cfg["seed"], ref=st.ref_names,
                        refine=True, dnd=True, lam=0.5, refine_start=0.0, window=50, k_percent=10.0, alpha=0.1)
        params = st.trainable_parameters()
        loaded = reset_hwm()
        opt = torch.optim.AdamW(params, lr=spec.lr)
        window = ConfidenceWindow(spec.window, spec.k_percent)
        pad = tok.pad_token_id
        for s in range(steps):
            _sync(torch, cfg["device"])
            t0 = time.perf_counter()
            batch = collate_pairs(pairs[s * B:(s + 1) * B], pad)
            out = pair_loss(st, batch, spec, window, refining=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(torch, cfg["device"])
            times.append(time.perf_counter() - t0)
        extra = {"first_loss": None}
    elif impl == "trl":
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import DPOConfig, DPOTrainer

        from spa_lite.stack import LoraSettings

        stamps = []

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                _sync(torch, cfg["device"])
                stamps.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kw):
                _sync(torch, cfg["device"])
                stamps.append(time.perf_counter())

        args = DPOConfig(
            output_dir=str(tmp / "trl"), max_steps=steps, per_device_train_batch_size=B, gradient_accumulation_steps=1,
            learning_rate=1e-4, beta=0.1, loss_type=["sigmoid"], report_to=[], use_cpu=not cuda,
            save_strategy="no", logging_steps=1, bf16=False, fp16=False, gradient_checkpointing=bool(cfg.get("ckpt", False)),
            max_length=None, disable_dropout=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            seed=cfg["seed"], warmup_steps=0, disable_tqdm=True, max_grad_norm=1.0, weight_decay=0.0,
        )
        trainer = DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=LoraSettings(r=cfg["lora_r"], alpha=2 * cfg["lora_r"]).to_peft(),
                             callbacks=[Timer()])
        loaded = reset_hwm()
        ds = trainer.train_dataset
        match = all(list(ds[i]["prompt_ids"]) == pairs[i].prompt_ids and list(ds[i]["chosen_ids"]) == pairs[i].chosen_ids
                    and list(ds[i]["rejected_ids"]) == pairs[i].rejected_ids for i in range(len(pairs)))
        trainer.train()
        times = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
        extra = {"tokens_match_spa": match, "optim": str(trainer.args.optim),
                 "first_loss": next((h["loss"] for h in trainer.state.log_history if "loss" in h), None)}
    else:
        raise ValueError(impl)

    peak = _rss_mib()
    res = {"impl": impl, "step_times_s": times, "baseline_rss_mib": base_rss, "peak_rss_mib": peak,
           "peak_minus_baseline_mib": peak - base_rss, "end_rss_mib": _current_rss_mib(), "seq_lens": lens,
           "torch_threads": torch.get_num_threads(), **extra}
    finish_memory(res, base_rss, loaded)
    if cuda:
        res["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    return res


def worker_judge(cfg: dict) -> dict:
    """Eq. 7 judging of ``cfg['pairs']`` pairs: the adapter stack (one base) or two separately loaded models."""
    torch = _imports()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"].startswith("cuda")
    base_rss = _rss_mib()
    impl, bs, beta = cfg["impl"], cfg["batch_size"], 0.1
    from spa_lite.judge import judge_logprob
    from spa_lite.logps import collate_sequences, forward_logits, sequence_logps

    base, tok = _load(cfg)
    rows = make_text_rows(tok, cfg["pairs"] + 2 * bs, cfg["prompt_len"], cfg["response_len"], seed=cfg["seed"])
    pairs = [tokenize_like_trl(tok, r) for r in rows]
    prompts = [p.prompt_ids for p in pairs]
    y1 = [p.chosen_ids for p in pairs]
    y2 = [p.rejected_ids for p in pairs]

    if impl == "stack":
        from spa_lite.stack import build_stack

        stack = build_stack(base, tok, [("seed", cfg["adapter"])])

        def judge(sl):
            return [r["p"] for r in judge_logprob(stack, ["seed"], [], prompts[sl], y1[sl], y2[sl], beta=beta,
                                                  batch_size=bs)]
    elif impl == "stack_sampler":
        # expand's default (expand.judge_logps: sampler): log pi_{i-1}(y|x) comes with each sample from the
        # sampling pass, so judging runs the reference only (plus a 2-pair self-check per call). Here the
        # pairs are not sampled, so those values are computed before the clock starts.
        from spa_lite.judge import response_logps
        from spa_lite.stack import build_stack

        stack = build_stack(base, tok, [("seed", cfg["adapter"])])
        k = len(prompts)
        lp = response_logps(stack, ["seed"], prompts + prompts, y1 + y2, batch_size=2 * bs)
        known1, known2 = lp[:k].tolist(), lp[k:].tolist()

        def judge(sl):
            return [r["p"] for r in judge_logprob(stack, ["seed"], [], prompts[sl], y1[sl], y2[sl], beta=beta,
                                                  batch_size=bs, judge_logps=(known1[sl], known2[sl]))]
    elif impl == "naive":
        from peft import PeftModel

        judge_model = PeftModel.from_pretrained(base, cfg["adapter"], adapter_name="seed").merge_and_unload()
        judge_model.eval()
        init_model, _ = _load(cfg)  # the second, separately loaded model
        pad = tok.pad_token_id

        @torch.no_grad()
        def judge(sl):
            out = []
            P, A, Bs = prompts[sl], y1[sl], y2[sl]
            for s in range(0, len(P), bs):
                p_, a, b = P[s:s + bs], A[s:s + bs], Bs[s:s + bs]
                batch = collate_sequences(list(p_) * 2, list(a) + list(b), pad)
                r = (sequence_logps(forward_logits(judge_model, batch), batch).float().cpu()
                     - sequence_logps(forward_logits(init_model, batch), batch).float().cpu())
                n = len(p_)
                out += torch.sigmoid(beta * (r[:n] - r[n:])).tolist()
            return out
    else:
        raise ValueError(impl)

    loaded = reset_hwm()
    judge(slice(0, 2 * bs))  # two warm-up batches, not timed
    _sync(torch, cfg["device"])
    t0 = time.perf_counter()
    ps = judge(slice(2 * bs, 2 * bs + cfg["pairs"]))
    _sync(torch, cfg["device"])
    wall = time.perf_counter() - t0
    peak = _rss_mib()
    res = {"impl": impl, "pairs": len(ps), "wall_s": wall, "pairs_per_s": len(ps) / wall,
           "p_mean": sum(ps) / len(ps), "p_first": ps[:4], "baseline_rss_mib": base_rss, "peak_rss_mib": peak,
           "peak_minus_baseline_mib": peak - base_rss, "torch_threads": torch.get_num_threads()}
    finish_memory(res, base_rss, loaded)
    if cuda:
        res["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
    return res


WORKERS = {"train": worker_train, "judge": worker_judge}


def _main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=sorted(WORKERS))
    p.add_argument("--cfg", required=True)
    a = p.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    res = WORKERS[a.worker](json.loads(a.cfg))
    sys.stdout.flush()
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    _main()
