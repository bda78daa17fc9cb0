"""`spa-lite seed-dpo | reward | expand | train | run | eval | split`: run a stage, then print its summary."""

from __future__ import annotations

from pathlib import Path

from spa_lite.config import plain_name_problem
from spa_lite.errors import SpaError
from spa_lite.stages import evaluate, expand, pipeline, reward, seed_dpo, split, train
from spa_lite.stages.pipeline import stage_rows
from spa_lite.tasks import RecipeArgs, setup_logging
from spa_lite.ui import summary_table


def run_seed_dpo(args: RecipeArgs, force: bool) -> dict:
    setup_logging()
    m = seed_dpo.run(args.load(), force=force)
    summary_table("seed-dpo", stage_rows("seed", m))
    return m


def run_reward(args: RecipeArgs, force: bool) -> dict:
    setup_logging()
    m = reward.run(args.load(), force=force)
    summary_table("reward", stage_rows("reward", m))
    return m


def run_expand(args: RecipeArgs, iteration: int, force: bool) -> dict:
    setup_logging()
    m = expand.run(args.load(), iteration, force=force, recipe_arg=args.shell())
    summary_table(f"expand --iter {iteration}", stage_rows(f"iter{iteration}/expand", m))
    return m


def run_train(args: RecipeArgs, iteration: int, force: bool) -> dict:
    setup_logging()
    m = train.run(args.load(), iteration, force=force, recipe_arg=args.shell())
    summary_table(f"train --iter {iteration}", stage_rows(f"iter{iteration}/train", m))
    return m


def run_all(args: RecipeArgs, force: bool) -> list[tuple[str, dict]]:
    setup_logging()
    return pipeline.run(args.load(), force=force, recipe_arg=args.shell())


def _numbers(text: str | None, kind, option: str, what: str) -> list | None:
    """A comma-separated option as a list, or None when not given; a clear error naming the option."""
    if not text:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpaError(f"{option} '{text}' must be comma-separated {what}") from None


def run_eval(args: RecipeArgs, *, pairs: str | None, fmt: str | None, limit: int, methods: str, flip: float,
             lambdas: str | None, pass_rate: bool, prompt_limit: int, samples: int, temperature: float,
             tag: str | None, audit_only: bool = False) -> dict:
    setup_logging()
    recipe = args.load()
    if tag is not None and plain_name_problem(tag, "--tag"):
        raise SpaError(plain_name_problem(tag, "--tag"))
    rep = evaluate.run(recipe, pairs, fmt, limit, methods=[m.strip() for m in methods.split(",") if m.strip()],
                       flip=flip, lambdas=_numbers(lambdas, float, "--lambdas", "numbers"), do_pass_rate=pass_rate,
                       prompt_limit=prompt_limit, samples=samples, tag=tag, temperature=temperature,
                       audit_only=audit_only)
    evaluate.print_report(rep)
    return rep


def run_split(data: str, out: Path, *, seed: int, seed_size: int, iter_sizes: str, test_size: int, fmt: str) -> dict:
    setup_logging()
    sizes = _numbers(iter_sizes, int, "--iter-sizes", "integers") or []
    counts = split.run(data, out, seed, seed_size, sizes, test_size, fmt)
    summary_table(f"split -> {out}", counts)
    return counts
