"""Options of the commands outside the recipe (eval, winrate, export-answers, plan, split): one dataclass each.

Every option is written once, as a field made with the recipe's ``setting()`` helper: its default, help text,
bounds and choices. The Python API takes the fields as keyword arguments (``spa_lite.evaluate(recipe,
limit=50)``) and builds the dataclass; the CLI's flags are generated from the same fields (``cli_parameters``)
and handed to the API unchanged. Building the dataclass validates it: values are coerced as recipe overrides
are (``spa_lite.config``; a list option also takes the command line's comma-separated text), and every bad
value is reported at once in one SpaError naming the option (``--limit``). A new option is one field here.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

from spa_lite.config import coerce_value, plain_name_problem, setting
from spa_lite.errors import SpaError
from spa_lite.plan import QUANTIZATIONS

PAIR_FORMATS = ("auto", "conversational", "standard", "ultrafeedback", "hh")
BENCHMARKS = ("alpaca-eval", "mt-bench")
WINRATE_JUDGES = ("verifier", "local", "http")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (),
           argument: bool = False, **kw) -> Any:
    """A command option: ``setting()`` (default, help, ``choices``, bounds) plus how the CLI spells it.

    Args:
        flags: the option's flags (default ``--name-with-dashes``; ``--x/--no-x`` for a bool).
        argument: a positional argument of the command instead of a flag.
    """
    f = setting(default, help, **kw)
    f.metadata = types.MappingProxyType({**f.metadata, "flags": tuple(flags), "argument": argument,
                                         "why": kw.get("why", "")})
    return f


def flag_name(f: dataclasses.Field) -> str:
    """How errors name option ``f``: its first flag (``--limit``), or its name in capitals for an argument."""
    if f.metadata.get("argument"):
        return f.name.upper()
    return (f.metadata.get("flags") or (f"--{f.name.replace('_', '-')}",))[0].split("/")[0]


def _inner(tp: Any) -> tuple[Any, bool]:
    """``tp`` without ``| None``, and whether None was allowed."""
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _value_problems(f: dataclasses.Field, name: str, value: Any) -> list[str]:
    """Choices and bounds of one option's (coerced) value: each item of a list."""
    bounds, choices = f.metadata.get("bounds"), f.metadata.get("choices")
    why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
    for x in value if isinstance(value, list) else [value]:
        if x is None:
            continue
        if choices and x not in choices:
            return [f"{name} '{x}' is not one of {', '.join(choices)}" + why]
        if bounds is not None and isinstance(x, (int, float)) and not isinstance(x, bool) and not bounds.allows(x):
            return [f"{name}: {x!r} must be {bounds}{why}"]
    return []


