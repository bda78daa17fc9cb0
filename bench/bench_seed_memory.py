"""Peak memory and step time of seed DPO on the bundled SmolLM2 (recipe smollm2-demo): log-probs from hidden
states through a chunked kernel vs through full [N, L, V] logits (issue 13, part 2).

Every side runs the real seed-dpo stage (``spa_lite.stages.seed_dpo.run``) of recipe smollm2-demo, cut to
``--steps`` optimizer steps (``data.seed_limit`` = steps x 8 pairs, one epoch; the demo's micro-batch of 4
pairs and max_length 256 unchanged), in a FRESH subprocess (peak RSS is a process high-water mark),
sides interleaved fused_torch, logits, fused_trl, fused_torch, ...:

  fused_torch : hidden states + spa_lite's pure-torch chunked kernel (``logps.chunked_target_logps``), what runs
                when the installed trl has no ``trl.kernels.ChunkedLogProbFunction``.
  logits      : full logits for policy, reference and the DND mix (``logps.fused_head`` forced to None),
                what ran before when trl had no kernel.
  fused_trl   : hidden states + TRL's kernel (trl >= 1.15; left out when the installed trl lacks it).

Reported per side: the stage's peak RSS (max of the loading peak and the training peak, i.e. what the stage's
manifest reports in a plain run), the training peak alone (the high-water mark is reset once the model is
loaded), and the median seconds per optimizer step after the first. The workers run with the environment a
user has (no MALLOC_* settings); the stage returns memory with malloc_trim as `spa-lite run` does.

  python bench/bench_seed_memory.py --steps 3 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIDES = ("fused_torch", "logits", "fused_trl")
OPTIONAL_SIDES = ("fused_torch_ckpt",)  # + gradient checkpointing (model.gradient_checkpointing=true)


def _hwm_gb() -> float | None:
    kb = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                kb = int(line.split()[1])
    except OSError:
        return None
    return None if kb is None else kb / 1e6


def worker(cfg: dict) -> dict:
    """One seed-dpo stage of ``cfg['steps']`` steps with the log-prob path of ``cfg['side']``."""
    import torch

    from spa_lite import logps, memory
    from spa_lite.config import load_recipe
    from spa_lite.stages import seed_dpo

    side = cfg["side"]
    if side in ("fused_torch", "fused_torch_ckpt"):
        logps.ChunkedLogProbFunction = None  # as with trl < 1.15
    elif side == "logits":
        logps.fused_head = lambda model: None  # the one log-prob core (logps.batch_logps) asks it
    elif side == "fused_trl":
        if logps.ChunkedLogProbFunction is None:
            raise SystemExit("the installed trl has no chunked log-prob kernel")
    else:
        raise ValueError(side)
    base_rss = memory.rss_gb()
    marks: dict = {}
    real_load = seed_dpo.load_stack

    def load_then_reset(*a, **kw):  # split the stage's peak into loading and training
        stack = real_load(*a, **kw)
        memory.release_memory()
        marks["load_peak_gb"] = _hwm_gb()
        marks["loaded_rss_gb"] = memory.rss_gb()
        marks["reset"] = memory.reset_peak()
        return stack

    seed_dpo.load_stack = load_then_reset
    run_dir = Path(tempfile.mkdtemp(prefix="spa_bench_seed_"))
    recipe = load_recipe("smollm2-demo", {
        "run_dir": str(run_dir), "name": side, "data.seed_limit": 4 * cfg["grad_accum"] * cfg["steps"], "seed_dpo.epochs": 1,
        "seed_dpo.save_every": 10_000, "seed_dpo.grad_accum": cfg["grad_accum"],
        "model.gradient_checkpointing": side.endswith("_ckpt"), **({"threads": cfg["threads"]} if cfg["threads"] else {}),
    })
    t0 = time.perf_counter()
    manifest = seed_dpo.run(recipe)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (recipe.run_path / "seed" / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows]
    steps_s = [b - a for a, b in zip(elapsed, elapsed[1:])]  # the first step (warm-up) is left out
    train_peak = manifest["memory"]["peak_rss_gb"] if marks.get("reset") else None
    return {
        "side": side, "kernel": logps.logprob_kernel() if side != "logits" else "none (full logits)",
        "torch_threads": torch.get_num_threads(), "steps": len(rows), "losses": [r["loss"] for r in rows],
        "step_s": steps_s, "median_step_s": statistics.median(steps_s) if steps_s else None, "stage_wall_s": wall,
        "baseline_rss_gb": base_rss, "load_peak_gb": marks.get("load_peak_gb"), "loaded_rss_gb": marks.get("loaded_rss_gb"),
        "train_peak_gb": train_peak,
        "stage_peak_gb": max(x for x in (marks.get("load_peak_gb"), train_peak) if x is not None),
        "manifest_memory": manifest["memory"],
    }


def run_side(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(common.REPO))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + "\n" + proc.stderr[-6000:] + "\n")
        raise RuntimeError(f"side {cfg['side']} failed (rc={proc.returncode})")
    out = json.loads(lines[-1][len("RESULT "):])
    out["process_wall_s"] = round(time.perf_counter() - t0, 2)
    out["loadavg_after"] = list(os.getloadavg())
    return out


def head_bench(args) -> None:
    """The LM head alone, in one process, interleaved: seconds of forward + backward (to the hidden states) of the
    log-probs of ``--head-rows`` rows through full logits, spa_lite's torch kernel and TRL's kernel (when
    installed), with SmolLM2's head shape. The same rows on every side, so this is the chunked kernels' recompute
    cost; in a DPO step the logits path also projects prompt and padding positions, which the fused path skips."""
    import torch
    from transformers import AutoConfig
    from trl.trainer.utils import selective_log_softmax

    from spa_lite import logps

    cfg = AutoConfig.from_pretrained(common.resolve_model("smollm2"))
    V, H, R = cfg.vocab_size, cfg.hidden_size, args.head_rows
    machine = common.machine_info(args.threads, "cpu")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=g) * 0.02  # frozen, as the LM head is in LoRA training
    hidden = torch.randn(R, H, generator=g)
    targets = torch.randint(0, V, (R,), generator=g)

    def full(h):
        return selective_log_softmax(torch.nn.functional.linear(h, weight).float(), targets)

    def torch_kernel(h):
        return logps.chunked_target_logps(h, weight, None, targets)

    def trl_kernel(h):
        return logps.ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, logps._VOCAB_TILE, None, 1.0, ())[0]

    fns = {"head_logits": full, "head_torch": torch_kernel}
    if logps.ChunkedLogProbFunction is not None:
        fns["head_trl"] = trl_kernel
    raw: dict[str, list[dict]] = {k: [] for k in fns}
    want = None
    for rep in range(args.repeats + 1):  # the first round warms up and is not kept
        for name, fn in fns.items():
            h = hidden.clone().requires_grad_()
            t0 = time.perf_counter()
            lp = fn(h)
            lp.sum().backward()
            dt = time.perf_counter() - t0
            if want is None:
                want = (lp.detach(), h.grad)
            err = max(float((lp.detach() - want[0]).abs().max()), float((h.grad - want[1]).abs().max()))
            if rep:
                raw[name].append({"seconds": dt, "max_abs_diff_vs_logits": err, "loadavg_1min": os.getloadavg()[0]})
                print(f"[{rep}/{args.repeats}] {name:12s} {dt:.2f} s (max |diff| vs logits {err:.1e})", flush=True)
    sides = {k: common.side(f"seconds of forward + backward of {R} rows' log-probs", "s", False, v, "seconds")
             for k, v in raw.items()}
    ratios = [{**common.ratio(f"{k} / head_logits seconds (head only, same rows)", k, "head_logits", sides, "<=", 1.6),
               "informational": True} for k in fns if k != "head_logits"]
    notes = [f"SmolLM2's head shape ({V} x {H}), random weights, {R} rows, fp32; the first round is a warm-up.",
             "Full logits: F.linear then trl's selective_log_softmax, as spa_lite.logps.token_logps. The kernels "
             "recompute the projection in backward: one more [rows, H] x [H, V] matmul."]
    common.write_result(args, "seed_memory_head", {"model": common.resolve_model("smollm2"), "rows": R,
                        "repeats": args.repeats, "threads": args.threads}, sides, ratios, notes, machine)


def main(argv=None):
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--worker":
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        res = worker(json.loads(sys.argv[2]))
        print("RESULT " + json.dumps(res), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of seed DPO per side")
    p.add_argument("--grad-accum", type=int, default=2,
                   help="micro-batches of 4 pairs per step (the demo's 2; 1 halves the compute, same peak shapes)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of each side")
    p.add_argument("--sides", default=",".join(SIDES), help=f"of {', '.join(SIDES + OPTIONAL_SIDES)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the recipe's, i.e. torch's default)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per side")
    p.add_argument("--quick", action="store_true", help="2 steps of 1 micro-batch, 1 repeat: a smoke run")
    p.add_argument("--out", default=str(common.RESULTS / "seed_memory.json"))
    p.add_argument("--mode", choices=["stage", "head"], default="stage",
                   help="stage: the seed-dpo stage per side (default); head: the LM head's log-probs alone, timed")
    p.add_argument("--head-rows", type=int, default=1024, help="--mode head: scored rows (positions)")
    args = p.parse_args(argv)
    if args.mode == "head":
        if args.out == str(common.RESULTS / "seed_memory.json"):
            args.out = str(common.RESULTS / "seed_memory_head.json")
        if args.quick:
            args.head_rows, args.repeats = 64, 1
        head_bench(args)
        return
    if args.quick:
        args.steps, args.repeats, args.grad_accum = 2, 1, 1  # 2 steps: one is timed after the warm-up step
    from spa_lite import logps

    sides = [s for s in args.sides.split(",") if s != "fused_trl" or logps.ChunkedLogProbFunction is not None]
    machine = common.machine_info(args.threads, "cpu")
    raw: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        for s in sides:
            r = run_side({"side": s, "steps": args.steps, "threads": args.threads, "grad_accum": args.grad_accum},
                         args.timeout)
            raw[s].append(r)
            print(f"[{rep + 1}/{args.repeats}] {s:11s} stage peak {r['stage_peak_gb']:.2f} GB (load {r['load_peak_gb']:.2f}, "
                  f"train {r['train_peak_gb']:.2f}), {r['median_step_s']:.1f} s/step, losses {r['losses']}, "
                  f"load avg {r['loadavg_after'][0]:.1f}", flush=True)

    sides_out = {}
    for s, rs in raw.items():
        sides_out[s + "_train_peak"] = common.side("seed-dpo peak RSS after loading (VmHWM reset once loaded)", "GB",
                                                   False, rs, "train_peak_gb")
        sides_out[s + "_stage_peak"] = common.side("seed-dpo stage peak RSS (loading or training)", "GB", False,
                                                   rs, "stage_peak_gb")
        sides_out[s + "_stage_peak"]["raw"] = f"see {s}_train_peak"
        sides_out[s + "_step"] = common.side("median s per optimizer step after the first", "s", False, rs,
                                             "median_step_s")
        sides_out[s + "_step"]["raw"] = f"see {s}_train_peak"
    ratios = []
    for num in ("fused_torch", "fused_trl", "fused_torch_ckpt"):
        if num in raw and "logits" in raw:
            ratios.append(common.ratio(f"{num} / logits seed-dpo training peak RSS", f"{num}_train_peak",
                                       "logits_train_peak", sides_out, "<=", 1.0))
            ratios.append(common.ratio(f"{num} / logits seed-dpo stage peak RSS", f"{num}_stage_peak",
                                       "logits_stage_peak", sides_out, "<=", 1.0))
            ratios.append({**common.ratio(f"{num} / logits seconds per step", f"{num}_step", "logits_step",
                                          sides_out, "<=", 1.2), "informational": True})
    first = {s: rs[0]["losses"] for s, rs in raw.items()}
    notes = [
        "Each repeat of each side is a fresh Python process running spa_lite.stages.seed_dpo.run on recipe "
        f"smollm2-demo with --set data.seed_limit={4 * args.grad_accum * args.steps} seed_dpo.epochs=1 "
        f"seed_dpo.grad_accum={args.grad_accum} (the demo's micro-batch of 4 pairs and max_length 256: 8 rows of up "
        "to 256 tokens per forward, the shapes that set the peak).",
        "fused_torch_ckpt (when run): fused_torch with model.gradient_checkpointing=true.",
        "Peak RSS is absolute (not minus a baseline): it includes the interpreter, torch and the loaded model, as a "
        "stage manifest does. Training peak: VmHWM reset (clear_refs 5) right after the stack is loaded and "
        "released; stage peak: the larger of the loading peak and the training peak.",
        "Step times are on a shared 2-core machine (see load averages per side in the raw entries); the sides are "
        "interleaved so that load drifts hit them alike. The chunked kernels recompute the LM head in backward.",
        "Per-step losses of the first repeat (the same data and order on every side; they should agree to float "
        f"rounding): {json.dumps(first)}",
    ]
    settings = {"model": common.resolve_model("smollm2"), "recipe": "smollm2-demo", "steps": args.steps,
                "grad_accum": args.grad_accum,
                "repeats": args.repeats, "sides": sides, "threads": args.threads}
    common.write_result(args, "seed_memory", settings, sides_out, ratios, notes, machine)


if __name__ == "__main__":
    main()
