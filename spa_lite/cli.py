"""The `spa-lite` command: parses options, loads the recipe, applies overrides, calls one stage.

Every command reads a YAML recipe (``--recipe``, a path or a shipped name) and ``--set section.key=value``
overrides; dedicated flags are shorthands for the common overrides.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from spa_lite.errors import SpaError

app = typer.Typer(
    name="spa-lite",
    help="SPA (Spread Preference Annotation) on one GPU: seed DPO, then expand (sample + judge) and train per iteration.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe YAML path or shipped name (recipes/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Run name (runs/<name>); overrides the recipe's.")]
RunDirOpt = Annotated[Optional[str], typer.Option("--run-dir", help="Parent folder of runs; overrides the recipe's.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if complete or made from another config.")]
IterOpt = Annotated[int, typer.Option("--iter", "-i", min=1, help="Iteration i (1-based).")]
ReportOpt = Annotated[Optional[str], typer.Option("--report-to", help="Trackers, comma-separated: tensorboard, wandb, "
                                                  "trackio or none; overrides the recipe's report_to.")]


def _expected(e: BaseException) -> str | None:
    """The one line for a failure caused by the environment or the input rather than by spa-lite, or None.

    Matched by class name along the MRO, so that no library is imported just to test for its errors.
    """
    import errno

    names = {c.__name__ for c in type(e).__mro__}
    cause = e.__cause__ or e.__context__
    if "OutOfMemoryError" in names:
        first = str(e).splitlines()[0] if str(e) else repr(e)
        return f"out of memory: {first}; lower the batch sizes (`spa-lite plan` estimates them)"
    if "HFValidationError" in names or "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return f"cannot reach the model or data set on the hub: {str(e).splitlines()[0]} (a local path must exist; " \
               f"set HF_HUB_OFFLINE=1 to work offline)"
    if "SafetensorError" in names:
        return f"damaged safetensors file: {e}"
    if "DatasetGenerationError" in names:
        return f"cannot read the data set: {cause or e}"
    if "UnicodeDecodeError" in names:
        return f"input is not UTF-8 text: {e}"
    if "JSONDecodeError" in names:
        return f"malformed JSON: {e}"
    if "EOFError" in names:
        return f"unexpected end of a file (a truncated download or compressed file?): {e or 'no more data'}"
    if isinstance(e, OSError):
        hint = {errno.ENOSPC: "free some space and rerun the same command to resume (nothing finished is lost)",
                errno.EDQUOT: "free some space and rerun the same command to resume (nothing finished is lost)",
                errno.EACCES: "check the permissions of that path (or choose another --run-dir)",
                errno.EPERM: "check the permissions of that path (or choose another --run-dir)",
                errno.EROFS: "the file system is read-only: choose another --run-dir"}.get(e.errno or -1)
        return f"{e}" + (f"; {hint}" if hint else "")
    return None


def _user_errors(fn):
    """The CLI's one error boundary. Expected failures (bad input, stage order, I/O, permissions, a full disk,
    decoding, hub access) print one red line and exit with code 2; anything else is a bug: its traceback is
    printed, then one line that says so, and the exit code is 1. Stage locks are released however a command ends.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import click

        from spa_lite.runs import release_stage_locks
        from spa_lite.ui import console

        def line(text: str, code: int):
            console.print(f"[bold red]error:[/] {text}", highlight=False, soft_wrap=True, markup=True)
            raise typer.Exit(code=code) from None

        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except SpaError as e:
            line(_escape(str(e)), 2)
        except KeyboardInterrupt as e:
            console.print(f"[yellow]interrupted[/] ({e or 'Ctrl-C'}); rerun the same command to resume")
            raise typer.Exit(code=130) from None
        except Exception as e:  # noqa: BLE001 - the boundary: every exception ends here, named or with its traceback
            msg = _expected(e)
            if msg is not None:
                line(_escape(msg), 2)
            import traceback

            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            line(_escape(f"unexpected {type(e).__name__} (a bug in spa-lite or a library, not in your input): {e}; "
                         f"the traceback above shows where"), 1)
        finally:
            release_stage_locks()

    return wrapper


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _recipe_arg(recipe: str, sets: list[str] | None, name: str | None, run_dir: str | None,
                extra: dict | None = None) -> str:
    """The recipe options of this command as a shell fragment, for the commands an error message suggests."""
    import shlex

    parts = [recipe]
    if name:
        parts += ["--name", name]
    if run_dir:
        parts += ["--run-dir", run_dir]
    for s_ in sets or []:
        parts += ["--set", s_]
    for k, v in (extra or {}).items():
        if v is not None:
            parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return " ".join(shlex.quote(p) for p in parts)


