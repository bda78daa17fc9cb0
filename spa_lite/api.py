"""The Python API, for notebooks and scripts: what the `spa-lite` command does, without a shell.

    import spa_lite

    recipe = spa_lite.load_recipe("smollm2-demo", {"iterations": 1, "train.lr": 1e-4}, name="demo")
    spa_lite.run(recipe)                                 # every stage; complete ones are skipped
    spa_lite.run_stage(recipe, "expand", iteration=1)    # or one stage
    r = spa_lite.open_run(recipe)
    r.status()                                           # {"seed": "complete", "iter1/expand": ..., ...}
    r.summary("iter1/expand"), r.metrics("iter1/train")  # the manifest's summary, metrics.jsonl rows
    pi = r.policy("last")                                # pi_T on the base, for generation
    pi.generate(["Name a fast animal."], max_new_tokens=64)

The command line (``spa_lite.cli``) only parses and prints: every command calls a function here, so both behave
the same. The options of the commands outside the recipe (eval, winrate, export-answers, plan, split) are
defined once, as the dataclasses of ``spa_lite.options``: these functions take their fields as keyword
arguments and validate them there. ``import spa_lite`` stays light: this module (and torch with it) loads on
the first use of ``spa_lite.<name>``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from spa_lite.audit import import_annotations, run_agreement
from spa_lite.config import Recipe, parse_overrides
from spa_lite.config import load_recipe as _load
from spa_lite.data import load_pairs
from spa_lite.doctor import checks
from spa_lite.errors import SpaError
from spa_lite.export import (
    export_alpaca_eval,
    export_mt_bench,
    generate_answers,
    make_generate,
    read_alpaca_eval_questions,
    read_mt_bench_questions,
)
from spa_lite.inspect_page import make_server, page_payload, render, write_page
from spa_lite.io import read_json, read_jsonl
from spa_lite.layout import (
    Stage,
    audit_path,
    complete_policies,
    data_path,
    policy_label,
    policy_names,
    read_manifest,
    resolve_policy,
    stage_dir,
    stage_keys,
)
from spa_lite.loading import load_stack
from spa_lite.logps import head_is_affine, logprob_kernel
from spa_lite.losses import lambda_for_iteration
from spa_lite.merge import export_merged, export_single_adapter
from spa_lite.models import resolve_model_path
from spa_lite.options import EvalOptions, ExportAnswersOptions, PlanOptions, SplitOptions, WinrateOptions
from spa_lite.plan import fit
from spa_lite.recipe_files import copy_recipe, listing_line, recipe_description, shipped_recipes
from spa_lite.report import write_report
from spa_lite.stages import evaluate as evaluate_stage
from spa_lite.stages import expand, pipeline, reward, seed_dpo, train
from spa_lite.stages import split as split_stage
from spa_lite.ui import task
from spa_lite.winrate import compare_policies

__all__ = ["load_recipe", "run", "run_stage", "evaluate", "open_run", "Run", "Policy", "list_recipes", "copy_recipe",
           "resolve_policy", "plan", "size_for_gpu", "inspect_html", "policy_win_rate", "export_answers", "split",
           "export_policy", "write_report"]


def list_recipes(*, long: bool = False) -> dict[str, str]:
    """Shipped recipe name -> one-line description; ``long``: the line `spa-lite recipes` prints (with the
    commands that run it)."""
    return {name: listing_line(name, path) if long else recipe_description(path)
            for name, path in shipped_recipes().items()}


def load_recipe(recipe: str | Path | Recipe | None = "smollm2-demo", overrides: dict | Sequence[str] | None = None, *,
                name: str | None = None, run_dir: str | Path | None = None,
                report_to: str | Sequence[str] | None = None) -> Recipe:
    """A recipe (a shipped name, a YAML path, or None for the defaults) with overrides applied.

    Args:
        overrides: ``{"train.lr": 1e-4}`` (dotted keys), nested mappings ``{"train": {"lr": 1e-4}}``, or the
            command line's ``["train.lr=1e-4", ...]``.
        name, run_dir, report_to: shorthands for the ``name``, ``run_dir`` and ``report_to`` keys.

    Raises:
        SpaError: naming every unknown key and bad value, and the file it came from.
    """
    items: dict[str, Any] = {}
    if isinstance(recipe, Recipe):
        if overrides is None and name is None and run_dir is None and report_to is None:
            return recipe
        items.update(recipe.to_dict())  # the recipe's values, then the overrides on top, checked as one
        recipe = None
    items.update(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    for key, value in (("name", name), ("run_dir", run_dir), ("report_to", report_to)):
        if value is not None:
            items[key] = str(value) if isinstance(value, Path) else value
    return _load(recipe, items)


def _as_recipe(recipe: str | Path | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _recipe_arg(recipe: str | Path | Recipe) -> str:
    """How the rerun commands an error suggests name the recipe: the argument given, or the command line's
    options the CLI recorded (``Recipe.rerun_args``; "RECIPE" for a recipe made in Python)."""
    return str(recipe) if isinstance(recipe, (str, Path)) else recipe.rerun_args


def _stage(stage: str, iteration: int | None) -> Stage:
    s = stage.strip().replace("seed-dpo", "seed")
    if s in ("seed", "reward"):
        return Stage(s, 0)
    if "/" in s:  # iter2/train
        it, kind = s.split("/", 1)
        if not it.startswith("iter") or not it[4:].isdigit():
            raise SpaError(f"stage '{stage}' is not seed, iter<i>/expand or iter<i>/train")
        iteration, s = int(it[4:]), kind
    if s not in {"expand", "train"}:
        raise SpaError(f"stage '{stage}' is not seed-dpo, reward, expand or train")
    if not iteration or iteration < 1:
        raise SpaError(f"stage '{stage}' needs an iteration >= 1")
    return Stage(s, iteration)


def run_stage(recipe: str | Path | Recipe, stage: str, iteration: int | None = None, *, force: bool = False) -> dict:
    """Run one stage ("seed-dpo", "reward", "expand" or "train" with ``iteration``, or "iter2/train"); returns its
    manifest.

    A complete stage made from the same config is not redone (``force=True`` redoes it); a stage whose upstream
    is missing raises StageOrderError naming the command that makes it.
    """
    r = _as_recipe(recipe)
    st = _stage(stage, iteration)
    if st.kind == "seed":
        return seed_dpo.run(r, force=force)
    if st.kind == "reward":
        return reward.run(r, force=force)
    if st.kind == "expand":
        return expand.run(r, st.iteration, force=force, recipe_arg=_recipe_arg(recipe))
    return train.run(r, st.iteration, force=force, recipe_arg=_recipe_arg(recipe))


def run(recipe: str | Path | Recipe = "smollm2-demo", *, force: bool = False) -> list[tuple[str, dict]]:
    """All stages: seed DPO, then expand and train for iterations 1..T; returns [(stage key, manifest), ...]."""
    return pipeline.run(_as_recipe(recipe), force=force, recipe_arg=_recipe_arg(recipe))


def stage_summary(key: str, manifest: dict) -> dict:
    """The rows `spa-lite` prints after a stage ("seed", "reward", "iter1/expand", ...): wall time, peak
    memory and the stage's summary counts."""
    return pipeline.stage_rows(key, manifest)


