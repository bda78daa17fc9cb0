"""Recipes: typed dataclasses filled from YAML (safe_load), then from command-line overrides.

Unknown keys and bad values are collected and reported together, naming the recipe file and the key.
Each field is documented once, here (its help text); README's recipe reference is generated from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spa_lite.errors import SpaError
from spa_lite.io import atomic_write_text
from spa_lite.recipe_files import resolve_recipe_path


@dataclass(frozen=True)
class Bounds:
    """The numbers a recipe field allows (each item, for a list field): finite and between ``lo`` and ``hi``
    (None: unbounded; ``lo_ok``/``hi_ok``: the end itself allowed), or exactly ``off``."""

    lo: float | None = None
    lo_ok: bool = True
    hi: float | None = None
    hi_ok: bool = True
    off: float | None = None
    why: str = ""  # said after the bounds in the error

    def allows(self, x: float) -> bool:
        return (self.off is not None and x == self.off) or (
            math.isfinite(x) and (self.lo is None or x > self.lo or (x == self.lo and self.lo_ok))
            and (self.hi is None or x < self.hi or (x == self.hi and self.hi_ok)))

    def __str__(self) -> str:
        low = "" if self.lo is None else f"{'>=' if self.lo_ok else '>'} {self.lo}"
        high = "" if self.hi is None else f"{'<=' if self.hi_ok else '<'} {self.hi}"
        return ("" if self.off is None else f"{self.off} (off) or ") + " and ".join(b for b in (low, high) if b)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            choices: tuple[str, ...] | None = None, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, off: float | None = None, why: str = "") -> Any:
    """A recipe field: its default (or ``factory`` for a list), its help text and, for a string, its choices.

    The help text is the one documentation of the field: the CLI's flags, ``--set`` and README's recipe
    reference (``python -m spa_lite.config --reference``) all show it. ``ge``/``gt``/``le``/``lt`` bound a
    number (each item of a list): ``validate`` refuses a value outside them (``off`` is one more value allowed,
    ``why`` the reason given), and the reference shows them.
    """
    meta = {"help": help} | ({"choices": tuple(choices)} if choices else {})
    if (ge is not None and gt is not None) or (le is not None and lt is not None):
        raise ValueError("a setting takes one lower bound (ge or gt) and one upper bound (le or lt)")
    if (ge, gt, le, lt) != (None, None, None, None):
        meta["bounds"] = Bounds(gt if ge is None else ge, ge is not None or gt is None,
                                lt if le is None else le, le is not None or lt is None, off, why)
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass
class ModelConfig:
    name_or_path: str = setting("smollm2", "bundled alias, local folder or hub id: this is pi_init")
    quantization: str = setting("auto", "auto (4bit on CUDA, none on CPU) | 4bit | none", choices=("auto", "4bit", "none"))
    dtype: str = setting("auto", "auto | float32 | bfloat16 | float16")
    device: str = setting("auto", "auto | cpu | cuda")
    gradient_checkpointing: bool = setting(False, "lowers activation memory ~L-fold for ~30% more compute")
    lora_r: int = setting(16, "LoRA rank of every adapter", ge=1)
    lora_alpha: int = setting(32, "LoRA scaling numerator (scale = alpha / r)", gt=0)
    lora_dropout: float = setting(0.0, "0 keeps training deterministic and pi_theta == pi_{i-1} at step 0", ge=0, lt=1)
    lora_target_modules: Any = setting("all-linear", "modules with LoRA: all-linear or a list of module names")
    max_length: int = setting(512, "prompt + response tokens; longer pairs are truncated (or skipped: "
                              "`model.truncation`) and counted", ge=2)
    max_prompt_length: int = setting(256, "prompt tokens: an over-long pair's prompt keeps its last this many; "
                                     "expand skips longer prompts and counts them", ge=1)
    truncation: str = setting("truncate", "truncate | skip: pairs over max_length keep the prompt's end and the "
                              "responses' start, as TRL and the paper (truncate), or are left out (skip); counted "
                              "in each manifest", choices=("truncate", "skip"))
    fsdp: str = setting("auto", "auto (on under `accelerate launch` with an FSDP config) | on | off: shard training "
                        "(FSDP2)", choices=("auto", "on", "off"))


@dataclass
class DataConfig:
    seed_pairs: str = setting("demo:seed_pairs", "gold pairs D0: file, folder or demo:NAME")
    prompts: str = setting("demo:prompts", "prompt pool for iterations (prompt file or preference data)")
    eval_pairs: str | None = setting("demo:eval_pairs", "held-out gold pairs for `spa-lite eval`")
    eval_prompts: str | None = setting("demo:eval_prompts", "held-out prompts for pass rates and `spa-lite winrate`")
    format: str = setting("auto", "auto | conversational | standard | ultrafeedback | hh | prompts",
                          choices=("auto", "conversational", "standard", "ultrafeedback", "hh", "prompts"))
    seed_limit: int | None = setting(None, "use the first N seed pairs (after shuffling)", ge=1)
    iter_prompts: list[int] = setting(factory=lambda: [8000, 20000, 30000], help="|X_i| per iteration, disjoint", ge=1)
    shuffle_seed: int = setting(42, "seed of the shuffle before the split into D0 and X_1, X_2, ...")


@dataclass
class SeedDPOConfig:
    """Stage 0, DPO on the gold pairs. Every field also belongs to ``train`` (TrainConfig extends this class),
    and reaches the training loop by name (``spa_lite.training.LoopSpec.from_config``): a new loop setting is
    one field here and the ``LoopSpec`` field the loop reads."""

    epochs: float = setting(3.0, "passes over the pairs", gt=0)
    lr: float = setting(5e-5, "AdamW learning rate; LoRA needs ~100x the full fine-tuning lr (paper: 5e-7 full "
                        "FT)", gt=0)
    batch_size: int = setting(4, "pairs per micro-batch", ge=1)
    grad_accum: int = setting(8, "micro-batches per optimizer step: effective batch = batch_size * grad_accum "
                              "(paper: 32)", ge=1)
    beta: float = setting(0.1, "DPO's beta (KL strength)", gt=0)
    warmup_ratio: float = setting(0.1, "fraction of optimizer steps of linear warmup", ge=0, le=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", gt=0)
    save_every: int = setting(20, "optimizer steps between resumable checkpoints", ge=1)
    loss: str = setting("dpo", "dpo | dro (Wasserstein-DRO, docs/dro.md)", choices=("dpo", "dro"))
    label_smoothing: float = setting(0.0, "cDPO's constant smoothing, for robustness comparisons", ge=0, lt=0.5)
    dro_epsilon: float = setting(0.01, "Wasserstein radius for loss dro, in probability units: the first moves "
                                 "cost 1/xi_min per unit (docs/dro.md)", ge=0)
    dro_pieces: int = setting(8, "linear pieces approximating -log (loss dro)", ge=1)
    dro_xi_min: float = setting(1e-3, "lower end of the support of xi (loss dro)", gt=0, lt=1)
    diverge_factor: float = setting(0.0, "stop when a step's loss exceeds k times the first step's (0: off; not in "
                                    "the config hash)", gt=1, off=0)


@dataclass
class ExpandConfig:
    num_samples: int = setting(2, "responses per prompt: 2 is the paper's pair (y1, y2); N > 2 keeps the best and the "
                               "worst of the N by judged reward (judge logprob or reward; more samples and judging)",
                               ge=2, why="a pair needs two responses")
    temperature: float = setting(0.7, "sampling temperature", ge=0)
    top_p: float = setting(1.0, "nucleus sampling", gt=0, le=1)
    max_new_tokens: int = setting(300, "response length limit in tokens", ge=1)
    batch_size: int = setting(16, "prompts per generation batch", ge=1)
    shard_size: int = setting(64, "prompts per resumable shard", ge=1)
    judge: str = setting("logprob", "logprob (Eq. 7) | reward (the Bradley-Terry reward adapter of `spa-lite reward`: "
                         "p = sigmoid(r(y1) - r(y2)), no beta) | logprob+reward (the mean of both p) | llm "
                         "(LLM-as-judge prompt) | verifier (demo task's gold verifier: the oracle-label control; "
                         "undecided pairs dropped unless expand.verifier_undecided: coin)",
                         choices=("logprob", "reward", "logprob+reward", "llm", "verifier"))
    verifier_accuracy: float = setting(1.0, "judge verifier only: each decided pair keeps the verifier's label with "
                                       "this probability and is flipped otherwise (a noisy oracle, seeded per prompt: "
                                       "how accurate labels must be for a gain; 1: exact)", ge=0.5, le=1)
    verifier_flip: str = setting("random", "which decided pairs the noisy oracle flips: random (any pair, at rate "
                                 "1 - verifier_accuracy) | shorter (only pairs whose passing response is the longer, "
                                 "at twice that rate: errors that lean to the shorter answer, as Eq. 7's did)",
                                 choices=("random", "shorter"))
    verifier_undecided: str = setting("drop", "judge verifier only, pairs the verifier cannot decide (both pass or both "
                                      "fail): drop (the oracle) | coin (kept, labelled by a fair coin seeded per "
                                      "prompt: labels with no lean on pairs without a preference, what SPA trains on "
                                      "there at best; counted as undecided_coin)", choices=("drop", "coin"))
    verifier_decided: bool = setting(False, "a control for the demo task, with a model judge at N = 2: on each pair "
                                     "the verifier decides, the judge's label is turned to the verifier's (its "
                                     "confidence kept); every other pair keeps the judge's label. How SPA does with "
                                     "a judge right on every decided pair")
    judge_ref: str = setting("init", "init | prev | none: the reference in Eq. 7's log-ratio",
                             choices=("init", "prev", "none"))
    judge_batch_size: int = setting(8, "pairs per judging forward pass", ge=1)
    judge_logps: str = setting("sampler", "sampler: log pi_{i-1}(y|x) read off the sampling pass (one forward "
                               "saved, self-checked) | forward", choices=("sampler", "forward"))
    beta: float = setting(0.1, "beta of Eq. 7's implicit reward", gt=0)
    length_penalty: float = setting(0.0, "a in Eq. 13, |y| in tokens: Eq. 7's reward is beta * (log-ratio - a * |y|); "
                                    "with judge reward the adapter's score is r - a * |y| (no beta, so the same a "
                                    "weighs 1/beta times more there); with logprob+reward Eq. 7's half only. A "
                                    "negative a favours longer answers. Refused with judge llm or verifier")
    judge_norm: str = setting("sum", "sum: Eq. 7's log-ratios summed over the response (paper) | per_token: divided "
                              "by its token count (bench/judge_quality.py)", choices=("sum", "per_token"))
    min_confidence: float = setting(0.0, "drop judged pairs with confidence max(p, 1-p) below this (counted as "
                                    "below_min_confidence; 0: off)", ge=0.5, le=1, off=0)
    length_balance: bool = setting(False, "after judging, drop the least confident pairs of whichever side is in the "
                                   "majority (chosen longer vs chosen shorter, in tokens; equal lengths count for "
                                   "neither) until both are equal in number (counted as length_balance_dropped). It "
                                   "evens the count, not the length gap: on the demo SPA still collapsed with it "
                                   "(README, \"How right must the labels be?\")")
    drop_truncated: bool = setting(False, "drop pairs where a response hit max_new_tokens (counted either way)")
    max_length_ratio: float = setting(0.0, "length-matched pairs: a pair is formed only from two responses whose "
                                      "token counts differ by at most this factor (longer <= R x shorter); at N = 2 a "
                                      "prompt whose two samples differ more is dropped, at N > 2 the pair is the "
                                      "largest judged reward gap among the length-matched pairs. Counted as "
                                      "length_mismatched. Whatever the judge's length lean, such pairs teach little "
                                      "length (bench/judge_quality_protocol.md, 2026-12-06 09:07; 0: off)",
                                      gt=1, off=0)
    reward_cut_eos: bool = setting(False, "judge reward or logprob+reward: a response cut at max_new_tokens (it has no "
                                   "end-of-turn token) is scored by the reward adapter with one appended, as every "
                                   "response it was trained on ends. Off: scored as sampled; the demo's adapter then "
                                   "preferred cut responses; on, its dev accuracy rose (bench/RESULTS.md). "
                                   "SPA with it (N 4, seed 42) still lost to pi_0: its labels leaned short")
    backend: str = setting("hf", "hf (transformers generate on the stack) | vllm (pip install 'spa-lite[vllm]', "
                           "CUDA)", choices=("hf", "vllm"))
    sample_dtype: str = setting("auto", "precision of decoding in expand, eval, export-answers, winrate: auto "
                                "(bfloat16 on a CPU with bf16 matrix units, except where expand records Eq. 7's "
                                "log-probs while sampling; else the model's) | model | bfloat16 | float16 | float32. "
                                "A reduced dtype named here with judge_logps: sampler also gives Eq. 7 the reduced "
                                "copy's log-probs (approximate labels); judge_logps: forward keeps Eq. 7 exact",
                                choices=("auto", "model", "bfloat16", "float16", "float32"))


@dataclass
class RewardConfig:
    """`spa-lite reward`: a Bradley-Terry reward model on the gold pairs D0 (one more LoRA adapter on the base plus
    a scalar head), the judge of ``expand.judge: reward``."""

    epochs: float = setting(2.0, "passes over the gold pairs", gt=0)
    lr: float = setting(1e-4, "AdamW learning rate of the reward adapter and its head", gt=0)
    batch_size: int = setting(4, "pairs per micro-batch", ge=1)
    grad_accum: int = setting(4, "micro-batches per optimizer step", ge=1)
    warmup_ratio: float = setting(0.1, "fraction of optimizer steps of linear warmup", ge=0, le=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", gt=0)
    save_every: int = setting(20, "optimizer steps between resumable checkpoints", ge=1)
    center_rewards_coefficient: float = setting(0.0, "TRL's center_rewards_coefficient: adds c * mean((r_chosen + "
                                                "r_rejected)^2) to the loss (0: off)", ge=0)
    holdout: float = setting(0.1, "fraction of D0 held out for the manifest's gold accuracy when data.eval_pairs is "
                             "unset (those pairs are not trained on)", ge=0, lt=1)
    eval_limit: int = setting(500, "held-out gold pairs scored for the manifest's accuracy", ge=1)
    lora_r: int | None = setting(None, "LoRA rank of the reward adapter (None: model.lora_r)", ge=1)
    lora_alpha: int | None = setting(None, "LoRA alpha of the reward adapter (None: model.lora_alpha)", gt=0)
    length_head: bool = setting(False, "ODIN (Chen et al., 2024): a second head on the same features takes the "
                                "length signal. The Bradley-Terry loss is on the sum of both heads, plus |Pearson("
                                "r_quality, tokens)| - Pearson(r_length, tokens) over each micro-batch's responses, "
                                "plus |cos| of the two heads' weights; the judge reads the quality head alone")


@dataclass
class TrainConfig(SeedDPOConfig):
    """Iteration training: seed DPO's settings, plus self-refinement (Eq. 10) and de-coupled noise detection."""

    epochs: float = setting(1.0, "passes over D_i per iteration (paper: one)", gt=0)
    refine: bool = setting(True, "self-refinement, Eq. 10")
    alpha: float = setting(0.1, "label smoothing for flagged pairs", ge=0, lt=0.5, why="0.5 would erase the label")
    k_percent: float = setting(10.0, "tau = K-th percentile of recent confidences", gt=0, lt=100)
    window: int = setting(50, "confidences kept for tau", ge=1)
    refine_start: float = setting(0.2, "fraction of optimizer steps before refinement starts", ge=0, le=1)
    dnd: bool = setting(True, "de-coupled noise detection, Eq. 11-12")
    lambdas: list[float] = setting(factory=lambda: [0.5, 0.25, 0.125],
                                   help="DND's lambda for iterations 1, 2, 3, then halving", ge=0)
    audit_labels: bool = setting(False, "pairs of D_i a person audited (`spa-lite inspect`, iter{i}/audit.jsonl) "
                                 "train on the human label (ties and skips keep the self-label); the manifest "
                                 "counts gold and self labels")


