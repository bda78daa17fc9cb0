"""The GPU checks in one command: a 4-bit SPA iteration, the vLLM expand and the memory planner check.

    python bench/gpu/run_all.py --out-dir $OUT               # one CUDA GPU, under 8 minutes (see README)
    python bench/gpu/run_all.py --dry-run --out-dir /tmp/x   # anywhere: every code path on the CPU, scaled down

Three parts, in this order, each timed; one JSON, ``gpu_all.json`` (``gpu_all_dryrun.json`` in a dry run), is
written after each part, so a run stopped by a time limit still leaves what it measured:

1. **spa_iteration**: ``bench_gpu.run_model`` on the Mistral-7B shapes (random weights, 4-bit NF4 base,
   frozen ``seed`` + trainable ``iter1`` adapters): training at 1024 tokens, 1 pair per micro-batch, gradient
   checkpointing off and on (refinement + DND on), Eq. 7 judging and the fast sampling engine.
2. **vllm_expand**: the seed adapter served by ``spa_lite.vllm_backend.VLLMSampler`` over the same base (vLLM's
   in-flight bitsandbytes 4-bit), ``--vllm-prompts`` prompts x 2 samples, generated tokens/s; ``skipped`` with
   the reason where vLLM is not importable (it is not in the lent machine's image).
3. **planner_check**: ``spa_lite.plan.plan_memory``'s estimates against part 1's measured peaks (measured /
   planned per setting; within 0.8-1.25 passes) and the planner's fit verdict against the measured one.

``--budget-s`` (default 470) is the time the whole command may take: a part that would start with less than
its expected time left is skipped and says so, and ``within_budget`` records whether the total stayed under it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_gpu  # noqa: E402

# seconds a part needs at least on an H100/H200-class GPU (building the random 7B checkpoint included)
EXPECTED_S = {"spa_iteration": 150, "vllm_expand": 90, "planner_check": 1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="scaled-down models on the CPU: a test of the script")
    p.add_argument("--model", default="mistral-7b", choices=list(bench_gpu.MODELS))
    p.add_argument("--budget-s", type=float, default=470.0, help="time the whole command may take")
    p.add_argument("--vllm-prompts", type=int, default=None, help="prompts for the vLLM expand (x2 samples)")
    p.add_argument("--vllm-new-tokens", type=int, default=None)
    p.add_argument("--out-dir", default=str(HERE.parent / "results"))
    p.add_argument("--work-dir", default=None, help="where the random model is saved once (bench_gpu's default)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    a.vllm_prompts = a.vllm_prompts or (2 if a.dry_run else 64)
    a.vllm_new_tokens = a.vllm_new_tokens or (8 if a.dry_run else 256)
    return a


def gpu_args(a) -> argparse.Namespace:
    """bench_gpu's settings for part 1: the longest sequence only, 1 pair per micro-batch, 3 steps."""
    argv = ["--model", a.model, "--pairs", "1", "--out-dir", a.out_dir, "--threads", str(a.threads)]
    if a.work_dir:
        argv += ["--work-dir", a.work_dir]
    if a.dry_run:
        argv += ["--dry-run", "--seq-lens", "128"]
    else:
        argv += ["--seq-lens", "1024", "--steps", "3", "--gen-new-tokens", "128"]
    return bench_gpu.parse_args(argv)