def _recipe(recipe: str, sets: list[str] | None, name: str | None, run_dir: str | None, extra: dict | None = None):
    from spa_lite.api import load_recipe

    overrides = dict(parse for parse in (_kv(s) for s in sets or []))
    overrides.update({k: v for k, v in (extra or {}).items() if v is not None})
    return load_recipe(recipe, overrides, name=name or None, run_dir=run_dir or None)


def _kv(text: str):
    from spa_lite.config import parse_override

    keys, value = parse_override(text)
    return ".".join(keys), value


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("SPA_LITE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # peft reads transformers' deprecated `is_gradient_checkpointing` alias: nothing a spa-lite user can act on
    # (the tests still show it). Every other warning stays visible.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; spa-lite shows its own progress
    except ImportError:
        pass


@app.command("seed-dpo")
@_user_errors
def seed_dpo_cmd(
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    loss: Annotated[Optional[str], typer.Option(help="dpo | dro")] = None,
    dro_epsilon: Annotated[Optional[float], typer.Option(help="Wasserstein radius for --loss dro.")] = None,
    dro_pieces: Annotated[Optional[int], typer.Option(help="Linear pieces approximating -log.")] = None,
    dro_xi_min: Annotated[Optional[float], typer.Option(help="Lower end of the support of xi.")] = None,
    report_to: ReportOpt = None,
) -> None:
    """DPO on the gold seed pairs: gives the `seed` adapter (pi_0).

    Example: spa-lite seed-dpo --recipe smollm2-demo --set seed_dpo.epochs=3
    """
    from spa_lite.stages import seed_dpo
    from spa_lite.stages.pipeline import stage_rows
    from spa_lite.ui import summary_table

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir, {"seed_dpo.loss": loss, "seed_dpo.dro_epsilon": dro_epsilon,
                                               "seed_dpo.dro_pieces": dro_pieces, "seed_dpo.dro_xi_min": dro_xi_min,
                                               "report_to": report_to})
    m = seed_dpo.run(r, force=force)
    summary_table("seed-dpo", stage_rows("seed", m))


@app.command("expand")
@_user_errors
def expand_cmd(
    iteration: IterOpt,
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    judge: Annotated[Optional[str], typer.Option(help="logprob (Eq. 7) | llm (LLM-as-judge prompt)")] = None,
    judge_ref: Annotated[Optional[str], typer.Option(help="init | prev | none: reference of Eq. 7")] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help="a in Eq. 13: reward - a*|y|")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Response length limit in tokens.")] = None,
    report_to: ReportOpt = None,
) -> None:
    """Sample 2 responses per prompt of X_i from pi_{i-1} and judge them (Eq. 7): writes D_i.

    Example: spa-lite expand --iter 1 --recipe smollm2-demo --judge-ref init
    """
    from spa_lite.stages import expand
    from spa_lite.stages.pipeline import stage_rows
    from spa_lite.ui import summary_table

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir, {"expand.judge": judge, "expand.judge_ref": judge_ref,
                                               "expand.length_penalty": length_penalty,
                                               "expand.max_new_tokens": max_new_tokens, "report_to": report_to})
    m = expand.run(r, iteration, force=force, recipe_arg=_recipe_arg(recipe, set_, name, run_dir, {
        "expand.judge": judge, "expand.judge_ref": judge_ref, "expand.length_penalty": length_penalty,
        "expand.max_new_tokens": max_new_tokens}))
    summary_table(f"expand --iter {iteration}", stage_rows(f"iter{iteration}/expand", m))