@dataclass
class MemoryConfig:
    malloc: str = setting("auto", "glibc's heap on CPU (Linux; never on CUDA): tuned (mmap threshold fixed at "
                          "mmap_threshold_kib, heap trimmed after every optimizer step: lowest peak, page faults cost "
                          "time) | glibc (glibc's own heap, trimmed between stages) | auto (glibc on CUDA, tuned on CPU). "
                          "SPA_LITE_MALLOC overrides it; `spa-lite doctor` shows what applies",
                          choices=("auto", "tuned", "glibc"))
    mmap_threshold_kib: int = setting(64, "malloc tuned: heap blocks of this size or more get their own mapping, "
                                      "unmapped when freed (glibc's default moves up to 32 MiB)", ge=4, le=32768)


@dataclass
class Recipe:
    name: str = setting("spa-run", "run name: the run lives in run_dir/name")
    run_dir: str = setting("runs", "parent folder of runs")
    seed: int = setting(42, "random seed of the run (sampling, training order)")
    iterations: int = setting(2, "T, the SPA iterations after seed DPO", ge=0)
    threads: int | None = setting(None, "torch CPU threads (None: torch's default)", ge=1)
    report_to: list[str] = setting(factory=list, help="experiment trackers: tensorboard, wandb, trackio (none: "
                                   "the default)")
    model: ModelConfig = setting(factory=ModelConfig, help="the base model (pi_init) and the LoRA adapters")
    data: DataConfig = setting(factory=DataConfig, help="seed pairs, prompt pool and held-out data")
    seed_dpo: SeedDPOConfig = setting(factory=SeedDPOConfig, help="stage 0: DPO on the gold seed pairs")
    reward: RewardConfig = setting(factory=RewardConfig, help="`spa-lite reward`: the reward adapter that "
                                   "expand.judge: reward labels with")
    expand: ExpandConfig = setting(factory=ExpandConfig, help="sampling and judging (Eq. 7) per iteration")
    train: TrainConfig = setting(factory=TrainConfig, help="iteration training: seed_dpo's keys plus refinement "
                                 "and DND")
    memory: MemoryConfig = setting(factory=MemoryConfig, help="process memory on CPU: how glibc's heap is tuned "
                                   "(no effect on what a stage computes)")
    # how the user named this recipe on the command line (recipe, --name, --run-dir, --set), for the rerun commands
    # that error messages suggest; set by the CLI (``tasks.RecipeArgs.load``), not a setting (no field, no hash)
    rerun_args: typing.ClassVar[str] = "RECIPE"

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "seed_dpo", "reward", "expand", "train", "memory")