class Options:
    """Base of the option dataclasses: coerces and validates every field on construction."""

    command: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        problems: list[str] = []
        for f in dataclasses.fields(self):
            name, value = flag_name(f), getattr(self, f.name)
            tp, _ = _inner(hints[f.name])
            if typing.get_origin(tp) is list and isinstance(value, str):  # the command line's "a, b,c"
                value = [x.strip() for x in value.split(",") if x.strip()]
            if value == [] and f.default_factory is not dataclasses.MISSING:  # `--methods ""`: the default list
                value = f.default_factory()
            before = len(problems)
            value = coerce_value(value, hints[f.name], name, problems)
            if len(problems) > before:
                continue
            if tp is Path and value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    problems.append(f"{name}: expected a path, got {value!r}")
                    continue
                value = Path(value)
            setattr(self, f.name, value)
            problems += _value_problems(f, name, value)
        if not problems:
            problems = self.problems()
        if problems:
            raise SpaError("; ".join(problems))

    def problems(self) -> list[str]:
        """Checks across options (each field's own type, bounds and choices are checked before)."""
        return []

    @classmethod
    def build(cls, options: dict[str, Any]):
        """The options from keyword arguments; an unknown name is a SpaError listing the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SpaError(f"{cls.command}: unknown option {', '.join(unknown)} (known: {', '.join(known)})")
        return cls(**options)


@dataclass
class EvalOptions(Options):
    """`spa-lite eval` and ``spa_lite.evaluate``."""

    command: typing.ClassVar[str] = "eval"
    pairs: Optional[str] = option(None, "Gold pairs to judge (default: the recipe's data.eval_pairs).")
    fmt: Optional[str] = option(None, "Format of --pairs (auto-detected).", flags=("--format",), choices=PAIR_FORMATS)
    limit: int = option(200, "Use at most this many pairs.", ge=1)
    methods: list[str] = option(factory=lambda: ["init", "prev", "none"], choices=("init", "prev", "none", "llm"),
                                help="Judge methods: init,prev,none,llm (llm: the slow LLM-as-judge baseline).")
    flip: float = option(0.2, "Fraction of gold labels flipped for noise detection (0 to skip).", ge=0, lt=1)
    lambdas: Optional[list[float]] = option(None, "DND lambdas to compare, e.g. 0.5,0.25,0.125.", ge=0)
    pass_rate: bool = option(True, "Verifier pass rate (demo task).")
    prompt_limit: int = option(100, "Held-out prompts for the pass rate (0: all).", ge=0)
    samples: int = option(1, "Responses per held-out prompt (with --temperature > 0).", ge=1)
    temperature: float = option(0.0, "Decoding for the pass rate: 0 is greedy (paired across policies).", ge=0)
    tag: Optional[str] = option(None, "Name of the result file runs/<name>/eval/<tag>.json.")
    audit_only: bool = option(False, "Only the judges' agreement with the human audit (no model is loaded).",
                              flags=("--audit-only",))

    def problems(self) -> list[str]:
        p = None if self.tag is None else plain_name_problem(self.tag, "--tag")
        return [p] if p else []


@dataclass
class WinrateOptions(Options):
    """`spa-lite winrate` and ``spa_lite.policy_win_rate``."""

    command: typing.ClassVar[str] = "winrate"
    policy: str = option("last", "Candidate policy: last, init, 0, 1, ...")
    reference: str = option("init", "Reference policy: init, 0, 1, ...")
    judge: str = option("verifier", "verifier (demo task) | local (LLM-as-judge with pi_init) | http",
                        choices=WINRATE_JUDGES)
    judge_url: Optional[str] = option(None, "OpenAI-compatible base URL for --judge http.")
    judge_model: Optional[str] = option(None, "Model name at --judge-url.")
    judge_key_env: str = option("OPENAI_API_KEY", "Environment variable holding the API key.")
    prompts: Optional[str] = option(None, "Prompt file (default: the recipe's eval prompts).")
    limit: int = option(100, "At most this many prompts.", ge=1)

    def problems(self) -> list[str]:
        if self.judge == "http" and (not self.judge_url or not self.judge_model):
            return ["--judge http needs --judge-url and --judge-model"]
        return []


@dataclass
class ExportAnswersOptions(Options):
    """`spa-lite export-answers` and ``spa_lite.export_answers``."""

    command: typing.ClassVar[str] = "export-answers"
    questions: Path = option(help="AlpacaEval questions (JSON list) or MT-Bench question.jsonl.", argument=True)
    out: Path = option(help="model_outputs.json (AlpacaEval) or answer JSONL (MT-Bench).", flags=("--out", "-o"))
    benchmark: str = option("alpaca-eval", "alpaca-eval | mt-bench", choices=BENCHMARKS)
    policy: str = option("last", "Which policy answers: init, 0 (seed), 1, 2, ...")
    max_new_tokens: int = option(1024, "Answer length limit.", ge=1)
    temperature: Optional[float] = option(None, "Default: 0 for AlpacaEval, FastChat's per category for MT-Bench.",
                                          ge=0)
    limit: Optional[int] = option(None, "Answer only the first N questions.", ge=1)
    batch_size: int = option(8, "Questions per generation batch.", ge=1)


@dataclass
class PlanOptions(Options):
    """`spa-lite plan` and ``spa_lite.plan``."""

    command: typing.ClassVar[str] = "plan"
    model: Optional[str] = option(None, "Model folder, hub id, bundled alias or config.json (default: the recipe's).")
    gpu_mem: float = option(16.0, "GPU memory in GB to plan for.", gt=0)
    quantization: str = option("4bit", "4bit | none", choices=QUANTIZATIONS,
                               why="spa-lite loads a base in NF4 4-bit or unquantised; 8-bit bases are not supported")
    fsdp: int = option(1, "Processes that seed-dpo and train shard over (FSDP2; full-precision bases only).", ge=1)

    def problems(self) -> list[str]:
        if self.fsdp > 1 and self.quantization == "4bit":
            return ["--fsdp shards full-precision bases only: add --quantization none (a 4-bit base trains "
                    "data parallel, one copy per GPU)"]
        return []


@dataclass
class SplitOptions(Options):
    """`spa-lite split` and ``spa_lite.split``."""

    command: typing.ClassVar[str] = "split"
    data: str = option(help="Preference data: file, dataset folder or hub name.", argument=True)
    out: Path = option(help="Folder for the split files.", flags=("--out", "-o"))
    seed: int = option(42, "Shuffle seed (paper: 42).")
    seed_size: int = option(2000, "Gold seed pairs (paper: 2000).", ge=1)
    iter_sizes: list[int] = option(factory=lambda: [8000, 20000, 30000], ge=1,
                                   help="Comma-separated prompt counts per iteration.")
    test_size: int = option(0, "Held-out test pairs.", ge=0)
    fmt: str = option("auto", "auto | conversational | standard | ultrafeedback | hh", flags=("--format",),
                      choices=PAIR_FORMATS)


# ------------------------------------------------------------------------------------ the command line


def cli_default(f: dataclasses.Field) -> Any:
    """The CLI default of option ``f``: a list as the comma-separated text the flag takes; a required option
    has none (``inspect.Parameter.empty``)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return inspect.Parameter.empty
    return ",".join(map(str, value)) if isinstance(value, list) else value


def cli_help(f: dataclasses.Field) -> str:
    """The CLI help of option ``f``: its help text, then its bounds (as the recipe reference shows them)."""
    bounds = f.metadata.get("bounds")
    return f.metadata["help"] + (f" (allowed: {bounds})" if bounds is not None else "")


def cli_parameters(cls: type[Options]) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``cls``, annotated for Typer with the field's flags and help text."""
    import typer  # the front end's library: only the CLI asks for these parameters

    hints = typing.get_type_hints(cls)
    params = []
    for f in dataclasses.fields(cls):
        tp, optional = _inner(hints[f.name])
        if typing.get_origin(tp) is list:
            tp = str  # comma-separated on the command line
        tp = Optional[tp] if optional else tp
        dash = f.name.replace("_", "-")
        if f.metadata.get("argument"):
            info = typer.Argument(help=cli_help(f), show_default=False)
        else:
            flags = f.metadata.get("flags") or ((f"--{dash}/--no-{dash}",) if tp is bool else (f"--{dash}",))
            info = typer.Option(*flags, help=cli_help(f))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=cli_default(f),
                                        annotation=Annotated[tp, info]))
    return params