@app.command("train")
@_user_errors
def train_cmd(
    iteration: IterOpt,
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    refine: Annotated[Optional[bool], typer.Option("--refine/--no-refine", help="Self-refinement (Eq. 10).")] = None,
    dnd: Annotated[Optional[bool], typer.Option("--dnd/--no-dnd", help="De-coupled noise detection (Eq. 11-12).")] = None,
    loss: Annotated[Optional[str], typer.Option(help="dpo | dro")] = None,
    dro_epsilon: Annotated[Optional[float], typer.Option(help="Wasserstein radius for --loss dro.")] = None,
    dro_pieces: Annotated[Optional[int], typer.Option(help="Linear pieces approximating -log.")] = None,
    dro_xi_min: Annotated[Optional[float], typer.Option(help="Lower end of the support of xi.")] = None,
    report_to: ReportOpt = None,
) -> None:
    """Train pi_i from pi_{i-1} on D_i (pi_ref = pi_{i-1}) with self-refinement and DND.

    Example: spa-lite train --iter 1 --recipe smollm2-demo --no-dnd
    """
    from spa_lite.stages import train
    from spa_lite.stages.pipeline import stage_rows
    from spa_lite.ui import summary_table

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir, {"train.refine": refine, "train.dnd": dnd, "train.loss": loss,
                                               "train.dro_epsilon": dro_epsilon, "train.dro_pieces": dro_pieces,
                                               "train.dro_xi_min": dro_xi_min, "report_to": report_to})
    m = train.run(r, iteration, force=force, recipe_arg=_recipe_arg(recipe, set_, name, run_dir, {
        "train.refine": refine, "train.dnd": dnd, "train.loss": loss, "train.dro_epsilon": dro_epsilon,
        "train.dro_pieces": dro_pieces, "train.dro_xi_min": dro_xi_min}))
    summary_table(f"train --iter {iteration}", stage_rows(f"iter{iteration}/train", m))


@app.command("run")
@_user_errors
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML path or shipped name.")] = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    report_to: ReportOpt = None,
) -> None:
    """All stages: seed-dpo, then expand + train for iterations 1..T. Complete stages are skipped.

    Example: spa-lite run smollm2-demo
    """
    from spa_lite.stages import pipeline

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir, {"report_to": report_to})
    pipeline.run(r, force=force, recipe_arg=_recipe_arg(recipe, set_, name, run_dir))


