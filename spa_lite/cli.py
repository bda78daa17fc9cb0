"""The `spa-lite` command: parses options, calls one function of the Python API (``spa_lite.api``) per command and
prints its result; the CLI and the API cannot drift, since the CLI does nothing else.

Every command reads a YAML recipe (``--recipe``, a path or a shipped name) and ``--set section.key=value``
overrides; dedicated flags are shorthands for common overrides, with the recipe field's help text. The options of
eval, winrate, export-answers, plan and split are generated from their dataclasses in ``spa_lite.options`` (the
one definition: default, help, bounds, choices), and validated there by the API. The API (and torch with it) is
imported when a command runs, so that `spa-lite --help` does not load torch.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shlex
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.markup import escape
from rich.table import Table

from spa_lite.config import Recipe, field_help, parse_overrides
from spa_lite.errors import SpaError, expected_failure
from spa_lite.options import (
    EvalOptions,
    ExportAnswersOptions,
    Options,
    PlanOptions,
    SplitOptions,
    WinrateOptions,
    cli_parameters,
)
from spa_lite.ui import console, summary_table


class _LazyAPI:
    """``spa_lite.api``, imported on first use (it loads torch)."""

    def __getattr__(self, name: str):
        from spa_lite import api as module

        return getattr(module, name)


api = _LazyAPI()

app = typer.Typer(name="spa-lite", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="SPA (Spread Preference Annotation) on one GPU: seed DPO, then expand (sample + judge) and "
                       "train per iteration.")


@dataclass
class RecipeArgs:
    """The recipe options every command shares, as given on the command line.

    Args:
        recipe: a YAML path or a shipped recipe name.
        sets: ``section.key=value`` overrides (``--set``), in order.
        name, run_dir: ``--name`` and ``--run-dir`` (None: the recipe's).
        shorthands: ``section.key`` -> value of a command's dedicated flags (``--loss``, ``--judge-ref``, ...);
            None means the flag was not given.
    """

    recipe: str
    sets: list[str] | None = None
    name: str | None = None
    run_dir: str | None = None
    shorthands: dict = field(default_factory=dict)

    def load(self) -> Recipe:
        """The recipe with ``--set`` overrides, then the shorthands, then ``--name`` and ``--run-dir`` applied."""
        overrides = parse_overrides(self.sets) | {k: v for k, v in self.shorthands.items() if v is not None}
        recipe = api.load_recipe(self.recipe, overrides, name=self.name or None, run_dir=self.run_dir or None)
        recipe.rerun_args = self.shell()  # every rerun command an error suggests repeats these options
        return recipe

    def shell(self) -> str:
        """These options as a shell fragment (``report_to`` left out), for the commands an error message suggests."""
        parts = [self.recipe]
        if self.name:
            parts += ["--name", self.name]
        if self.run_dir:
            parts += ["--run-dir", self.run_dir]
        for s in self.sets or []:
            parts += ["--set", s]
        for k, v in self.shorthands.items():
            if v is not None and k != "report_to":
                parts += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
        return " ".join(shlex.quote(p) for p in parts)


def setup_logging() -> None:
    """Log level from ``SPA_LITE_LOG`` (default WARNING); the libraries' chatter and progress bars off."""
    logging.basicConfig(level=os.environ.get("SPA_LITE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # datasets logs a damaged Parquet file as ERROR lines before it raises; spa-lite reports that error once
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft reads transformers' deprecated `is_gradient_checkpointing` alias: nothing a spa-lite user can act on
    # (the tests still show it). Every other warning stays visible.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging  # seconds to import: only for commands that run
    except ImportError:
        return
    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars; spa-lite shows its own progress


def user_errors(fn):
    """The one error boundary of every command. Expected failures (bad input, stage order, I/O, permissions, a
    full disk, decoding, hub access) print one red line and exit with code 2; anything else is a bug: its
    traceback is printed, then one line that says so, and the exit code is 1. Stage locks are released however
    a command ends.
    """

    def line(text: str, code: int):
        console.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(code=code) from None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except SpaError as e:
            line(str(e), 2)
        except KeyboardInterrupt as e:
            console.print(f"[yellow]interrupted[/] ({escape(str(e)) or 'Ctrl-C'}); rerun the same command to resume")
            raise typer.Exit(code=130) from None
        except Exception as e:  # noqa: BLE001 - the boundary: every exception ends here, named or with its traceback
            msg = expected_failure(e)
            if msg is not None:
                line(msg, 2)
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            line(f"unexpected {type(e).__name__} (a bug in spa-lite or a library, not in your input): {e}; "
                 f"the traceback above shows where", 1)

    return wrapper


def _with_options(cls: type[Options]):
    """A command whose options are the fields of ``cls`` (one CLI parameter each, from ``cli_parameters``) besides
    its own parameters; it receives them as keyword arguments (``**options``), for the API to validate."""

    def wrap(fn):
        own = [p.replace(kind=p.KEYWORD_ONLY) for p in inspect.signature(fn, eval_str=True).parameters.values()
               if p.kind != p.VAR_KEYWORD]
        generated = cli_parameters(cls)
        required = [p for p in generated if p.default is p.empty]
        params = required + own + [p for p in generated if p.default is not p.empty]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(**kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


RecipeOpt = Annotated[str, typer.Option("--recipe", "-r", help="Recipe YAML path or shipped name (recipes/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: section.key=value (repeatable).")]
NameOpt = Annotated[Optional[str], typer.Option("--name", help="Run name (runs/<name>); overrides the recipe's.")]
RunDirOpt = Annotated[Optional[str], typer.Option("--run-dir", help="Parent folder of runs; overrides the recipe's.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if complete or made from another config.")]
IterOpt = Annotated[int, typer.Option("--iter", "-i", min=1, help="Iteration i (1-based).")]
ReportOpt = Annotated[Optional[str], typer.Option("--report-to", help="Trackers, comma-separated: tensorboard, wandb, "
                                                  "trackio or none; overrides the recipe's report_to.")]


def _key(section: str, key: str, *decls: str):
    """A shorthand flag for recipe key ``section.key``, with that field's help text (None: not given)."""
    return typer.Option(*decls, help=field_help(section, key))


def _command(name: str):
    """Register a command of ``app`` behind the one error boundary (``user_errors``)."""
    return lambda fn: app.command(name)(user_errors(fn))


# shorthands shared by seed-dpo and train (TrainConfig extends SeedDPOConfig: the fields are the same)
LossOpt = Annotated[Optional[str], _key("seed_dpo", "loss")]
EpsOpt = Annotated[Optional[float], _key("seed_dpo", "dro_epsilon")]
PiecesOpt = Annotated[Optional[int], _key("seed_dpo", "dro_pieces")]
XiOpt = Annotated[Optional[float], _key("seed_dpo", "dro_xi_min")]


@_command("seed-dpo")
def seed_dpo_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
                 run_dir: RunDirOpt = None, force: ForceOpt = False, loss: LossOpt = None, dro_epsilon: EpsOpt = None,
                 dro_pieces: PiecesOpt = None, dro_xi_min: XiOpt = None, report_to: ReportOpt = None) -> None:
    """DPO on the gold seed pairs: gives the `seed` adapter (pi_0).

    Example: spa-lite seed-dpo --recipe smollm2-demo --set seed_dpo.epochs=3
    """
    keys = dict(loss=loss, dro_epsilon=dro_epsilon, dro_pieces=dro_pieces, dro_xi_min=dro_xi_min)
    _stage(RecipeArgs(recipe, set_, name, run_dir, {f"seed_dpo.{k}": v for k, v in keys.items()}
                      | {"report_to": report_to}), "seed-dpo", "seed", force)


@_command("reward")
def reward_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
               run_dir: RunDirOpt = None, force: ForceOpt = False, report_to: ReportOpt = None) -> None:
    """A Bradley-Terry reward model on the gold seed pairs (LoRA adapter + scalar head): the judge of
    expand.judge reward (and logprob+reward); its held-out gold accuracy is in the manifest.

    Example: spa-lite reward --recipe smollm2-demo --set reward.epochs=2 && spa-lite expand --iter 1 --judge reward
    """
    _stage(RecipeArgs(recipe, set_, name, run_dir, {"report_to": report_to}), "reward", "reward", force)


@_command("expand")
def expand_cmd(
    iteration: IterOpt, recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
    run_dir: RunDirOpt = None, force: ForceOpt = False,
    judge: Annotated[Optional[str], _key("expand", "judge")] = None,
    judge_ref: Annotated[Optional[str], _key("expand", "judge_ref")] = None,
    length_penalty: Annotated[Optional[float], _key("expand", "length_penalty")] = None,
    max_new_tokens: Annotated[Optional[int], _key("expand", "max_new_tokens")] = None,
    report_to: ReportOpt = None,
) -> None:
    """Sample expand.num_samples responses per prompt of X_i from pi_{i-1}, judge them (Eq. 7), keep a pair: writes D_i.

    Example: spa-lite expand --iter 1 --recipe smollm2-demo --judge-ref init
    """
    keys = dict(judge=judge, judge_ref=judge_ref, length_penalty=length_penalty, max_new_tokens=max_new_tokens)
    _stage(RecipeArgs(recipe, set_, name, run_dir, {f"expand.{k}": v for k, v in keys.items()}
                      | {"report_to": report_to}), "expand", f"iter{iteration}/expand", force, iteration)


@_command("train")
def train_cmd(
    iteration: IterOpt, recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
    run_dir: RunDirOpt = None, force: ForceOpt = False,
    refine: Annotated[Optional[bool], _key("train", "refine", "--refine/--no-refine")] = None,
    dnd: Annotated[Optional[bool], _key("train", "dnd", "--dnd/--no-dnd")] = None,
    loss: LossOpt = None, dro_epsilon: EpsOpt = None, dro_pieces: PiecesOpt = None, dro_xi_min: XiOpt = None,
    report_to: ReportOpt = None,
) -> None:
    """Train pi_i from pi_{i-1} on D_i (pi_ref = pi_{i-1}) with self-refinement and DND.

    Example: spa-lite train --iter 1 --recipe smollm2-demo --no-dnd
    """
    keys = dict(refine=refine, dnd=dnd, loss=loss, dro_epsilon=dro_epsilon, dro_pieces=dro_pieces, dro_xi_min=dro_xi_min)
    _stage(RecipeArgs(recipe, set_, name, run_dir, {f"train.{k}": v for k, v in keys.items()}
                      | {"report_to": report_to}), "train", f"iter{iteration}/train", force, iteration)


@_command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML path or shipped name.")] = "smollm2-demo",
    set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None, force: ForceOpt = False,
    report_to: ReportOpt = None,
) -> None:
    """All stages: seed-dpo, then expand + train for iterations 1..T. Complete stages are skipped.

    Example: spa-lite run smollm2-demo
    """
    setup_logging()
    api.run(RecipeArgs(recipe, set_, name, run_dir, {"report_to": report_to}).load(), force=force)


@_command("split")
@_with_options(SplitOptions)
def split_cmd(**options) -> None:
    """The paper's data protocol: shuffle, gold seed pairs, disjoint prompt sets per iteration, test pairs.

    Example: spa-lite split ultrafeedback.jsonl --out data/uf --seed-size 2000 --iter-sizes 8000,20000,30000
    """
    setup_logging()
    counts = api.split(**options)
    summary_table(f"split -> {options['out']}", counts)


@_command("eval")
@_with_options(EvalOptions)
def eval_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None,
             report_to: ReportOpt = None, **options) -> None:
    """Measure every policy of a run: judge accuracy (95% CI), noise detection (AUROC), self-labelling noise,
    verifier pass rate, and each judge's agreement with a human audit (`spa-lite inspect`).

    Example: spa-lite eval --recipe smollm2-demo --pairs ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --limit 200
    """
    setup_logging()
    api.print_eval_report(api.evaluate(RecipeArgs(recipe, set_, name, run_dir, {"report_to": report_to}).load(),
                                       **options))