def spa_iteration(a, state: dict) -> dict:
    g = gpu_args(a)
    work = Path(g.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    state["gpu_args"] = g
    state["model_dir"] = bench_gpu.build_model_dir(a.model, g.dry_run, work, g.device)
    res = bench_gpu.run_model(a.model, g, work)
    state["spa"] = res
    return res


def vllm_expand(a, state: dict) -> dict:
    try:
        from spa_lite.vllm_backend import import_vllm

        import_vllm()
    except Exception as e:  # noqa: BLE001 - any import failure means: no vLLM here
        return {"status": "skipped", "note": f"vLLM is not importable here ({str(e).splitlines()[0]}); "
                                             "install vllm in the GPU image to measure the vLLM expand"}
    if "model_dir" not in state:
        return {"status": "skipped", "note": "part 1 did not build the model"}
    import torch

    from spa_lite.vllm_backend import VLLMSampler

    g = state["gpu_args"]
    adapter = Path(g.work_dir) / "adapters" / f"{Path(state['model_dir']).name}-r{g.lora_r}"
    rng = __import__("random").Random(0)
    vocab = bench_gpu.model_config(a.model, a.dry_run).vocab_size
    prompts = [bench_gpu.random_ids(rng, g.prompt_len, vocab) for _ in range(a.vllm_prompts)]
    t0 = time.perf_counter()
    with VLLMSampler(str(state["model_dir"]), max_lora_rank=g.lora_r, dtype="bfloat16",
                     quantization="bitsandbytes" if g.quantization == "4bit" else None,
                     gpu_memory_utilization=0.5, max_model_len=g.prompt_len + a.vllm_new_tokens + 8) as s:
        start_s = time.perf_counter() - t0
        s.sample(prompts[:1], adapter, num_samples=2, max_new_tokens=4)  # warm-up
        t1 = time.perf_counter()
        out = s.sample(prompts, adapter, num_samples=2, max_new_tokens=a.vllm_new_tokens, temperature=0.7, seed=0)
        wall = time.perf_counter() - t1
    n = sum(x.num_tokens for ss in out for x in ss)
    return {"status": "ok", "engine_start_s": round(start_s, 1), "prompts": len(prompts), "samples": 2,
            "max_new_tokens": a.vllm_new_tokens, "generated_tokens": n, "wall_s": round(wall, 2),
            "tokens_per_s": round(n / wall, 1),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / bench_gpu.GIB, 2)
            if torch.cuda.is_available() else None}


def planner_check(a, state: dict) -> dict:
    res = state.get("spa")
    if not res:
        return {"status": "skipped", "note": "part 1 has no measurements"}
    rows = [r for r in res["train"] if r.get("status") == "ok"]
    checks = []
    for r in rows:
        ratio = r.get("measured_over_plan")
        checks.append({"seq_len": r["seq_len"], "pairs": r["pairs"], "grad_ckpt": r["grad_ckpt"],
                       "measured_gib": r.get("peak_allocated_gib"), "plan_gib": r.get("plan_model_gib"),
                       "measured_over_plan": ratio,
                       "within_0.8_1.25": None if ratio is None else bool(0.8 <= ratio <= 1.25)})
    measured = [c for c in checks if c["measured_over_plan"] is not None]
    out = {"status": "ok" if measured else "not measured (dry run or no CUDA)", "settings": checks,
           "verdict_measured": res.get("verdict")}
    if measured:
        out["pass"] = all(c["within_0.8_1.25"] for c in measured)
    return out


PARTS = {"spa_iteration": spa_iteration, "vllm_expand": vllm_expand, "planner_check": planner_check}


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    out = Path(a.out_dir) / f"gpu_all{'_dryrun' if a.dry_run else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "gpu_all", "dry_run": a.dry_run, "model": a.model, "command": " ".join([sys.executable, *sys.argv]),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "budget_s": a.budget_s,
              "machine": None, "parts": {}}
    state: dict = {}
    rc = 0
    for name, fn in PARTS.items():
        left = a.budget_s - (time.perf_counter() - t_start)
        if not a.dry_run and left < EXPECTED_S[name]:
            result["parts"][name] = {"status": "skipped", "note": f"{left:.0f} s of the budget left, needs ~{EXPECTED_S[name]} s"}
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            part = fn(a, state)
        except Exception as e:  # one failing part does not lose the others' results
            traceback.print_exc()
            part = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            rc = 1
        part = dict(part)
        part["wall_s"] = round(time.perf_counter() - t0, 1)
        result["parts"][name] = part
        if name == "spa_iteration" and "machine" in part:
            result["machine"] = part["machine"]
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        result["within_budget"] = result["total_s"] <= a.budget_s
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if "spa_iteration" in result["parts"] and result["parts"]["spa_iteration"].get("train"):
        bench_gpu.print_table(result["parts"]["spa_iteration"])
    for name, part in result["parts"].items():
        print(f"{name}: {part.get('status', 'ok')} ({part.get('wall_s', '-')} s){'  ' + part['note'] if 'note' in part else ''}")
    print(f"total {result.get('total_s')} s (budget {a.budget_s:.0f} s); wrote {out}", flush=True)
    return rc


if __name__ == "__main__":
    os.environ.setdefault("SPA_LITE_QUIET", "1")
    sys.exit(main())