def evaluate(recipe: str | Path | Recipe, *, policies: list[int | None] | None = None, **options) -> dict:
    """`spa-lite eval`: judge accuracy, noise detection, self-labelling noise, pass rates and the human audit's
    agreement of every policy of a run (or only ``policies``; None is pi_init); returns the report it writes
    to runs/<name>/eval/<tag>.json.

    Args:
        options: ``spa_lite.options.EvalOptions``' fields (limit=200, methods=["init", "prev", "none"], ...).

    Raises:
        SpaError: an unknown option or a bad value, naming it.
    """
    return evaluate_stage.run(_as_recipe(recipe), EvalOptions.build(options), policies=policies)


def print_eval_report(report: dict) -> None:
    """Print ``evaluate``'s report as `spa-lite eval` does (one table per measure)."""
    evaluate_stage.print_report(report)


def policy_win_rate(recipe: str | Path | Recipe, **options) -> dict:
    """`spa-lite winrate`: one policy's responses against another's under a pairwise judge, with a 95% CI
    (``spa_lite.winrate.compare_policies``); writes RUN/eval/winrate_<cand>_vs_<ref>_<judge>.json.

    Args:
        options: ``spa_lite.options.WinrateOptions``' fields (policy="last", reference="init", judge=...).
    """
    return compare_policies(_as_recipe(recipe), WinrateOptions.build(options))