@app.command("split")
@_user_errors
def split_cmd(
    data: Annotated[str, typer.Argument(help="Preference data: file, dataset folder or hub name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the split files.")],
    seed: Annotated[int, typer.Option(help="Shuffle seed (paper: 42).")] = 42,
    seed_size: Annotated[int, typer.Option(help="Gold seed pairs (paper: 2000).")] = 2000,
    iter_sizes: Annotated[str, typer.Option(help="Comma-separated prompt counts per iteration.")] = "8000,20000,30000",
    test_size: Annotated[int, typer.Option(help="Held-out test pairs.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="auto | conversational | standard | ultrafeedback | hh")] = "auto",
) -> None:
    """The paper's data protocol: shuffle, gold seed pairs, disjoint prompt sets per iteration, test pairs.

    Example: spa-lite split ultrafeedback.jsonl --out data/uf --seed-size 2000 --iter-sizes 8000,20000,30000
    """
    from spa_lite.stages import split
    from spa_lite.ui import summary_table

    try:
        sizes = [int(x) for x in iter_sizes.split(",") if x.strip()]
    except ValueError:
        raise SpaError(f"--iter-sizes '{iter_sizes}' must be comma-separated integers") from None
    counts = split.run(data, out, seed, seed_size, sizes, test_size, fmt)
    summary_table(f"split -> {out}", counts)


@app.command("eval")
@_user_errors
def eval_cmd(
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    pairs: Annotated[Optional[str], typer.Option(help="Gold pairs to judge (default: the recipe's data.eval_pairs).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Format of --pairs (auto-detected).")] = None,
    limit: Annotated[int, typer.Option(help="Use at most this many pairs.")] = 200,
    methods: Annotated[str, typer.Option(
        help="Judge methods: init,prev,none,llm (llm: the slow LLM-as-judge baseline).")] = "init,prev,none",
    flip: Annotated[float, typer.Option(help="Fraction of gold labels flipped for noise detection (0 to skip).")] = 0.2,
    lambdas: Annotated[Optional[str], typer.Option(help="DND lambdas to compare, e.g. 0.5,0.25,0.125.")] = None,
    pass_rate: Annotated[bool, typer.Option("--pass-rate/--no-pass-rate", help="Verifier pass rate (demo task).")] = True,
    prompt_limit: Annotated[int, typer.Option(help="Held-out prompts for the pass rate.")] = 100,
    samples: Annotated[int, typer.Option(help="Responses per held-out prompt (with --temperature > 0).")] = 1,
    temperature: Annotated[float, typer.Option(help="Decoding for the pass rate: 0 is greedy (paired across policies).")] = 0.0,
    tag: Annotated[Optional[str], typer.Option(help="Name of the result file runs/<name>/eval/<tag>.json.")] = None,
    report_to: ReportOpt = None,
) -> None:
    """Measure every policy of a run: judge accuracy (95% CI), noise detection (AUROC), self-labelling noise,
    verifier pass rate.

    Example: spa-lite eval --recipe smollm2-demo --pairs ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --limit 200
    """
    from spa_lite.stages import evaluate

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir, {"report_to": report_to})
    from spa_lite.config import plain_name_problem

    if tag is not None and plain_name_problem(tag, "--tag"):
        raise SpaError(plain_name_problem(tag, "--tag"))
    try:
        lam = [float(x) for x in lambdas.split(",")] if lambdas else None
    except ValueError:
        raise SpaError(f"--lambdas '{lambdas}' must be comma-separated numbers") from None
    rep = evaluate.run(r, pairs, fmt, limit, [m.strip() for m in methods.split(",") if m.strip()], flip, lam,
                       pass_rate, prompt_limit, samples, tag, temperature=temperature)
    evaluate.print_report(rep)


@app.command("winrate")
@_user_errors
def winrate_cmd(
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    policy: Annotated[str, typer.Option(help="Candidate policy: last, init, 0, 1, ...")] = "last",
    reference: Annotated[str, typer.Option(help="Reference policy: init, 0, 1, ...")] = "init",
    judge: Annotated[str, typer.Option(help="verifier (demo task) | local (LLM-as-judge with pi_init) | http")] = "verifier",
    judge_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL for --judge http.")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="Model name at --judge-url.")] = None,
    judge_key_env: Annotated[str, typer.Option(help="Environment variable holding the API key.")] = "OPENAI_API_KEY",
    prompts: Annotated[Optional[str], typer.Option(help="Prompt file (default: the recipe's eval prompts).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many prompts.")] = 100,
) -> None:
    """Win rate of one policy's responses against another's under a pairwise judge (95% CI); judge calls
    are cached under RUN/eval/winrate_cache, so an interrupted evaluation resumes.

    Example: spa-lite winrate --recipe smollm2-demo --policy 2 --reference init --judge verifier
    """
    from spa_lite import winrate as wr
    from spa_lite.api import resolve_policy
    from spa_lite.data import load_prompts
    from spa_lite.evaluation import policy_names
    from spa_lite.generation import sample_responses
    from spa_lite.io import atomic_write_json
    from spa_lite.stages.common import load_stack
    from spa_lite.stages.evaluate import complete_policies
    from spa_lite.ui import console

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir)
    ks = complete_policies(r)
    cand_k, ref_k = resolve_policy(r, policy), resolve_policy(r, reference)
    spec = prompts or r.data.eval_prompts
    if not spec:
        raise SpaError("no prompts: give --prompts or set data.eval_prompts in the recipe")
    recs = load_prompts(spec)[:limit]
    stack = load_stack(r, frozen_upto=max(ks) if ks else -1)
    outs = {}
    from spa_lite.ui import task

    with task("winrate: responses of both policies", 2 * len(recs)) as advance:
        for k in (cand_k, ref_k):
            with stack.use(policy_names(k)) as m:
                outs[k] = [ss[0].text for ss in sample_responses(
                    m, stack.tokenizer, [x["prompt"] for x in recs], num_samples=1,
                    max_new_tokens=r.expand.max_new_tokens, temperature=r.expand.temperature, seed=r.seed,
                    batch_size=r.expand.batch_size, on_batch=advance)]
    cache = r.run_path / "eval" / "winrate_cache"
    if judge == "verifier":
        if not all("constraint" in x for x in recs):
            raise SpaError("--judge verifier needs prompts with a 'constraint' (the demo task)")
        j = wr.VerifierJudge()
    elif judge == "local":
        j = wr.LocalLLMJudge(stack, [])
    elif judge == "http":
        if not judge_url or not judge_model:
            raise SpaError("--judge http needs --judge-url and --judge-model")
        j = wr.HTTPJudge(judge_url, judge_model, api_key_env=judge_key_env, cache_dir=cache)
    else:
        raise SpaError(f"--judge '{judge}' is not verifier, local or http")
    with task(f"winrate: {judge} judge", len(recs)) as advance:
        res = wr.win_rate_eval(outs[cand_k], outs[ref_k], [x["prompt"] for x in recs], j,
                               metadata=[{"constraint": x.get("constraint")} for x in recs], on_batch=advance)
    label = lambda k: "pi_init" if k is None else f"pi_{k}"  # noqa: E731
    tag = f"winrate_{label(cand_k)}_vs_{label(ref_k)}_{judge}"
    atomic_write_json(r.run_path / "eval" / f"{tag}.json",
                      {k: v for k, v in res.items() if k != "items"} | {"items": res["items"]})
    console.print(f"{label(cand_k)} vs {label(ref_k)} ({judge} judge, n={res['n']}): win rate {res['win_rate']:.3f} "
                  f"[{res['ci_low']:.2f}, {res['ci_high']:.2f}], wins {res['wins']}, ties {res['ties']}, losses {res['losses']}")


