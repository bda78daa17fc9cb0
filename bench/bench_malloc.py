"""One training stage of the quick start under each glibc heap policy and micro-batch size: stage peak RSS vs time.

Every repeat of every side is a fresh `spa-lite seed-dpo --recipe smollm2-demo` process on the same seed pairs
(``--pairs`` of them, one epoch: a few optimizer steps), sides interleaved A, B, C, ..., A, B, C, ... so that the
machine's drift falls on every side alike. Reported per side: the stage's peak RSS (its manifest, high-water mark
reset at the stage's start) and the median optimizer-step time after the first step (metrics.jsonl elapsed_s).

    python bench/bench_malloc.py [--sides tuned64,glibc,glibc_b4] [--pairs 24] [--repeats 2]

Sides (name: recipe overrides):
  tuned64   : memory.malloc=tuned, mmap threshold 64 KiB, trim after every step, micro-batches of 2 (until now)
  glibc     : memory.malloc=glibc (glibc's own heap, trimmed between stages), micro-batches of 2
  glibc_b4  : memory.malloc=glibc, micro-batches of 4 (same 8 pairs per optimizer step)
  tuned4m   : memory.malloc=tuned with a 4 MiB threshold, micro-batches of 2
  tuned1m   : memory.malloc=tuned with a 1 MiB threshold, micro-batches of 2
  tuned64_b4: memory.malloc=tuned, 64 KiB, micro-batches of 4
  tuned64_thp: as tuned64, with THP_MEM_ALLOC_ENABLE=1 (torch's 2 MiB+ blocks on transparent huge pages)
  glibc_b1  : memory.malloc=glibc, micro-batches of 1 (8 per optimizer step)
  glibc_bf16: memory.malloc=glibc, model.dtype=bfloat16 (the base in bf16; LoRA weights stay float32)
  tuned4m_b1: memory.malloc=tuned with a 4 MiB threshold, micro-batches of 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

B2 = ["seed_dpo.batch_size=2", "seed_dpo.grad_accum=4"]
B4 = ["seed_dpo.batch_size=4", "seed_dpo.grad_accum=2"]
B1 = ["seed_dpo.batch_size=1", "seed_dpo.grad_accum=8"]
TRAIN_B2 = ["train.batch_size=2", "train.grad_accum=2"]
TRAIN_B4 = ["train.batch_size=4", "train.grad_accum=1"]
SIDES = {
    "tuned64": ["memory.malloc=tuned", "memory.mmap_threshold_kib=64"] + B2,
    "glibc": ["memory.malloc=glibc"] + B2,
    "glibc_b4": ["memory.malloc=glibc"] + B4,
    "tuned4m": ["memory.malloc=tuned", "memory.mmap_threshold_kib=4096"] + B2,
    "tuned1m": ["memory.malloc=tuned", "memory.mmap_threshold_kib=1024"] + B2,
    "tuned64_b4": ["memory.malloc=tuned", "memory.mmap_threshold_kib=64"] + B4,
    "tuned64_thp": ["memory.malloc=tuned", "memory.mmap_threshold_kib=64"] + B2,
    "glibc_b1": ["memory.malloc=glibc"] + B1,
    "glibc_bf16": ["memory.malloc=glibc", "model.dtype=bfloat16"] + B2,
    "tuned4m_b1": ["memory.malloc=tuned", "memory.mmap_threshold_kib=4096"] + B1,
}
# environment of a side's process: torch's CPU allocator puts blocks of 2 MiB or more on transparent huge pages
SIDE_ENV = {"tuned64_thp": {"THP_MEM_ALLOC_ENABLE": "1"}}


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("spa-lite")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "spa_lite.cli"]


def run_side(name: str, sets: list[str], run_dir: Path, recipe: str, stage: str) -> dict:
    """One fresh stage process (seed-dpo, or train --iter 1 --force on a prepared run); its manifest's peak, its
    step times, the process's wall and CPU seconds (user, system: page faults are system time)."""
    args = [x for kv in sets for x in ("--set", kv)]
    env = {k: v for k, v in os.environ.items() if k not in ("SPA_LITE_MALLOC", "SPA_LITE_GLIBC_MALLOC",
                                                            "MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")}
    env.update(SIDE_ENV.get(name, {}))
    cmd = ["seed-dpo"] if stage == "seed" else ["train", "--iter", "1", "--force"]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(_cli() + cmd + ["--recipe", recipe, "--run-dir", str(run_dir)] + args, check=True,
                   env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    root = next(d for d in run_dir.iterdir() if (d / "seed").is_dir())
    d = root / ("seed" if stage == "seed" else "iter1/train")
    m = json.loads((d / "manifest.json").read_text())
    el = [json.loads(x)["elapsed_s"] for x in (d / "metrics.jsonl").read_text().splitlines() if x]
    steps = [b - a for a, b in zip([0.0] + el[:-1], el)]
    return {"peak_rss_gb": m["memory"]["peak_rss_gb"], "stage_wall_s": m["timings"]["wall_s"],
            "process_wall_s": round(wall, 2), "step_s": common.median(steps[1:] or steps),
            "step_times_s": [round(s, 2) for s in steps], "loadavg_1m": os.getloadavg()[0],
            "cpu_user_s": round(r1.ru_utime - r0.ru_utime, 2), "cpu_sys_s": round(r1.ru_stime - r0.ru_stime, 2),
            "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "malloc", repeats=2)
    p.add_argument("--recipe", default="smollm2-demo")
    p.add_argument("--sides", default="tuned64,glibc,glibc_b4,tuned4m")
    p.add_argument("--pairs", type=int, default=24, help="seed pairs: 3 optimizer steps of 8 pairs")
    p.add_argument("--set", action="append", default=[], help="more overrides for every side")
    p.add_argument("--stage", default="seed", choices=["seed", "train"],
                   help="train: `spa-lite train --iter 1 --force` in --run-dir, prepared with the same --set")
    p.add_argument("--run-dir", default=None, help="--stage train: a run with seed and iter1/expand complete")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.repeats = 8, 1
    machine = common.machine_info(args.threads, args.device)
    machine["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                 if ln.startswith("model name")), None)
    names = args.sides.split(",")
    common_sets = ([f"data.seed_limit={args.pairs}", "seed_dpo.epochs=1"] if args.stage == "seed" else []) + args.set
    if args.stage == "train":  # the sides' micro-batch settings apply to the train section
        for k in SIDES:  # the demo recipe's 4 pairs per optimizer step, as 2 x 2 or 1 x 4
            SIDES[k] = [x for x in SIDES[k] if not x.startswith("seed_dpo.")] + (TRAIN_B4 if k.endswith("_b4")
                                                                                 else TRAIN_B2)
    raw = {k: [] for k in names}
    tmp = Path(tempfile.mkdtemp(prefix="spa_malloc_"))
    try:
        for rep in range(args.repeats):
            for name in names:
                where = Path(args.run_dir) if args.stage == "train" else tmp / f"{name}_{rep}"
                r = run_side(name, common_sets + SIDES[name], where, args.recipe, args.stage)
                raw[name].append(r)
                print(f"[{rep + 1}/{args.repeats}] {name:10s} peak {r['peak_rss_gb']:.3f} GB, step {r['step_s']:.2f} s "
                      f"(steps {r['step_times_s']}), process {r['process_wall_s']:.1f} s, cpu user {r['cpu_user_s']:.0f} s "
                      f"sys {r['cpu_sys_s']:.0f} s, load {r['loadavg_1m']:.2f}",
                      flush=True)
                shutil.rmtree(tmp / f"{name}_{rep}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sides = {}
    for k, v in raw.items():
        sides[k + "_peak"] = common.side("stage peak RSS (manifest)", "GB", False, v, "peak_rss_gb")
        sides[k + "_step"] = common.side("median optimizer-step seconds after the first", "s", False, v, "step_s")
        sides[k + "_cpu"] = common.side("process CPU seconds (user + system)", "s", False, v, "cpu_s")
    ratios = []
    if "tuned64" in raw:
        for k in names:
            if k != "tuned64":
                r = common.ratio(f"{k} / tuned64 step time", k + "_step", "tuned64_step", sides, "<=", 1.0)
                r["informational"] = True
                ratios.append(r)
                r = common.ratio(f"{k} / tuned64 process CPU seconds", k + "_cpu", "tuned64_cpu", sides, "<=", 1.0)
                r["informational"] = True
                ratios.append(r)
    ratios += [{"name": f"{k} stage peak (GB) vs 2.5 GB", "numerator": k + "_peak", "denominator": None,
                "value": sides[k + "_peak"]["median"], "target": "<= 2.5",
                "pass": sides[k + "_peak"]["median"] <= 2.5} for k in names]
    notes = [f"sides: { {k: SIDES[k] for k in names} }; every side also {common_sets}.",
             "Each repeat of each side is a fresh process; sides interleaved in the order listed; the machine's "
             "other load is in each raw row (loadavg_1m after the side) and machine.loadavg_*."]
    common.write_result(args, "malloc", {"recipe": args.recipe, "stage": args.stage, "sides": names,
                                         "side_overrides": {k: SIDES[k] for k in names}, "pairs": args.pairs,
                                         "overrides": common_sets}, sides, ratios, notes, machine)


if __name__ == "__main__":
    main()