@_command("winrate")
@_with_options(WinrateOptions)
def winrate_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
                run_dir: RunDirOpt = None, **options) -> None:
    """Win rate of one policy's responses against another's under a pairwise judge (95% CI); judge calls
    are cached under RUN/eval/winrate_cache, so an interrupted evaluation resumes.

    Example: spa-lite winrate --recipe smollm2-demo --policy 2 --reference init --judge verifier
    """
    setup_logging()
    res = api.policy_win_rate(RecipeArgs(recipe, set_, name, run_dir).load(), **options)
    console.print(f"{res['candidate']} vs {res['reference']} ({options['judge']} judge, n={res['n']}): win rate "
                  f"{res['win_rate']:.3f} [{res['ci_low']:.2f}, {res['ci_high']:.2f}], wins {res['wins']}, "
                  f"ties {res['ties']}, losses {res['losses']}")


@_command("report")
def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/smollm2-demo.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/report).")] = None,
) -> None:
    """Markdown report with PNG plots: judge accuracy and pass rate per policy, judged confidence per iteration,
    flagged fraction and tau over training, response lengths.

    Example: spa-lite report runs/smollm2-demo
    """
    console.print(f"report: {api.write_report(run, out)}")


@_command("export-answers")
@_with_options(ExportAnswersOptions)
def export_answers_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
                       run_dir: RunDirOpt = None, **options) -> None:
    """Answer a benchmark's questions with a policy of the run, in the official evaluators' formats.

    Example: spa-lite export-answers alpaca_eval.json --out outputs.json --policy 2 --recipe smollm2-demo
    """
    setup_logging()
    res = api.export_answers(RecipeArgs(recipe, set_, name, run_dir).load(), **options)
    console.print(f"{len(res['answers'])} answers by {res['model_id']} written to {res['out']}")