@app.command("report")
@_user_errors
def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/smollm2-demo.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/report).")] = None,
) -> None:
    """Markdown report with PNG plots: judge accuracy and pass rate per policy, judged confidence per iteration,
    flagged fraction and tau over training, response lengths.

    Example: spa-lite report runs/smollm2-demo
    """
    from spa_lite.report import write_report
    from spa_lite.ui import console

    path = write_report(run, out)
    console.print(f"report: {path}")


@app.command("export-answers")
@_user_errors
def export_answers_cmd(
    questions: Annotated[Path, typer.Argument(help="AlpacaEval questions (JSON list) or MT-Bench question.jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model_outputs.json (AlpacaEval) or answer JSONL (MT-Bench).")],
    benchmark: Annotated[str, typer.Option(help="alpaca-eval | mt-bench")] = "alpaca-eval",
    policy: Annotated[str, typer.Option(help="Which policy answers: init, 0 (seed), 1, 2, ...")] = "last",
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 1024,
    temperature: Annotated[Optional[float], typer.Option(
        help="Default: 0 for AlpacaEval, FastChat's per category for MT-Bench.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Answer only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions per generation batch.")] = 8,
) -> None:
    """Answer a benchmark's questions with a policy of the run, in the official evaluators' formats.

    Example: spa-lite export-answers alpaca_eval.json --out outputs.json --policy 2 --recipe smollm2-demo
    """
    from spa_lite import export
    from spa_lite.api import resolve_policy
    from spa_lite.evaluation import policy_names
    from spa_lite.stages.common import load_stack
    from spa_lite.stages.evaluate import complete_policies
    from spa_lite.ui import console

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir)
    ks = complete_policies(r)
    k = resolve_policy(r, policy)
    if benchmark == "alpaca-eval":
        n_answers = len(export.read_alpaca_eval_questions(questions)[:limit])
    elif benchmark == "mt-bench":
        n_answers = sum(len(q["turns"]) for q in export.read_mt_bench_questions(questions)[:limit])
    else:
        raise SpaError(f"--benchmark '{benchmark}' is not alpaca-eval or mt-bench")
    stack = load_stack(r, frozen_upto=max(ks) if ks else -1)
    model_id = f"{r.name}-{'pi_init' if k is None else f'pi_{k}'}"
    from spa_lite.ui import task

    with task(f"answers by {model_id}", n_answers, info=benchmark) as advance:
        gen = export.make_generate(stack, policy_names(k), max_new_tokens, batch_size, r.seed, on_batch=advance)
        if benchmark == "alpaca-eval":
            rows = export.export_alpaca_eval(questions, out, gen, model_id, temperature=temperature or 0.0, limit=limit)
        else:
            rows = export.export_mt_bench(questions, out, gen, model_id, temperature=temperature, limit=limit)
    console.print(f"{len(rows)} answers by {model_id} written to {out}")


