"""`spa-lite export-answers`: a policy of the run answers a benchmark's questions in the official formats."""

from __future__ import annotations

from pathlib import Path

from spa_lite import export
from spa_lite.errors import SpaError
from spa_lite.layout import complete_policies, policy_label, policy_names, resolve_policy
from spa_lite.loading import load_stack
from spa_lite.tasks import RecipeArgs, setup_logging
from spa_lite.ui import console, task

BENCHMARKS = ("alpaca-eval", "mt-bench")


def count_answers(benchmark: str, questions: Path, limit: int | None) -> int:
    """How many answers ``benchmark``'s question file asks for (MT-Bench: one per turn)."""
    if benchmark == "alpaca-eval":
        return len(export.read_alpaca_eval_questions(questions)[:limit])
    if benchmark == "mt-bench":
        return sum(len(q["turns"]) for q in export.read_mt_bench_questions(questions)[:limit])
    raise SpaError(f"--benchmark '{benchmark}' is not alpaca-eval or mt-bench")


def run_export_answers(args: RecipeArgs, questions: Path, out: Path, *, benchmark: str, policy: str,
                       max_new_tokens: int, temperature: float | None, limit: int | None, batch_size: int) -> list[dict]:
    setup_logging()
    r = args.load()
    ks = complete_policies(r)
    k = resolve_policy(r, policy)
    n_answers = count_answers(benchmark, questions, limit)
    stack = load_stack(r, frozen_upto=max(ks) if ks else -1)
    model_id = f"{r.name}-{policy_label(k)}"
    with task(f"answers by {model_id}", n_answers, info=benchmark) as advance:
        gen = export.make_generate(stack, policy_names(k), max_new_tokens, batch_size, r.seed, on_batch=advance,
                                   sample_dtype=r.expand.sample_dtype)
        if benchmark == "alpaca-eval":
            rows = export.export_alpaca_eval(questions, out, gen, model_id, temperature=temperature or 0.0, limit=limit)
        else:
            rows = export.export_mt_bench(questions, out, gen, model_id, temperature=temperature, limit=limit)
    console.print(f"{len(rows)} answers by {model_id} written to {out}")
    return rows
