"""`spa-lite export-answers`: a policy's answers in the files AlpacaEval 2.0 and MT-Bench (FastChat) read.

AlpacaEval 2.0   questions: a JSON list of {"instruction", "dataset"?, ...} (alpaca_eval.json);
                 answers:   model_outputs.json, a JSON list of {"instruction", "output", "generator", "dataset"?}.
MT-Bench         questions: FastChat's question.jsonl, {"question_id", "category", "turns": [str, ...]};
                 answers:   FastChat's model_answer/<model_id>.jsonl, {"question_id", "answer_id", "model_id",
                            "choices": [{"index": 0, "turns": [str, ...]}], "tstamp"}; turn t is generated with
                            the questions and the model's own answers of turns < t in the prompt.

The writers take a ``generate`` callable, ``generate(prompts, temperature) -> list[str]`` with one chat prompt
(a list of {"role", "content"} messages) per answer, so tests run without a model; ``make_generate`` builds
one from a PolicyStack with ``generate_answers``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from spa_lite.errors import DataError
from spa_lite.generation import sample_responses
from spa_lite.io import atomic_write_json, atomic_write_jsonl, read_json, read_jsonl
from spa_lite.sampling_copy import sampling_dtype

GenerateFn = Callable[[Sequence[Sequence[dict]], float], list[str]]

# FastChat's gen_model_answer.py temperatures per MT-Bench category (used when no temperature is given).
MT_BENCH_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7


# ----------------------------------------------------------------------------------------------- generation

def generate_answers(stack, names: Sequence[str], prompts_messages: Sequence[Sequence[dict]], max_new_tokens: int,
                     temperature: float, batch_size: int, seed: int = 0, on_batch=None,
                     sample_dtype: str = "model") -> list[str]:
    """One answer per chat prompt from the policy of adapters ``names`` ([] is pi_init); temperature 0 is greedy.

    ``on_batch(n)`` is called after each batch of n answers (progress bars); ``sample_dtype`` as
    ``expand.sample_dtype``."""
    if not prompts_messages:
        return []
    with stack.use(list(names)) as m:
        outs = sample_responses(m, stack.tokenizer, [list(p) for p in prompts_messages], num_samples=1,
                                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                batch_size=batch_size, on_batch=on_batch, dtype=sampling_dtype(sample_dtype, m))
    return [s[0].text for s in outs]


def make_generate(stack, names: Sequence[str], max_new_tokens: int = 1024, batch_size: int = 8,
                  seed: int = 0, on_batch=None, sample_dtype: str = "model") -> GenerateFn:
    """A ``generate(prompts, temperature)`` callable over ``generate_answers`` for the writers below."""

    def generate(prompts: Sequence[Sequence[dict]], temperature: float) -> list[str]:
        return generate_answers(stack, names, prompts, max_new_tokens, temperature, batch_size, seed, on_batch,
                                sample_dtype)

    return generate


def _checked(outputs: list[str], n: int) -> list[str]:
    if len(outputs) != n:
        raise ValueError(f"generate returned {len(outputs)} answers for {n} prompts")
    return [str(o) for o in outputs]


# ----------------------------------------------------------------------------------------------- AlpacaEval

def read_alpaca_eval_questions(path: str | Path) -> list[dict]:
    """AlpacaEval's question file: a JSON list of objects with "instruction" (a .jsonl file is read line by line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = [r for _, r in read_jsonl(path)]
    else:
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DataError(path, None, None, f"expected a JSON list of questions, got {type(rows).__name__}")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            raise DataError(path, None, f"[{i}].instruction", "missing or not a string")
    return rows


def alpaca_eval_outputs(instructions: list[dict], outputs: list[str], generator: str) -> list[dict]:
    """AlpacaEval 2.0 model_outputs records: instruction, output, generator (and dataset where the question has it)."""
    outputs = _checked(list(outputs), len(instructions))
    rows = []
    for q, out in zip(instructions, outputs):
        row = {"instruction": q["instruction"], "output": out, "generator": generator}
        if "dataset" in q:
            row["dataset"] = q["dataset"]
        rows.append(row)
    return rows