@app.command("plan")
@_user_errors
def plan_cmd(
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    model: Annotated[Optional[str], typer.Option(
        help="Model folder, hub id, bundled alias or config.json (default: the recipe's).")] = None,
    gpu_mem: Annotated[float, typer.Option(help="GPU memory in GB to plan for.")] = 16.0,
    quantization: Annotated[str, typer.Option(help="4bit | none")] = "4bit",
    fsdp: Annotated[int, typer.Option(
        min=1, help="Processes that seed-dpo and train shard over (FSDP2; full-precision bases only).")] = 1,
) -> None:
    """Estimated peak memory of each stage, and the batch / accumulation / checkpointing / length that fit.

    Example: spa-lite plan --recipe recipes/zephyr-7b-qlora.yaml --gpu-mem 16
             spa-lite plan --model meta-llama/Llama-3.1-70B --quantization none --fsdp 8 --gpu-mem 80
    """
    from rich.table import Table

    from spa_lite.api import plan
    from spa_lite.logps import chunked_kernel_available
    from spa_lite.ui import console

    r = _recipe(recipe, set_, None, None)
    res = plan(r, model=model, gpu_mem=gpu_mem, quantization=quantization, fsdp=fsdp)
    src = res["source"]
    t = Table(title=f"memory plan: {src} on {gpu_mem:g} GB ({quantization}" + (f", FSDP over {fsdp})" if fsdp > 1 else ")"))
    for c in ("stage", "peak GB", "fits", "largest parts"):
        t.add_column(c)
    for name, st in res["plan"]["stages"].items():
        parts = sorted(st["parts"].items(), key=lambda kv: -kv[1])[:3]
        t.add_row(name, f"{st['peak_gb']:.2f}", "yes" if st["fits"] else "[red]no[/]",
                  ", ".join(f"{k} {v:.2f}" for k, v in parts))
    console.print(t)
    if not chunked_kernel_available():
        console.print("log-probs: full logits (the installed trl has no chunked log-prob kernel; trl>=1.15 has it)")
    verdict = "fits" if res["fits"] else "does NOT fit even with the smallest settings"
    console.print(f"{verdict}: batch_size {res['batch_size']} x grad_accum {res['grad_accum']} "
                  f"(effective {res['effective_batch']}), gradient_checkpointing {res['gradient_checkpointing']}, "
                  f"max_length {res['seq_len']}, expand batch {res['gen_batch_size']}, judge batch {res['judge_batch_size']}"
                  + (f"; changed: {', '.join(res['changed'])}" if res["changed"] else ""))