def export_answers(recipe: str | Path | Recipe, questions: str | Path, out: str | Path, **options) -> dict:
    """`spa-lite export-answers`: a policy of the run answers a benchmark's questions (AlpacaEval or MT-Bench),
    written to ``out`` in the official evaluators' format.

    Args:
        options: ``spa_lite.options.ExportAnswersOptions``' other fields (benchmark, policy, max_new_tokens, ...).

    Returns:
        ``{"model_id": "<run name>-pi_k", "answers": the rows written, "out": the file}``.
    """
    o = ExportAnswersOptions.build({"questions": questions, "out": out, **options})
    r = _as_recipe(recipe)
    ks = complete_policies(r)
    k = resolve_policy(r, o.policy)
    if o.benchmark == "alpaca-eval":
        n_answers = len(read_alpaca_eval_questions(o.questions)[: o.limit])
    else:  # MT-Bench: one answer per turn
        n_answers = sum(len(q["turns"]) for q in read_mt_bench_questions(o.questions)[: o.limit])
    stack = load_stack(r, frozen_upto=max(ks) if ks else -1)
    model_id = f"{r.name}-{policy_label(k)}"
    with task(f"answers by {model_id}", n_answers, info=o.benchmark) as advance:
        gen = make_generate(stack, policy_names(k), o.max_new_tokens, o.batch_size, r.seed, on_batch=advance,
                            sample_dtype=r.expand.sample_dtype)
        if o.benchmark == "alpaca-eval":
            rows = export_alpaca_eval(o.questions, o.out, gen, model_id, temperature=o.temperature or 0.0,
                                      limit=o.limit)
        else:
            rows = export_mt_bench(o.questions, o.out, gen, model_id, temperature=o.temperature, limit=o.limit)
    return {"model_id": model_id, "answers": rows, "out": o.out}


def split(data: str, out: str | Path, **options) -> dict:
    """`spa-lite split`: the paper's data protocol as files under ``out`` (shuffle, gold seed pairs, disjoint
    prompt sets per iteration, test pairs); returns the row count of each file.

    Args:
        options: ``spa_lite.options.SplitOptions``' other fields (seed, seed_size, iter_sizes, test_size, fmt).
    """
    return split_stage.run(SplitOptions.build({"data": data, "out": out, **options}))


EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_policy(recipe: str | Path | Recipe, iteration: int, out: str | Path, *, merged: bool = True,
                  dtype: str = "bfloat16") -> Path:
    """`spa-lite export`: pi_i as a merged full model with a model card, or (``merged=False``) the adapter stack
    as one exact LoRA adapter; returns the folder written."""
    r = _as_recipe(recipe)
    label = policy_label(iteration)
    if iteration not in complete_policies(r):
        raise SpaError(f"{label} is not complete in {r.run_path}; run its stages first")
    with task(f"export {label} ({'merged' if merged else 'adapter'})", 1, info=str(out)) as advance:
        if merged:
            if dtype not in EXPORT_DTYPES:
                raise SpaError(f"--dtype '{dtype}' is not bfloat16, float16 or float32")
            path = export_merged(r, iteration, Path(out), dtype=EXPORT_DTYPES[dtype])
        else:
            path = export_single_adapter(r, iteration, Path(out))
        advance()
    return path


