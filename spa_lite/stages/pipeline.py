"""`spa-lite run`: seed DPO (and the reward model, where expand's judge needs it), then expand and train for
iterations 1..T; complete stages are skipped.

Each stage loads its own stack and drops it when it returns; between stages the dropped model is collected
and its memory handed back to the OS (``release_memory``), so the run's peak is one stage's peak, not the sum
of the stages'. Each manifest records its stage's peak resident memory ("memory").
"""

from __future__ import annotations

import os
import time

from spa_lite.config import REWARD_JUDGES, Recipe
from spa_lite.distributed import get_dist
from spa_lite.memory import release_memory
from spa_lite.runs import dump_recipe
from spa_lite.stages import expand, reward, seed_dpo, train
from spa_lite.ui import console, interactive, summary_table


def _reasons(counts: dict | None) -> str:
    """Skipped records by reason, as one cell: ``2 (empty_prompt 1, identical 1)``, or 0."""
    counts = {k: v for k, v in (counts or {}).items() if v}
    if not counts:
        return "0"
    return f"{sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})"


def stage_rows(key: str, manifest: dict) -> dict:
    s = manifest.get("summary", {})
    rows = {"stage": key, "wall s": manifest.get("timings", {}).get("wall_s"),
            "peak RSS GB": manifest.get("memory", {}).get("peak_rss_gb")}
    if "heldout" in s:  # the reward model
        last = s.get("last10", {})
        rows.update({"pairs used": s.get("pairs_used"), "steps": s.get("steps"), "first loss": s.get("first_loss"),
                     "loss (last 10)": last.get("loss"), "held-out accuracy": s["heldout"].get("accuracy"),
                     "held-out pairs": s["heldout"].get("pairs")})
    elif "pairs" in s and "steps" not in s:
        rows.update({k: s.get(k) for k in ("pairs", "identical", "truncated", "prompt_too_long", "mean_confidence",
                                           "mean_len_chosen", "mean_len_rejected")})
        rows["prompts dropped (pool)"] = _reasons(s.get("pool_dropped"))
    else:
        last = s.get("last10", {})
        if "pairs_dropped" in s:
            rows["pairs dropped"] = _reasons(s.get("pairs_dropped"))
        rows.update({"pairs used": s.get("pairs_used"), "skipped (length)": s.get("pairs_skipped_length"),
                     "truncated (length)": s.get("pairs_truncated"),
                     "steps": s.get("steps"), "first loss": s.get("first_loss"), "loss (last 10)": last.get("loss"),
                     "reward margin (last 10)": last.get("reward_margin"),
                     "flagged (last 10)": last.get("flagged_frac")})
    return rows


def run(recipe: Recipe, force: bool = False, recipe_arg: str = "RECIPE") -> list[tuple[str, dict]]:
    t0 = time.time()
    dist = get_dist()
    show = summary_table if dist.main else (lambda *a: None)
    dump_recipe(recipe)
    done = []
    # a log line per stage where no live bar is drawn (output to a file)
    log_lines = dist.main and not interactive() and not os.environ.get("SPA_LITE_QUIET")
    steps = [("seed", "seed-dpo", lambda: seed_dpo.run(recipe, force=force))]
    if recipe.expand.judge in REWARD_JUDGES:  # expand's judge: the reward model, trained once on D0
        steps.append(("reward", "reward", lambda: reward.run(recipe, force=force)))
    for i in range(1, recipe.iterations + 1):
        steps.append((f"iter{i}/expand", f"expand --iter {i}",
                      lambda i=i: expand.run(recipe, i, force=force, recipe_arg=recipe_arg)))
        steps.append((f"iter{i}/train", f"train --iter {i}",
                      lambda i=i: train.run(recipe, i, force=force, recipe_arg=recipe_arg)))
    for n, (key, title, fn) in enumerate(steps, 1):
        release_memory()  # the previous stage's model, before this stage loads its own
        if log_lines:
            console.log(f"stage {n}/{len(steps)} {title}: start")
        m = fn()
        done.append((key, m))
        if log_lines:
            console.log(f"stage {n}/{len(steps)} {title}: {m.get('status')} in {m.get('timings', {}).get('wall_s')} s, "
                f"peak RSS {m.get('memory', {}).get('peak_rss_gb')} GB")
        show(title, stage_rows(key, m))
    release_memory()
    console.print(f"[bold green]run complete[/] in {time.time() - t0:.0f} s: {recipe.run_path}")
    return done