def field_help(section: str, key: str) -> str:
    """The help text of recipe key ``section.key`` (section "" for a top-level key)."""
    cls = typing.get_type_hints(Recipe)[section] if section else Recipe
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == key)


# (section, key) -> allowed values, from the fields' ``choices``
_CHOICES = {(section, f.name): set(f.metadata["choices"]) for section in SECTIONS
            for f in dataclasses.fields(typing.get_type_hints(Recipe)[section]) if "choices" in f.metadata}


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in {"true", "1", "yes", "on"}:
            return True
        if value.lower() in {"false", "0", "no", "off"}:
            return False
        raise ValueError
    if not isinstance(value, bool):
        raise ValueError
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)):
        raise ValueError
    return str(value)


# scalar field type -> converter raising ValueError or TypeError on a value that is not one
_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


def coerce_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """``value`` as type ``tp`` (a recipe field's, or a command option's); a value that is not one is reported in
    ``problems`` as ``where: expected ...`` and returned as it was."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_value(value, inner[0], where, problems)
    if origin is list:
        return _coerce_list(value, args[0], where, problems)
    convert = _SCALARS.get(tp)
    if convert is None:
        return value
    try:
        return convert(value)
    except (TypeError, ValueError):
        problems.append(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
        return value


def _coerce_list(value: Any, item_tp: Any, where: str, problems: list[str]) -> Any:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        problems.append(f"{where}: expected a list, got {value!r}")
        return value
    return [coerce_value(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]


def _fill(obj: Any, data: dict, prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(names))})")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"{where}: expected a mapping")
                continue
            _fill(current, value, f"{where}.", problems)
        else:
            before = len(problems)
            coerced = coerce_value(value, hints[key], where, problems)
            if len(problems) == before:  # a bad value keeps the default, so validate() still sees the right types
                setattr(obj, key, coerced)


def plain_name_problem(value: str, what: str) -> str | None:
    """Why ``value`` is not a plain name (one path component that stays inside its parent folder), or None."""
    if not value or value in {".", ".."} or any(c in value for c in "/\\\0") or value != value.strip():
        return f"{what}: '{value}' must be a plain name (no path separators, not '.' or '..', not empty)"
    return None


def _bounds_problems(obj: Any, section: str) -> list[str]:
    """The fields of ``obj`` (recipe section ``section``, "" for the top level) outside their ``Bounds``;
    a float field without bounds must still be finite (YAML's .nan and .inf parse as floats)."""
    problems = []
    for f in dataclasses.fields(obj):
        v, bounds = getattr(obj, f.name), f.metadata.get("bounds")
        where = f"{section}.{f.name}" if section else f.name
        if bounds is None:
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{where}: {v!r} must be a finite number")
            continue
        for x in v if isinstance(v, list) else [v]:
            if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
                continue  # None means "not set" (threads, seed_limit); types were checked when filling
            if isinstance(x, float) and not math.isfinite(x):  # .inf and .nan pass no comparison: say why
                problems.append(f"{where}: {x!r} must be a finite number ({bounds})")
                break
            if not bounds.allows(x):
                problems.append(f"{where}: {x!r} must be {bounds}" + (f" ({bounds.why})" if bounds.why else ""))
                break
    return problems


#: judges that score single responses, so expand can keep the best and the worst of N > 2 samples
BEST_WORST_JUDGES = ("logprob", "reward")
#: judges that read the reward stage's adapter
REWARD_JUDGES = ("reward", "logprob+reward")


def _judge_problems(e: ExpandConfig) -> list[str]:
    """Judge settings that do not go together (each names what it needs)."""
    problems = []
    if e.num_samples > 2 and e.judge not in BEST_WORST_JUDGES:
        problems.append(f"expand.num_samples: {e.num_samples} (best vs worst of N) needs a judge that scores "
                        f"single responses ({', '.join(BEST_WORST_JUDGES)}), not '{e.judge}'")
    if e.verifier_accuracy < 1 and e.judge != "verifier":
        problems.append(f"expand.verifier_accuracy: {e.verifier_accuracy} flips the verifier's labels and "
                        f"needs expand.judge: verifier, not '{e.judge}'")
    if e.reward_cut_eos and e.judge not in REWARD_JUDGES:
        problems.append("expand.reward_cut_eos: changes what the reward adapter scores; it needs expand.judge reward "
                        f"or logprob+reward, not '{e.judge}'")
    if e.reward_cut_eos and e.drop_truncated:
        problems.append("expand.reward_cut_eos: scores cut responses, but expand.drop_truncated: true drops them "
                        "first, so it would change nothing; set one of the two")
    if e.verifier_decided and (e.judge == "verifier" or e.num_samples > 2):
        problems.append("expand.verifier_decided: corrects a model judge's labels of N = 2 pairs; it needs a judge "
                        f"other than verifier and num_samples 2 (got '{e.judge}', "
                        f"{e.num_samples})")
    if e.length_penalty != 0 and e.judge in ("llm", "verifier"):
        problems.append(f"expand.length_penalty: {e.length_penalty} changes a scored reward; judge '{e.judge}' "
                        "scores none, so it would change nothing")
    if e.verifier_undecided != "drop" and e.judge != "verifier":
        problems.append(f"expand.verifier_undecided: '{e.verifier_undecided}' labels the pairs the verifier cannot "
                        f"decide and needs expand.judge: verifier, not '{e.judge}'")
    if e.max_length_ratio and e.judge == "verifier":
        problems.append(f"expand.max_length_ratio: {e.max_length_ratio} would leave the oracle control's pairs "
                        "(expand.judge: verifier) chosen by length as well as by the verifier; not offered there")
    if e.verifier_flip != "random" and e.verifier_accuracy == 1:
        problems.append("expand.verifier_flip: 'shorter' chooses which labels the noisy oracle flips and needs "
                        "expand.verifier_accuracy below 1")
    return problems


def validate(recipe: Recipe) -> list[str]:
    problems = []
    for what, value in (("name", recipe.name),):
        p = plain_name_problem(value, what)
        if p:
            problems.append(p)
    for section in ("",) + SECTIONS:  # numbers within their fields' bounds
        problems += _bounds_problems(getattr(recipe, section) if section else recipe, section)
    for (section, key), allowed in _CHOICES.items():
        v = getattr(getattr(recipe, section), key)
        if v not in allowed:
            problems.append(f"{section}.{key}: '{v}' is not one of {', '.join(sorted(allowed))}")
    if len(recipe.data.iter_prompts) < recipe.iterations:
        problems.append(f"data.iter_prompts: has {len(recipe.data.iter_prompts)} sizes for {recipe.iterations} iterations")
    trackers = {"tensorboard", "wandb", "trackio", "none"}
    bad = [t for t in recipe.report_to if t not in trackers]
    if bad:
        problems.append(f"report_to: {', '.join(map(str, bad))} not among {', '.join(sorted(trackers))}")
    problems += _judge_problems(recipe.expand)
    if recipe.model.max_prompt_length >= recipe.model.max_length:
        problems.append("model.max_prompt_length: must be < model.max_length")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` as (["section", "key"], the value read as YAML)."""
    if "=" not in text:
        raise SpaError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def parse_overrides(texts: typing.Iterable[str] | None) -> dict[str, Any]:
    """The command line's ``--set`` overrides (``["train.lr=1e-4", ...]``) as ``{"train.lr": 1e-4}``, in order: the
    one parser of overrides, for the CLI and the Python API (``spa_lite.load_recipe``)."""
    out: dict[str, Any] = {}
    for text in texts or []:
        keys, value = parse_override(text)
        out[".".join(keys)] = value
    return out


MAX_YAML_DEPTH = 64


def _flow_depth(text: str) -> int:
    """Deepest nesting of YAML flow brackets ([ and {) outside quotes: a linear scan, before PyYAML sees it."""
    depth = deepest = 0
    quote = None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth = max(0, depth - 1)
        elif ch == "\n":
            quote = None  # an unclosed quote does not hide the rest of the file
    return deepest


def _read_yaml(path: Path) -> Any:
    """A recipe file's YAML (safe_load; a UTF-8 byte-order mark allowed); every way it can be unreadable is a
    SpaError naming the file (and the line, where YAML knows it)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpaError(f"{path}: not UTF-8 text (byte offset {e.start}); save the recipe as UTF-8") from None
    if _flow_depth(text) > MAX_YAML_DEPTH:  # PyYAML is pure Python: 1,500 nested brackets took it over 30 s
        raise SpaError(f"{path}: YAML nested more than {MAX_YAML_DEPTH} levels deep (a recipe needs 3)")
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SpaError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise SpaError(f"{path}: YAML nested too deeply to read") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise SpaError(f"{path}: invalid YAML ({e})") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Load a recipe from YAML and apply ``section.key=value`` overrides.

    Raises:
        SpaError: listing every unknown key and bad value, with the file they came from.
    """
    recipe = Recipe()
    problems: list[str] = []
    source = "defaults"
    if path is not None:
        path = resolve_recipe_path(path)
        source = str(path)
        data = _read_yaml(path)
        if not isinstance(data, dict):
            raise SpaError(f"{path}: a recipe must be a mapping of sections")
        _fill(recipe, data, "", problems)
    # every problem is reported at once: unknown keys and bad values of the file, of the overrides, and the
    # checks of the merged recipe
    override_problems: list[str] = []
    items = list((overrides if isinstance(overrides, dict) else parse_overrides(overrides)).items())
    for keys, value in items:
        if isinstance(keys, str):
            keys = keys.split(".")
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _fill(recipe, nested, "", override_problems)
    # a bad value is blamed where it was given: the file, or the overrides (--set, --name, --run-dir, flags)
    given = {k if isinstance(k, str) else ".".join(k) for k, _ in items}
    for p in validate(recipe):
        key = p.split(":", 1)[0].split("[", 1)[0]
        by_override = any(key == g or key.startswith(g + ".") for g in given)
        (override_problems if by_override else problems).append(p)
    parts = ([f"{source}: " + "; ".join(problems)] if problems else []) + (
        ["overrides (--set, --name, --run-dir, flags): " + "; ".join(override_problems)] if override_problems else [])
    if parts:
        raise SpaError(" | ".join(parts))
    return recipe


# ------------------------------------------------------------------------------------ the recipe reference

REFERENCE_BEGIN = "<!-- recipe-reference: generated from spa_lite/config.py by `python -m spa_lite.config --write README.md` -->"
REFERENCE_END = "<!-- /recipe-reference -->"


def _yaml_value(v: Any) -> str:
    if dataclasses.is_dataclass(v):
        return "(section)"
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def recipe_reference() -> str:
    """README's recipe reference: every key, its default, its bounds and its help text, as one markdown table.

    ``train`` lists only what it adds to ``seed_dpo`` or sets differently (its other keys are seed_dpo's).
    """
    rows = ["| key | default | allowed | what |", "|---|---|---|---|"]

    def add(key: str, value: Any, f: dataclasses.Field) -> None:
        what = f.metadata.get("help", "").replace("|", "\\|")
        bounds = f.metadata.get("bounds")
        rows.append(f"| `{key}` | `{_yaml_value(value)}` | {'' if bounds is None else bounds} | {what} |")

    recipe, seed_keys = Recipe(), {f.name: f for f in dataclasses.fields(SeedDPOConfig)}
    for f in dataclasses.fields(Recipe):
        value = getattr(recipe, f.name)
        if not dataclasses.is_dataclass(value):
            add(f.name, value, f)
            continue
        rows.append(f"| **`{f.name}`** | | | {f.metadata.get('help', '')} |")
        if f.name == "train":
            rows.append("| `train.*` | as `seed_dpo` | | every `seed_dpo` key, with seed_dpo's default unless listed "
                        "here |")
        for g in dataclasses.fields(value):
            v = getattr(value, g.name)
            if f.name == "train" and g.name in seed_keys and v == getattr(recipe.seed_dpo, g.name):
                continue
            add(f"{f.name}.{g.name}", v, g)
    return "\n".join(rows) + "\n"


def replace_reference(text: str) -> str:
    """``text`` (README.md) with the part between the reference markers regenerated.

    Raises:
        SpaError: when the markers are missing.
    """
    start, end = text.find(REFERENCE_BEGIN), text.find(REFERENCE_END)
    if start < 0 or end < start:
        raise SpaError(f"no recipe reference markers ({REFERENCE_BEGIN} ... {REFERENCE_END}) in the file")
    return text[: start + len(REFERENCE_BEGIN)] + "\n" + recipe_reference() + text[end:]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m spa_lite.config", description="The recipe reference (README.md).")
    ap.add_argument("--write", metavar="FILE", help="regenerate the reference between the markers of FILE")
    args = ap.parse_args()
    if args.write:
        path = Path(args.write)
        atomic_write_text(path, replace_reference(path.read_text(encoding="utf-8")))
        print(f"wrote the recipe reference into {path}")
    else:
        print(recipe_reference(), end="")
