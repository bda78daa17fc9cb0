"""The quick start as a user runs it: `spa-lite run smollm2-demo`, then `spa-lite eval`; each stage's peak
resident memory (its manifest's ``memory.peak_rss_gb``), wall times and the load average.

Every stage runs in the one `spa-lite run` process (as the quick start does), so the run's peak is the
largest stage peak. Target (issue 13): every stage's peak <= 2.5 GB. Issue 9's target for evaluation time:
`spa-lite eval` takes at most half the run's wall time.

    python bench/bench_quickstart.py [--set KEY=VALUE ...] [--no-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STAGES = ["seed", "iter1/expand", "iter1/train", "iter2/expand", "iter2/train"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p, "quickstart", repeats=1)
    p.add_argument("--recipe", default="smollm2-demo")
    p.add_argument("--set", action="append", default=[], help="recipe overrides, as `spa-lite run --set`")
    p.add_argument("--run-dir", default=None, help="where the run goes (default: a fresh temporary folder)")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--target-gb", type=float, default=2.5)
    args = p.parse_args(argv)
    machine = common.machine_info(args.threads, args.device)
    exe = Path(sys.executable).with_name("spa-lite")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "spa_lite.cli"]
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="spa_quickstart_"))
    if args.quick:
        args.set += ["data.seed_limit=8", "data.iter_prompts=[4,4]", "expand.max_new_tokens=8", "seed_dpo.epochs=1"]
    sets = [x for kv in args.set for x in ("--set", kv)]
    load0 = list(os.getloadavg())
    walls, loads = {}, {}
    for name, cmd in [("run", ["run", args.recipe]), ("eval", ["eval", "--recipe", args.recipe])]:
        if name == "eval" and args.no_eval:
            continue
        t0 = time.perf_counter()
        subprocess.run(cli + cmd + ["--run-dir", str(run_dir)] + sets, check=True)
        walls[name] = time.perf_counter() - t0
        loads[name] = os.getloadavg()[0]
        print(f"{name}: {walls[name]:.1f} s (load {loads[name]:.2f})", flush=True)
    root = next(d for d in run_dir.iterdir() if (d / "seed").is_dir())
    raw = {}
    for st in STAGES:
        m = json.loads((root / st / "manifest.json").read_text())
        raw[st.replace("/", "_")] = [{"peak_rss_gb": m["memory"]["peak_rss_gb"], "wall_s": m.get("timings", {}).get("wall_s"),
                                     "peak_is_stage": m["memory"].get("peak_is_stage"), "malloc": m["memory"].get("malloc"),
                                     "summary_sample_dtype": m.get("summary", {}).get("sample_dtype")}]
    sides = {k: common.side("stage peak RSS (manifest)", "GB", False, v, "peak_rss_gb") for k, v in raw.items()}
    sides["run_wall"] = common.side("wall seconds of `spa-lite run`", "s", False,
                                    [{"wall_s": walls["run"], "loadavg_1m": loads["run"]}], "wall_s")
    if "eval" in walls:
        sides["eval_wall"] = common.side("wall seconds of `spa-lite eval`", "s", False,
                                         [{"wall_s": walls["eval"], "loadavg_1m": loads["eval"]}], "wall_s")
    peak = max(sides[k]["median"] for k in raw)
    sides["run_peak"] = common.side("largest stage peak RSS", "GB", False, [{"peak_rss_gb": peak}], "peak_rss_gb")
    ratios = [{"name": f"largest stage peak (GB) vs {args.target_gb} GB", "numerator": "run_peak",
               "denominator": None, "value": peak, "target": f"<= {args.target_gb}", "pass": peak <= args.target_gb}]
    if "eval" in walls:
        ratios.append(common.ratio("eval wall / run wall", "eval_wall", "run_wall", sides, "<=", 0.5))
    notes = [f"run folder {run_dir}; overrides {args.set or 'none'}; load average at start {load0}, "
             f"after run {loads.get('run')}, after eval {loads.get('eval')}.",
             "Peaks are absolute resident memory (interpreter, torch, model and the stage's work), each stage's "
             "high-water mark reset at its start (Linux clear_refs), as the manifests report them."]
    common.write_result(args, "quickstart", {"recipe": args.recipe, "overrides": args.set, "stages": STAGES},
                        sides, ratios, notes, machine)
    if args.run_dir is None and args.quick:
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