def write_alpaca_eval_outputs(path: str | Path, rows: list[dict]) -> Path:
    """Write model_outputs.json atomically."""
    path = Path(path)
    atomic_write_json(path, rows)
    return path


def export_alpaca_eval(questions_path: str | Path, out_path: str | Path, generate: GenerateFn, generator: str,
                       temperature: float = 0.0, limit: int | None = None) -> list[dict]:
    """Answer every AlpacaEval instruction (a single user turn) and write model_outputs.json; returns the records."""
    qs = read_alpaca_eval_questions(questions_path)[:limit]
    prompts = [[{"role": "user", "content": q["instruction"]}] for q in qs]
    rows = alpaca_eval_outputs(qs, generate(prompts, temperature), generator)
    write_alpaca_eval_outputs(out_path, rows)
    return rows


# ----------------------------------------------------------------------------------------------- MT-Bench

def read_mt_bench_questions(path: str | Path) -> list[dict]:
    """FastChat's question.jsonl: {"question_id", "category", "turns": [str, ...]} per line."""
    rows = []
    for line, r in read_jsonl(path):
        if "question_id" not in r:
            raise DataError(path, line, "question_id", "missing")
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DataError(path, line, "turns", "expected a non-empty list of strings")
        rows.append(r)
    return rows


def mt_bench_messages(turns: Sequence[str], answers: Sequence[str]) -> list[dict]:
    """The chat prompt of turn len(answers): every earlier question with the model's answer, then the next question."""
    msgs: list[dict] = []
    for q, a in zip(turns, answers):
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": turns[len(answers)]}]


def mt_bench_answers(questions: list[dict], generate: GenerateFn, model_id: str, temperature: float | None = None,
                     tstamp: float | None = None) -> list[dict]:
    """FastChat answer records; turn t of all questions is generated in one call per temperature.

    Args:
        temperature: for every question; None uses FastChat's per-category temperatures (MT_BENCH_TEMPERATURE).
    """
    answers: list[list[str]] = [[] for _ in questions]
    temps = [temperature if temperature is not None
             else MT_BENCH_TEMPERATURE.get(q.get("category"), MT_BENCH_DEFAULT_TEMPERATURE) for q in questions]
    for t in range(max((len(q["turns"]) for q in questions), default=0)):
        todo = [i for i, q in enumerate(questions) if len(q["turns"]) > t]
        for temp in sorted({temps[i] for i in todo}):
            idx = [i for i in todo if temps[i] == temp]
            outs = _checked(list(generate([mt_bench_messages(questions[i]["turns"], answers[i]) for i in idx], temp)),
                            len(idx))
            for i, o in zip(idx, outs):
                answers[i].append(o)
    now = time.time() if tstamp is None else tstamp
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": [{"index": 0, "turns": a}], "tstamp": now} for q, a in zip(questions, answers)]


def write_mt_bench_answers(path: str | Path, rows: list[dict]) -> Path:
    """Write FastChat's answer JSONL atomically, sorted by question_id as FastChat's reorg_answer_file does."""
    path = Path(path)
    try:
        rows = sorted(rows, key=lambda r: r["question_id"])
    except TypeError:  # mixed id types: keep the question order
        pass
    atomic_write_jsonl(path, rows)
    return path


def export_mt_bench(questions_path: str | Path, out_path: str | Path, generate: GenerateFn, model_id: str,
                    temperature: float | None = None, limit: int | None = None) -> list[dict]:
    """Answer every MT-Bench question turn by turn and write FastChat's answer JSONL; returns the records."""
    qs = read_mt_bench_questions(questions_path)[:limit]
    rows = mt_bench_answers(qs, generate, model_id, temperature)
    write_mt_bench_answers(out_path, rows)
    return rows


__all__ = ["generate_answers", "make_generate", "read_alpaca_eval_questions", "alpaca_eval_outputs",
           "write_alpaca_eval_outputs", "export_alpaca_eval", "read_mt_bench_questions", "mt_bench_messages",
           "mt_bench_answers", "write_mt_bench_answers", "export_mt_bench", "MT_BENCH_TEMPERATURE"]