@app.command("export")
@_user_errors
def export_cmd(
    iteration: Annotated[int, typer.Option("--iter", "-i", min=0, help="Export pi_i (0 = seed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    recipe: RecipeOpt = "smollm2-demo",
    set_: SetOpt = None,
    name: NameOpt = None,
    run_dir: RunDirOpt = None,
    merged: Annotated[bool, typer.Option(
        "--merged/--adapter", help="A merged bf16 model, or one LoRA adapter (ranks concatenated).")] = True,
    dtype: Annotated[str, typer.Option(help="Merged weights dtype: bfloat16 | float16 | float32.")] = "bfloat16",
) -> None:
    """Export pi_i: a merged full model with a model card, or the adapter stack as one exact LoRA adapter (for vLLM).

    Example: spa-lite export --iter 2 --out exported/pi2 --recipe smollm2-demo
    """
    import torch

    from spa_lite.merge import export_merged, export_single_adapter
    from spa_lite.stages.evaluate import complete_policies
    from spa_lite.ui import console

    _setup_logging()
    r = _recipe(recipe, set_, name, run_dir)
    if iteration not in complete_policies(r):
        raise SpaError(f"pi_{iteration} is not complete in {r.run_path}; run its stages first")
    from spa_lite.ui import task

    with task(f"export pi_{iteration} ({'merged' if merged else 'adapter'})", 1, info=str(out)) as advance:
        if merged:
            dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
            if dt is None:
                raise SpaError(f"--dtype '{dtype}' is not bfloat16, float16 or float32")
            path = export_merged(r, iteration, out, dtype=dt)
        else:
            path = export_single_adapter(r, iteration, out)
        advance()
    console.print(f"exported pi_{iteration} to {path}")


recipes_app = typer.Typer(help="Shipped recipes: list them, or copy one out to edit (`spa-lite recipes copy NAME [DEST]`).",
                          no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
@_user_errors
def recipes_cmd(ctx: typer.Context) -> None:
    """List the shipped recipes, one line each (name and description).

    Example: spa-lite recipes
    """
    if ctx.invoked_subcommand is not None:
        return
    from spa_lite.config import recipe_description, shipped_recipes

    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, path in recipes.items():
        typer.echo(f"{name:<{width}}  {recipe_description(path)}")


@recipes_app.command("copy")
@_user_errors
def recipes_copy_cmd(
    name: Annotated[str, typer.Argument(help="Shipped recipe name (see `spa-lite recipes`).")],
    dest: Annotated[Optional[Path], typer.Argument(help="File or folder to write (default ./NAME.yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a shipped recipe to a file to edit, then run it with --recipe PATH.

    Example: spa-lite recipes copy zephyr-7b-qlora my-run.yaml
    """
    from spa_lite.config import copy_recipe

    typer.echo(f"wrote {copy_recipe(name, dest, force)}")


@app.command("doctor")
@_user_errors
def doctor_cmd(run_dir: RunDirOpt = None) -> None:
    """What this machine can run: torch, CUDA, bitsandbytes, vLLM, memory, disk, the bundled model.

    Example: spa-lite doctor
    """
    from rich.table import Table

    from spa_lite.doctor import checks
    from spa_lite.ui import console

    t = Table(title="spa-lite doctor")
    for c in ("item", "status", "detail"):
        t.add_column(c)
    colors = {"ok": "green", "warn": "yellow", "missing": "red"}
    for item, status, detail in checks(run_dir or "runs"):
        t.add_row(item, f"[{colors[status]}]{status}[/]", detail)
    console.print(t)


def main() -> None:
    app(prog_name="spa-lite")


if __name__ == "__main__":
    sys.exit(main())
