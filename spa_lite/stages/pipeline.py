"""`spa-lite run`: seed DPO, then expand and train for iterations 1..T; complete stages are skipped."""

from __future__ import annotations

import time

from spa_lite.config import Recipe
from spa_lite.runs import dump_recipe
from spa_lite.stages import expand, seed_dpo, train
from spa_lite.distributed import get_dist
from spa_lite.ui import console, summary_table


def stage_rows(key: str, manifest: dict) -> dict:
    s = manifest.get("summary", {})
    rows = {"stage": key, "wall s": manifest.get("timings", {}).get("wall_s")}
    if "pairs" in s and "steps" not in s:
        rows.update({k: s.get(k) for k in ("pairs", "identical", "truncated", "mean_confidence",
                                           "mean_len_chosen", "mean_len_rejected")})
    else:
        last = s.get("last10", {})
        rows.update({"pairs used": s.get("pairs_used"), "skipped (length)": s.get("pairs_skipped_length"),
                     "steps": s.get("steps"), "first loss": s.get("first_loss"), "loss (last 10)": last.get("loss"),
                     "reward margin (last 10)": last.get("reward_margin"),
                     "flagged (last 10)": last.get("flagged_frac")})
    return rows


def run(recipe: Recipe, force: bool = False, recipe_arg: str = "RECIPE") -> list[tuple[str, dict]]:
    t0 = time.time()
    show = summary_table if get_dist().main else (lambda *a: None)
    dump_recipe(recipe)
    done = []
    m = seed_dpo.run(recipe, force=force)
    done.append(("seed", m))
    show("seed-dpo", stage_rows("seed", m))
    for i in range(1, recipe.iterations + 1):
        m = expand.run(recipe, i, force=force, recipe_arg=recipe_arg)
        done.append((f"iter{i}/expand", m))
        show(f"expand --iter {i}", stage_rows(f"iter{i}/expand", m))
        m = train.run(recipe, i, force=force, recipe_arg=recipe_arg)
        done.append((f"iter{i}/train", m))
        show(f"train --iter {i}", stage_rows(f"iter{i}/train", m))
    console.print(f"[bold green]run complete[/] in {time.time() - t0:.0f} s: {recipe.run_path}")
    return done