@_command("plan")
@_with_options(PlanOptions)
def plan_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, **options) -> None:
    """Estimated peak memory of each stage, and the batch / accumulation / checkpointing / length that fit.

    Example: spa-lite plan --recipe recipes/zephyr-7b-qlora.yaml --gpu-mem 16
             spa-lite plan --model meta-llama/Llama-3.1-70B --quantization none --fsdp 8 --gpu-mem 80
    """
    res = api.plan(RecipeArgs(recipe, set_).load(), **options)
    _print_plan(res, options["gpu_mem"], options["quantization"], options["fsdp"])


@_command("export")
def export_cmd(
    iteration: Annotated[int, typer.Option("--iter", "-i", min=0, help="Export pi_i (0 = seed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None,
    merged: Annotated[bool, typer.Option(
        "--merged/--adapter", help="A merged bf16 model, or one LoRA adapter (ranks concatenated).")] = True,
    dtype: Annotated[str, typer.Option(help="Merged weights dtype: bfloat16 | float16 | float32.")] = "bfloat16",
) -> None:
    """Export pi_i: a merged full model with a model card, or the adapter stack as one exact LoRA adapter (for vLLM).

    Example: spa-lite export --iter 2 --out exported/pi2 --recipe smollm2-demo
    """
    setup_logging()
    path = api.export_policy(RecipeArgs(recipe, set_, name, run_dir).load(), iteration, out, merged=merged, dtype=dtype)
    console.print(f"exported {api.policy_label(iteration)} to {path}")


@_command("inspect")
def inspect_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/smollm2-demo.")],
    iteration: Annotated[int, typer.Option("--iter", "-i", min=0, help="Show D_i (0: the gold seed pairs D0).")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="HTML file (default RUN/iter{i}/inspect.html).")] = None,
    serve: Annotated[bool, typer.Option(
        "--serve", help="Serve the page on 127.0.0.1 and write each annotation to RUN/iter{i}/audit.jsonl.")] = False,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port for --serve (0: any free port).")] = 8765,
    sample: Annotated[int, typer.Option(min=1, help="Pairs in the blind audit's sample.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the blind audit's sample and A/B order.")] = 0,
    pairs: Annotated[Optional[str], typer.Option(help="Show this pair file instead of the run's (no audit saving).")] = None,
) -> None:
    """A self-contained HTML page of a pair file's labels (filters, sorting, confidence histogram) with a blind
    human audit: open it from disk, or --serve it to save each annotation to the run as it is made.

    Example: spa-lite inspect runs/smollm2-demo --iter 1 --serve
    """
    if not serve:
        path = api.write_inspect_page(run, iteration, out, pairs=pairs, sample=sample, seed=seed)
        console.print(f"written: {path} (open it in a browser; the blind audit's annotations are downloaded from the "
                      f"page, then `spa-lite audit import FILE --run {run} --iter {iteration}`)")
        return
    if pairs is not None:
        raise SpaError("--serve saves annotations of the run's own pair file; leave out --pairs")
    srv = api.inspect_server(run, iteration, sample=sample, seed=seed, port=port)
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    console.print(f"serving {url} (loopback only); each annotation is written to {api.audit_file(run, iteration)}. "
                  "Ctrl-C stops.")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()