def doctor(run_dir: str | Path | None = None) -> list[tuple[str, str, str]]:
    """`spa-lite doctor`: (item, ok | warn | missing, detail) for torch, CUDA, bitsandbytes, vLLM, memory, disk
    (of ``run_dir``, default runs) and the bundled model."""
    return checks(str(run_dir or "runs"))


def _run_dir(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise SpaError(f"{run} is not a run directory (runs/<name>, made by `spa-lite run` or its stages)")
    return run


def write_inspect_page(run: str | Path, iteration: int = 1, out: str | Path | None = None, *,
                       pairs: str | None = None, sample: int = 50, seed: int = 0) -> Path:
    """`spa-lite inspect`: the label page of D_i as a self-contained HTML file (default RUN/iter{i}/inspect.html)."""
    return write_page(_run_dir(run), iteration, None if out is None else Path(out), pairs=pairs, sample=sample,
                      seed=seed)


def inspect_server(run: str | Path, iteration: int = 1, *, sample: int = 50, seed: int = 0, port: int = 8765):
    """`spa-lite inspect --serve`: an HTTP server (127.0.0.1) of the label page that writes each annotation to
    ``audit_path(run, iteration)``; call its ``serve_forever()``, then ``server_close()``."""
    return make_server(_run_dir(run), iteration, sample=sample, seed=seed, port=port)


def audit_file(run: str | Path, iteration: int = 1) -> Path:
    """The human audit of D_i: RUN/iter{i}/audit.jsonl (D0, iteration 0: RUN/d0/audit.jsonl)."""
    return audit_path(Path(run), iteration)


def import_audit(file: str | Path, run: str | Path, iteration: int = 1) -> dict:
    """`spa-lite audit import`: check annotations downloaded from the page against the run's pairs and append
    them to RUN/iter{i}/audit.jsonl; returns the counts (read, added, duplicates) and the path."""
    return import_annotations(Path(file), _run_dir(run), iteration)


def inspect_html(run: str | Path | Recipe, iteration: int = 1, *, fragment: bool = True, sample: int = 50,
                 seed: int = 0, pairs: str | Path | None = None) -> str:
    """The label page of D_i (iteration 0: the gold seed pairs D0) with its blind audit, as HTML.

    ``fragment`` (default) gives a block for a notebook: ``IPython.display.HTML(spa_lite.inspect_html(...))``;
    ``fragment=False`` a whole document (what `spa-lite inspect` writes). Annotations made in the page are
    downloaded and imported with `spa-lite audit import`.

    Args:
        run: a run directory, or a recipe (its ``run_path``).
        sample, seed: size and seed of the blind-audit sample.
        pairs: a pair file to show instead of the run's.
    """
    path = run.run_path if isinstance(run, Recipe) else Path(run)
    return render(page_payload(path, iteration, pairs=pairs, sample=sample, seed=seed), fragment=fragment)


def _config_error(src: str, e: Exception) -> str:
    """Why a model config could not be read and, for a hub id, how to plan without the hub."""
    why = str(e).splitlines()[0].rstrip(". ") if str(e).strip() else type(e).__name__
    msg = f"cannot read a model config from '{src}': {why}"
    if src.endswith(".json") or Path(src).exists() or src.count("/") != 1:
        return msg
    return (f"{msg}. plan needs only the model's config.json: on a machine with the hub, fetch "
            f"https://huggingface.co/{src}/resolve/main/config.json and run `spa-lite plan --model config.json` "
            "(with the same --recipe) here")


def plan(recipe: str | Path | Recipe = "smollm2-demo", **options) -> dict:
    """`spa-lite plan`: estimated peak memory of each stage and the settings that fit ``gpu_mem`` GB.

    Args:
        options: ``spa_lite.options.PlanOptions``' fields: model (a model folder, hub id, bundled alias or
            config.json; default: the recipe's model), gpu_mem=16.0, quantization="4bit", fsdp=1.

    Returns:
        ``spa_lite.plan.fit``'s result (fits, batch_size, grad_accum, gradient_checkpointing, seq_len,
        gen_batch_size, judge_batch_size, changed, plan) and "source": the model it planned for.
    """
    o = PlanOptions.build(options)
    r = _as_recipe(recipe)
    src, gpu_mem, quantization, fsdp = o.model or r.model.name_or_path, o.gpu_mem, o.quantization, o.fsdp
    try:
        cfg = AutoConfig.from_pretrained(src if str(src).endswith(".json") else resolve_model_path(src))
    except (OSError, ValueError) as e:
        raise SpaError(_config_error(str(src), e)) from None
    dtype_bytes = 4 if r.model.dtype in {"float32", "fp32"} else 2
    res = fit(cfg, gpu_mem, quantization, dtype_bytes, r.model.lora_r, r.model.max_length, r.train.batch_size,
              r.train.grad_accum, r.model.gradient_checkpointing, r.train.dnd, lam=lambda_for_iteration(1, r.train.lambdas),
              gen_batch_size=r.expand.batch_size, num_samples=r.expand.num_samples, prompt_len=r.model.max_prompt_length,
              max_new_tokens=r.expand.max_new_tokens, judge_batch_size=r.expand.judge_batch_size, fsdp_shards=fsdp,
              logprob_kernel=logprob_kernel() if head_is_affine(cfg) else None)
    return {**res, "source": src}


def size_for_gpu(recipe: str | Path | Recipe, gpu_mem: float, bf16: bool, *, model: str | None = None) -> dict:
    """Overrides that make a recipe fit one GPU of ``gpu_mem`` GB in 4-bit, from ``plan``: micro-batch and
    accumulation (the effective batch is kept, for seed DPO too), checkpointing, length, generation batches,
    and the compute dtype (bf16 where the card has it; fp16 otherwise, e.g. a T4).

    Raises:
        SpaError: when the recipe does not fit even with the smallest settings.
    """
    r = _as_recipe(recipe)
    res = plan(r, model=model, gpu_mem=gpu_mem, quantization="4bit")
    if not res["fits"]:
        raise SpaError(f"{res['source']} does not fit {gpu_mem:g} GB even with the smallest settings "
                       "(`spa-lite plan` shows the stages' estimates)")
    bs = res["batch_size"]
    seed_eff = r.seed_dpo.batch_size * r.seed_dpo.grad_accum
    out = {"model.quantization": "4bit", "model.dtype": "bfloat16" if bf16 else "float16",
           "model.gradient_checkpointing": res["gradient_checkpointing"], "model.max_length": res["seq_len"],
           "train.batch_size": bs, "train.grad_accum": res["grad_accum"],
           "seed_dpo.batch_size": min(bs, seed_eff), "seed_dpo.grad_accum": max(1, seed_eff // min(bs, seed_eff)),
           "expand.batch_size": res["gen_batch_size"], "expand.judge_batch_size": res["judge_batch_size"]}
    if r.model.max_prompt_length >= res["seq_len"]:
        out["model.max_prompt_length"] = res["seq_len"] // 2
    return out


class Policy:
    """pi_k of a run, loaded as the base plus its adapters (one copy of the base), for generation.

    ``policy.model()`` is a context manager yielding the peft model with pi_k's adapters active, for your own
    forward passes; ``policy.tokenizer`` is the run's tokenizer (with its chat template).
    """

    def __init__(self, recipe: Recipe, k: int | None, stack=None):
        self.recipe, self.k = recipe, k
        self.label = policy_label(k)
        self.names = policy_names(k)
        self.stack = stack if stack is not None else load_stack(recipe, frozen_upto=-1 if k is None else k)

    @property
    def tokenizer(self):
        return self.stack.tokenizer

    def model(self):
        return self.stack.use(self.names)

    def generate(self, prompts: Sequence[str | Sequence[dict]], *, max_new_tokens: int | None = None,
                 temperature: float = 0.0, batch_size: int | None = None, seed: int | None = None) -> list[str]:
        """One response per prompt (a string is one user message; or a list of chat messages); temperature 0
        is greedy."""
        msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        c = self.recipe.expand
        return generate_answers(self.stack, self.names, msgs, max_new_tokens or c.max_new_tokens, temperature,
                                batch_size or c.batch_size, self.recipe.seed if seed is None else seed,
                                sample_dtype=c.sample_dtype)

    def __repr__(self) -> str:
        return f"Policy({self.label} of {self.recipe.run_path}, adapters {self.names})"


class Run:
    """The artifacts of one run (runs/<name>): stage status, summaries, training metrics, D_i, eval results."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe

    @property
    def path(self) -> Path:
        return self.recipe.run_path

    def stage_keys(self) -> list[str]:
        return stage_keys(self.recipe.iterations)

    def status(self) -> dict[str, str]:
        """Stage key -> complete | partial | missing."""
        out = {}
        for key in self.stage_keys():
            st = _stage(key, None)
            m = read_manifest(self.recipe, st)
            out[key] = ("complete" if m and m.get("status") == "complete"
                        else "partial" if stage_dir(self.recipe, st).exists() else "missing")
        return out

    def manifest(self, stage: str, iteration: int | None = None) -> dict:
        st = _stage(stage, iteration)
        m = read_manifest(self.recipe, st)
        if m is None:
            raise SpaError(f"{stage_dir(self.recipe, st)} has no manifest: run `{st.command}` first")
        return m

    def summary(self, stage: str, iteration: int | None = None) -> dict:
        """The stage's summary (D_i size and counts for expand; steps, losses, flagged fraction for training)."""
        return self.manifest(stage, iteration).get("summary", {})

    def metrics(self, stage: str, iteration: int | None = None) -> list[dict]:
        """Per-step training metrics of seed-dpo or train (metrics.jsonl rows: step, loss, reward_margin, ...)."""
        st = _stage(stage, iteration)
        if st.kind == "expand":
            raise SpaError("expand has no per-step metrics; its summary holds D_i's counts (Run.summary)")
        return [row for _, row in read_jsonl(stage_dir(self.recipe, st) / "metrics.jsonl")]

    def pairs(self, iteration: int) -> list[dict]:
        """D_i normalised: {"prompt": messages, "chosen": str, "rejected": str, "confidence": ..., ...}."""
        return load_pairs(str(data_path(self.path, iteration)))

    def inspect_html(self, iteration: int = 1, **kwargs) -> str:
        """``spa_lite.inspect_html`` for this run's D_i."""
        return inspect_html(self.path, iteration, **kwargs)

    def audit(self) -> dict[str, dict]:
        """Each judge's agreement with the human audit of every audited pair file ({"D_1": ...}), as
        `spa-lite eval` reports it (``spa_lite.audit.agreement``)."""
        return run_agreement(self.path, self.recipe.iterations)

    def evals(self) -> dict[str, dict]:
        """Eval reports under runs/<name>/eval, by tag."""
        d = self.path / "eval"
        return {p.stem: read_json(p) for p in sorted(d.glob("*.json"))} if d.is_dir() else {}

    def policies(self) -> list[int]:
        """k of every complete pi_k (0 is the seed policy)."""
        return complete_policies(self.recipe)

    def policy(self, which: str | int | None = "last") -> Policy:
        """pi_k for generation: "last", "init", 0 (seed), 1, 2, ..."""
        return Policy(self.recipe, resolve_policy(self.recipe, which))

    def __repr__(self) -> str:
        return f"Run({self.path})"


def open_run(recipe: str | Path | Recipe, **overrides) -> Run:
    """The run of a recipe (keyword arguments as in ``load_recipe``: name=, run_dir=, overrides=)."""
    return Run(recipe if isinstance(recipe, Recipe) and not overrides else load_recipe(recipe, **overrides))


# The package's lazy `spa_lite.plan` is this module's function; importing the planner module spa_lite/plan.py
# (above) bound the package attribute of that name to the module, so bind it back.
sys.modules[__package__].plan = plan
