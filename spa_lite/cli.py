"""The `spa-lite` command: parses options and calls one function of ``spa_lite.tasks`` per command.

Every command reads a YAML recipe (``--recipe``, a path or a shipped name) and ``--set section.key=value``
overrides; dedicated flags are shorthands for common overrides, with the recipe field's help text. Each
command's task module is imported when the command runs (``spa_lite.tasks`` loads its submodules lazily), so
that `spa-lite --help` does not load torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from spa_lite import tasks
from spa_lite.config import field_help
from spa_lite.tasks import RecipeArgs, user_errors

app = typer.Typer(name="spa-lite", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="SPA (Spread Preference Annotation) on one GPU: seed DPO, then expand (sample + judge) and "
                       "train per iteration.")

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
    """Register a command of ``app`` behind the one error boundary (``spa_lite.tasks.user_errors``)."""
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
    tasks.stages.run_seed_dpo(RecipeArgs(recipe, set_, name, run_dir, {f"seed_dpo.{k}": v for k, v in keys.items()}
                                         | {"report_to": report_to}), force)


@_command("reward")
def reward_cmd(recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None,
               run_dir: RunDirOpt = None, force: ForceOpt = False, report_to: ReportOpt = None) -> None:
    """A Bradley-Terry reward model on the gold seed pairs (LoRA adapter + scalar head): the judge of
    expand.judge reward (and logprob+reward); its held-out gold accuracy is in the manifest.

    Example: spa-lite reward --recipe smollm2-demo --set reward.epochs=2 && spa-lite expand --iter 1 --judge reward
    """
    tasks.stages.run_reward(RecipeArgs(recipe, set_, name, run_dir, {"report_to": report_to}), force)


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
    tasks.stages.run_expand(RecipeArgs(recipe, set_, name, run_dir, {f"expand.{k}": v for k, v in keys.items()}
                                       | {"report_to": report_to}), iteration, force)


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
    tasks.stages.run_train(RecipeArgs(recipe, set_, name, run_dir, {f"train.{k}": v for k, v in keys.items()}
                                      | {"report_to": report_to}), iteration, force)


@_command("run")
def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML path or shipped name.")] = "smollm2-demo",
    set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None, force: ForceOpt = False,
    report_to: ReportOpt = None,
) -> None:
    """All stages: seed-dpo, then expand + train for iterations 1..T. Complete stages are skipped.

    Example: spa-lite run smollm2-demo
    """
    tasks.stages.run_all(RecipeArgs(recipe, set_, name, run_dir, {"report_to": report_to}), force)


@_command("split")
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
    tasks.stages.run_split(data, out, seed=seed, seed_size=seed_size, iter_sizes=iter_sizes, test_size=test_size, fmt=fmt)


@_command("eval")
def eval_cmd(
    recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None,
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
    audit_only: Annotated[bool, typer.Option(
        "--audit-only", help="Only the judges' agreement with the human audit (no model is loaded).")] = False,
    report_to: ReportOpt = None,
) -> None:
    """Measure every policy of a run: judge accuracy (95% CI), noise detection (AUROC), self-labelling noise,
    verifier pass rate, and each judge's agreement with a human audit (`spa-lite inspect`).

    Example: spa-lite eval --recipe smollm2-demo --pairs ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz --limit 200
    """
    tasks.stages.run_eval(RecipeArgs(recipe, set_, name, run_dir, {"report_to": report_to}), pairs=pairs, fmt=fmt,
                    limit=limit, methods=methods, flip=flip, lambdas=lambdas, pass_rate=pass_rate,
                    prompt_limit=prompt_limit, samples=samples, temperature=temperature, tag=tag,
                    audit_only=audit_only)


@_command("winrate")
def winrate_cmd(
    recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None,
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
    tasks.winrate.run_winrate(RecipeArgs(recipe, set_, name, run_dir), policy=policy, reference=reference, judge=judge,
                        judge_url=judge_url, judge_model=judge_model, judge_key_env=judge_key_env, prompts=prompts,
                        limit=limit)


@_command("report")
def report_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory, e.g. runs/smollm2-demo.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default RUN/report).")] = None,
) -> None:
    """Markdown report with PNG plots: judge accuracy and pass rate per policy, judged confidence per iteration,
    flagged fraction and tau over training, response lengths.

    Example: spa-lite report runs/smollm2-demo
    """
    tasks.info.report(run, out)


@_command("export-answers")
def export_answers_cmd(
    questions: Annotated[Path, typer.Argument(help="AlpacaEval questions (JSON list) or MT-Bench question.jsonl.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model_outputs.json (AlpacaEval) or answer JSONL (MT-Bench).")],
    benchmark: Annotated[str, typer.Option(help="alpaca-eval | mt-bench")] = "alpaca-eval",
    policy: Annotated[str, typer.Option(help="Which policy answers: init, 0 (seed), 1, 2, ...")] = "last",
    recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None, name: NameOpt = None, run_dir: RunDirOpt = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit.")] = 1024,
    temperature: Annotated[Optional[float], typer.Option(
        help="Default: 0 for AlpacaEval, FastChat's per category for MT-Bench.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Answer only the first N questions.")] = None,
    batch_size: Annotated[int, typer.Option(help="Questions per generation batch.")] = 8,
) -> None:
    """Answer a benchmark's questions with a policy of the run, in the official evaluators' formats.

    Example: spa-lite export-answers alpaca_eval.json --out outputs.json --policy 2 --recipe smollm2-demo
    """
    tasks.answers.run_export_answers(RecipeArgs(recipe, set_, name, run_dir), questions, out, benchmark=benchmark,
                               policy=policy, max_new_tokens=max_new_tokens, temperature=temperature, limit=limit,
                               batch_size=batch_size)


@_command("plan")
def plan_cmd(
    recipe: RecipeOpt = "smollm2-demo", set_: SetOpt = None,
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
    tasks.plan.show_plan(RecipeArgs(recipe, set_), model=model, gpu_mem=gpu_mem, quantization=quantization, fsdp=fsdp)


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
    tasks.export.run_export(RecipeArgs(recipe, set_, name, run_dir), iteration, out, merged=merged, dtype=dtype)


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
    tasks.labels.inspect(run, iteration, pairs=pairs, out=out, serve=serve, port=port, sample=sample, seed=seed)


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
    tasks.labels.audit_import(file, run, iteration)


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
        tasks.info.list_recipes()


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
    tasks.info.copy_shipped_recipe(name, dest, force)


@_command("doctor")
def doctor_cmd(run_dir: RunDirOpt = None) -> None:
    """What this machine can run: torch, CUDA, bitsandbytes, vLLM, memory, disk, the bundled model.

    Example: spa-lite doctor
    """
    tasks.doctor.doctor(run_dir)


def main() -> None:
    app(prog_name="spa-lite")  # `python cli.py ...` and `accelerate launch cli.py ...` (the checkout's cli.py)


if __name__ == "__main__":
    sys.exit(main())