audit_app = typer.Typer(help="Human audit of the labels: `spa-lite audit import FILE --run RUN --iter i`.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("import")
@user_errors
def audit_import_cmd(
    file: Annotated[Path, typer.Argument(help="Annotations downloaded from the page (JSONL or JSON).")],
    run: Annotated[Path, typer.Option("--run", help="Run directory, e.g. runs/smollm2-demo.")],
    iteration: Annotated[int, typer.Option("--iter", "-i", min=0, help="The pair file audited (0: D0).")] = 1,
) -> None:
    """Check downloaded annotations against the run's pairs and add them to RUN/iter{i}/audit.jsonl.

    Example: spa-lite audit import ~/Downloads/audit-smollm2-demo-iter1.jsonl --run runs/smollm2-demo --iter 1
    """
    res = api.import_audit(file, run, iteration)
    console.print(f"{res['read']} annotations read, {res['added']} added, {res['duplicates']} already there: "
                  f"{res['path']}; `spa-lite eval --audit-only --recipe {run}/recipe.yaml` reports the agreement")


recipes_app = typer.Typer(help="Shipped recipes: list them, or copy one out to edit (`spa-lite recipes copy NAME [DEST]`).",
                          no_args_is_help=False)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
@user_errors
def recipes_cmd(ctx: typer.Context) -> None:
    """List the shipped recipes, one line each (name and description).

    Example: spa-lite recipes
    """
    if ctx.invoked_subcommand is None:
        recipes = api.list_recipes(long=True)
        width = max(map(len, recipes))
        for name, line in recipes.items():
            print(f"{name:<{width}}  {line}")


@recipes_app.command("copy")
@user_errors
def recipes_copy_cmd(
    name: Annotated[str, typer.Argument(help="Shipped recipe name (see `spa-lite recipes`).")],
    dest: Annotated[Optional[Path], typer.Argument(help="File or folder to write (default ./NAME.yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a shipped recipe to a file to edit, then run it with --recipe PATH.

    Example: spa-lite recipes copy zephyr-7b-qlora my-run.yaml
    """
    print(f"wrote {api.copy_recipe(name, dest, force)}")


@_command("doctor")
def doctor_cmd(run_dir: RunDirOpt = None) -> None:
    """What this machine can run: torch, CUDA, bitsandbytes, vLLM, memory, disk, the bundled model.

    Example: spa-lite doctor
    """
    t = Table(title="spa-lite doctor")
    for c in ("item", "status", "detail"):
        t.add_column(c)
    colors = {"ok": "green", "warn": "yellow", "missing": "red"}
    for item, status, detail in api.doctor(run_dir):
        t.add_row(item, f"[{colors[status]}]{status}[/]", detail)
    console.print(t)


def _stage(args: RecipeArgs, stage: str, key: str, force: bool, iteration: int | None = None) -> dict:
    """Run one recipe stage through the API and print its summary table."""
    setup_logging()
    m = api.run_stage(args.load(), stage, iteration, force=force)
    summary_table(stage if iteration is None else f"{stage} --iter {iteration}", api.stage_summary(key, m))
    return m


# how each stage's log-probs are computed, by the kernel the plan budgets (spa_lite.logps.logprob_kernel())
_LOGPROBS = {"trl": "from hidden states, TRL's chunked kernel (trl.kernels.ChunkedLogProbFunction)",
             "torch": "from hidden states, spa_lite's chunked torch kernel (the installed trl has no ChunkedLogProbFunction)",
             None: "full logits (the model's LM head is not a plain affine map)"}


def _print_plan(res: dict, gpu_mem: float, quantization: str, fsdp: int) -> None:
    """`spa-lite plan`'s table of stages and its verdict."""
    shards = f", FSDP over {fsdp})" if fsdp > 1 else ")"
    t = Table(title=f"memory plan: {res['source']} on {gpu_mem:g} GB ({quantization}{shards}")
    for c in ("stage", "peak GB", "fits", "largest parts"):
        t.add_column(c)
    for name, st in res["plan"]["stages"].items():
        parts = sorted(st["parts"].items(), key=lambda kv: -kv[1])[:3]
        t.add_row(name, f"{st['peak_gb']:.2f}", "yes" if st["fits"] else "[red]no[/]",
                  ", ".join(f"{k} {v:.2f}" for k, v in parts))
    console.print(t)
    console.print(f"log-probs: {_LOGPROBS[res['plan']['inputs']['logprob_kernel']]}"
                  + ("; FSDP training scores full logits" if fsdp > 1 else ""))
    verdict = "fits" if res["fits"] else "does NOT fit even with the smallest settings"
    console.print(f"{verdict}: batch_size {res['batch_size']} x grad_accum {res['grad_accum']} "
                  f"(effective {res['effective_batch']}), gradient_checkpointing {res['gradient_checkpointing']}, "
                  f"max_length {res['seq_len']}, expand batch {res['gen_batch_size']}, judge batch {res['judge_batch_size']}"
                  + (f"; changed: {', '.join(res['changed'])}" if res["changed"] else ""))


def main() -> None:
    app(prog_name="spa-lite")  # `python cli.py ...` and `accelerate launch cli.py ...` (the checkout's cli.py)


if __name__ == "__main__":
    sys.exit(main())
