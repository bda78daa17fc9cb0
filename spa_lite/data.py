"""Preference data and prompt pools in the common schemas, normalised to one shape.

A pair is ``{"prompt": [chat messages], "chosen": str, "rejected": str, ...}`` in memory; a prompt record is
``{"prompt": [chat messages], ...}``. Extra fields (ids, constraints) ride along untouched. Pair files that
spa-lite writes (D_i, `split`'s seed and test pairs) are in TRL's conversational preference format
(``to_trl_conversational``: chosen/rejected as assistant message lists), which ``trl.DPOTrainer`` reads as is;
``pair_texts`` reads either form back.

Schemas recognised (``format: auto`` picks by the first record's fields):
- conversational (TRL): prompt/chosen/rejected as message lists, or chosen/rejected as whole conversations;
- standard (TRL): prompt/chosen/rejected as plain strings;
- ultrafeedback: argilla cleaned and HuggingFaceH4 binarized (``prompt`` string; chosen/rejected as
  conversations whose last message is the assistant's);
- hh: HH-RLHF dialogue strings ``\\n\\nHuman: ...\\n\\nAssistant: ...`` sharing all but the last reply.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spa_lite.demo import demo_path
from spa_lite.errors import DataError, SpaError
from spa_lite.io import parse_json, read_jsonl, read_lines

log = logging.getLogger(__name__)

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def resolve_data_path(spec: str) -> Path | str:
    """``demo:NAME`` is a file shipped with spa-lite; paths pass through; other strings are dataset names."""
    if spec.startswith("demo:"):
        return demo_path(spec.split(":", 1)[1])
    p = Path(spec)
    return p if p.exists() or "/" not in spec or spec.startswith((".", "/")) else spec


MAX_DEPTH = 32  # nesting levels a record may have (messages are 3): deeper is refused, not recursed into


def _too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``obj`` nests lists and dicts more than ``limit`` levels (walked without recursion)."""
    stack = [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, dict)):
            if d >= limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def iter_records(spec: str, split: str = "train") -> Iterator[tuple[str, int, dict]]:
    """Yield (source, line, record) from JSONL, JSON, Parquet, a saved dataset folder or a hub dataset.

    Raises:
        DataError: naming the file and line of a record that cannot be read, or that nests deeper than
            ``MAX_DEPTH`` levels (the writers of D_i and split files would not get through it).
    """
    for src, line, rec in _records(spec, split):
        if _too_deep(rec):
            raise DataError(src, line, None, f"record nested more than {MAX_DEPTH} levels deep")
        yield src, line, rec


def _records(spec: str, split: str) -> Iterator[tuple[str, int, dict]]:
    src = resolve_data_path(spec)
    if not isinstance(src, Path):
        yield from _dataset_rows(src, _hub_dataset(src, split))
        return
    if not src.exists():
        raise DataError(src, None, None, "file not found")
    if src.suffix in {".jsonl", ".gz"} or src.name.endswith(".jsonl.gz"):
        # read_jsonl names the line of bad JSON or non-UTF-8 bytes, and a truncated or non-gzip .gz
        for lineno, rec in read_jsonl(src):
            yield str(src), lineno, rec
        return
    if src.suffix == ".json":
        for i, rec in _json_records(src):
            yield str(src), i, rec
        return
    yield from _dataset_rows(src, _local_dataset(src, split))


def _hub_dataset(name: str, split: str):
    import datasets  # slow to import (seconds): only for .parquet, dataset folders and hub names

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # hub errors come in many types; the message is what the user needs
        raise SpaError(f"cannot load dataset '{name}' (split {split}): {e}") from None


def _local_dataset(src: Path, split: str):
    """A saved dataset folder (its ``split``, else its first split) or a .parquet file."""
    import datasets

    if src.is_dir():
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split] if split in ds else ds[next(iter(ds))]
        return ds
    if src.suffix == ".parquet":
        try:
            return datasets.load_dataset("parquet", data_files=str(src), split="train")
        except Exception as e:  # noqa: BLE001 - datasets wraps the reader's error; its first line names it
            cause = e.__cause__ or e
            detail = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            raise DataError(src, None, None, f"cannot read it as parquet: {detail}") from None
    raise DataError(src, None, None, "unknown file type (use .jsonl, .jsonl.gz, .json, .parquet or a dataset folder)")


def _dataset_rows(src, ds) -> Iterator[tuple[str, int, dict]]:
    """(source, 1-based row, record) of a datasets table; a row arrow cannot decode is named by its number."""
    rows = iter(ds)
    for i in itertools.count(1):
        try:
            rec = next(rows)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - a damaged Parquet page surfaces as any of arrow's errors, or bad UTF-8
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(src, i, None, f"cannot read this record ({type(e).__name__}: {detail})") from None
        yield str(src), i, dict(rec)


def _json_records(src: Path) -> Iterator[tuple[int, dict]]:
    """(index, record) of a .json file: a list of objects or one object, or JSON Lines under a .json name.

    Raises:
        DataError: naming the line of the first syntax error (or of bytes that are not UTF-8), or the record
            that is not an object.
    """
    text = "".join(line for _, line in read_lines(src))  # a byte-order mark dropped, bad bytes named by line
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):  # maybe JSON Lines under a .json name: read_jsonl names the bad line
            yield from read_jsonl(src)
            return
        raise DataError(src, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except (RecursionError, ValueError):
        parse_json(text, src)  # raises the DataError that says why
        raise
    records = data if isinstance(data, list) else [data]
    for i, rec in enumerate(records, start=1):
        if not isinstance(rec, dict):
            raise DataError(src, None, f"record {i}", f"expected a JSON object, got {type(rec).__name__}")
        yield i, rec


def detect_format(rec: dict) -> str:
    if "chosen" not in rec and "prompt" in rec:
        return "prompts"
    chosen = rec.get("chosen")
    if isinstance(chosen, str) and "prompt" not in rec and "\n\nAssistant:" in chosen:
        return "hh"
    if isinstance(chosen, list):
        return "ultrafeedback" if isinstance(rec.get("prompt"), str) else "conversational"
    return "standard"


def _msgs(value: Any, src: str, line: int, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(src, line, field, "expected a string or a list of {role, content} messages")
    for k, m in enumerate(value):
        if not isinstance(m["content"], str) or not isinstance(m["role"], str):
            bad = "content" if not isinstance(m["content"], str) else "role"
            raise DataError(src, line, field, f"message {k + 1}: '{bad}' must be a string, got {type(m[bad]).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(value: Any, src: str, line: int, field: str) -> tuple[list[dict], str]:
    """A response given as text or as messages; returns (messages before the reply, reply text)."""
    if isinstance(value, str):
        return [], value
    msgs = _msgs(value, src, line, field)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(src, line, field, "the last message must be the assistant's response")
    return msgs[:-1], msgs[-1]["content"]


def parse_hh(text: str, src: str, line: int, field: str) -> tuple[list[dict], str]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if not turns or turns[-1][0] != "Assistant":
        raise DataError(src, line, field, "HH-RLHF dialogue must end with an '\\n\\nAssistant: ' turn")
    msgs = [{"role": "user" if r == "Human" else "assistant", "content": c} for r, c in turns]
    return msgs[:-1], msgs[-1]["content"]


def to_trl_conversational(row: dict) -> dict:
    """A normalised pair as TRL's conversational preference record: prompt messages, chosen/rejected as lists of
    one assistant message; other fields kept."""
    out = dict(row)
    for key in ("chosen", "rejected"):
        if isinstance(out.get(key), str):
            out[key] = [{"role": "assistant", "content": out[key]}]
    return out


def pair_texts(row: dict, src: str | Path = "?", line: int | None = None) -> dict:
    """A pair record whose chosen/rejected are text or assistant message lists (TRL conversational), with
    them as text; other fields kept.

    Raises:
        DataError: naming file, line and field for a response that is neither.
    """
    out = dict(row)
    for key in ("chosen", "rejected"):
        if key not in out or out[key] is None:
            raise DataError(src, line, key, "missing")
        pre, out[key] = _reply(out[key], str(src), line, key)
        if pre:
            raise DataError(src, line, key, "expected the assistant's response only (the prompt is its own field)")
    return out


class DegeneratePair(DataError):
    """A well-formed record that makes no usable pair (an empty response, identical responses, dialogues that
    diverge before the last reply). Real data sets have a few (HH-RLHF harmless-base test: 9 of 2,312): loaders
    skip and count them by ``reason``."""

    reason = "unusable"


def _degenerate(src, line, field, message: str, reason: str) -> DegeneratePair:
    e = DegeneratePair(src, line, field, message)
    e.reason = reason
    return e


def _skip(skipped: list[DegeneratePair], err: DegeneratePair, counts: dict | None = None) -> None:
    if counts is not None:
        counts[err.reason] = counts.get(err.reason, 0) + 1
    skipped.append(err)
    if len(skipped) == 1:
        log.warning("skipping unusable pairs; first: %s", err)


def _check_prompt_text(prompt: list[dict], src, line) -> None:
    """A prompt whose last user message is empty or whitespace asks nothing: sampling and judging it would
    train on noise, so loaders skip and count it (reason ``empty_prompt``)."""
    if not prompt[-1]["content"].strip():
        raise _degenerate(src, line, "prompt", "empty prompt (the user message is blank)", "empty_prompt")


def normalize_pair(rec: dict, fmt: str, src: str, line: int, distinct: bool = True) -> dict:
    """One record as a normalised pair. ``distinct``: refuse identical responses (a prompt pool does not care)."""
    for key in ("chosen", "rejected"):
        if key not in rec or rec[key] is None:
            raise DataError(src, line, key, "missing")
    if fmt == "hh":
        if not isinstance(rec["chosen"], str) or not isinstance(rec["rejected"], str):
            raise DataError(src, line, "chosen", "HH-RLHF format needs dialogue strings")
        prompt, chosen = parse_hh(rec["chosen"], src, line, "chosen")
        prompt_r, rejected = parse_hh(rec["rejected"], src, line, "rejected")
        if prompt != prompt_r:
            raise _degenerate(src, line, "rejected", "chosen and rejected dialogues do not share their turns", "diverging")
    else:
        pre_c, chosen = _reply(rec["chosen"], src, line, "chosen")
        pre_r, rejected = _reply(rec["rejected"], src, line, "rejected")
        if "prompt" in rec and rec["prompt"] is not None:
            prompt = _msgs(rec["prompt"], src, line, "prompt")
            if len(pre_c) > len(prompt) and (fmt != "conversational" or pre_c[: len(prompt)] == prompt):
                # chosen is the whole conversation (multi-turn ultrafeedback-style data, a system message):
                # every turn before the reply is context, not just the prompt field's first user message
                prompt = pre_c
        elif pre_c:
            prompt = pre_c
        else:
            raise DataError(src, line, "prompt", "missing (and chosen carries no conversation to take it from)")
        if fmt == "conversational" and pre_c and pre_c != prompt and pre_c[: len(prompt)] != prompt:
            raise DataError(src, line, "chosen", "conversation does not start with the prompt")
    if not prompt or prompt[-1]["role"] != "user":
        raise DataError(src, line, "prompt", "must end with a user message")
    _check_prompt_text(prompt, src, line)
    if not chosen.strip() or not rejected.strip():
        raise _degenerate(src, line, "chosen" if not chosen.strip() else "rejected", "empty response", "empty")
    if distinct and chosen == rejected:  # no preference to learn: DPO's loss is log 2 whatever the policy
        raise _degenerate(src, line, "rejected", "identical to chosen", "identical")
    out = {k: v for k, v in rec.items() if k not in {"prompt", "chosen", "rejected", "messages"}}
    out.update(prompt=prompt, chosen=chosen, rejected=rejected, source=f"{src}:{line}")
    return out


def load_pairs(spec: str, fmt: str = "auto", limit: int | None = None, dropped: dict | None = None) -> list[dict]:
    """Load preference pairs, normalised.

    Args:
        dropped: filled with the count of skipped records per reason (identical, empty, diverging).

    Raises:
        DataError: naming file, line and field for the first bad record, or when there are none. Records that
            parse but make no usable pair (``DegeneratePair``) are skipped with a logged count.
    """
    pairs: list[dict] = []
    skipped: list[DegeneratePair] = []
    src_name = spec
    for src, line, rec in iter_records(spec):
        src_name = src
        f = detect_format(rec) if fmt == "auto" else fmt
        if f == "prompts":
            raise DataError(src, line, "chosen", "missing: this looks like a prompt file, not preference pairs")
        try:
            pairs.append(normalize_pair(rec, f, src, line))
        except DegeneratePair as e:
            _skip(skipped, e, dropped)
            continue
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        if skipped:
            raise skipped[0]
        raise DataError(src_name, None, None, "no preference pairs found (empty data set)")
    if skipped:
        by = {}
        for e in skipped:
            by[e.reason] = by.get(e.reason, 0) + 1
        log.warning("%s: skipped %d unusable pairs (%s)", src_name, len(skipped),
                    ", ".join(f"{k}: {v}" for k, v in sorted(by.items())))
    return pairs


def load_prompts(spec: str, fmt: str = "auto", dropped: dict | None = None) -> list[dict]:
    """Prompts from a prompt file (``prompt`` per record) or from the prompts of preference data.

    Args:
        dropped: filled with the count of skipped records per reason (``empty_prompt`` for a blank prompt; for
            preference data also ``empty``, ``diverging``).
    """
    out: list[dict] = []
    skipped: list[DegeneratePair] = []
    src_name = spec
    for src, line, rec in iter_records(spec):
        src_name = src
        f = detect_format(rec) if fmt == "auto" else fmt
        if f == "prompts":
            if "prompt" not in rec:
                raise DataError(src, line, "prompt", "missing")
            item = {k: v for k, v in rec.items() if k != "prompt"}
            item["prompt"] = _msgs(rec["prompt"], src, line, "prompt")
            if not item["prompt"]:
                raise DataError(src, line, "prompt", "no messages")
            try:
                _check_prompt_text(item["prompt"], src, line)
            except DegeneratePair as e:
                _skip(skipped, e, dropped)
                continue
        else:
            try:
                pair = normalize_pair(rec, f, src, line, distinct=False)
            except DegeneratePair as e:
                _skip(skipped, e, dropped)
                continue
            item = {k: v for k, v in pair.items() if k not in {"chosen", "rejected"}}
        item.setdefault("source", f"{src}:{line}")
        out.append(item)
    if not out:
        if skipped:
            raise skipped[0]
        raise DataError(src_name, None, None, "no prompts found (empty data set)")
    return out


def shuffled(items: list, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def iteration_prompts(pool: list[dict], sizes: list[int], iteration: int, seed: int) -> list[dict]:
    """X_i: the i-th of consecutive disjoint slices of the shuffled pool (the paper's protocol).

    Raises:
        SpaError: when the pool is too small for the slice.
    """
    order = shuffled(pool, seed)
    start = sum(sizes[: iteration - 1])
    end = start + sizes[iteration - 1]
    if start >= len(order):
        raise SpaError(f"the prompt pool has {len(order)} prompts; iteration {iteration} needs prompts {start}..{end}")
    return order[start:end]


def split_protocol(spec: str, seed: int, seed_size: int, iter_sizes: list[int], test_size: int,
                   fmt: str = "auto") -> dict[str, list[dict]]:
    """The paper's data protocol: shuffle preference data with ``seed``; take ``seed_size`` gold pairs,
    then disjoint prompt sets for iterations 1..T, then a held-out test split of pairs."""
    pairs = shuffled(load_pairs(spec, fmt), seed)
    need = seed_size + sum(iter_sizes) + test_size
    if need > len(pairs):
        raise SpaError(f"{spec} has {len(pairs)} pairs; the split needs {need}")
    out = {"seed_pairs": pairs[:seed_size]}
    start = seed_size
    for i, n in enumerate(iter_sizes, start=1):
        out[f"iter{i}_prompts"] = [{k: v for k, v in p.items() if k not in {"chosen", "rejected"}}
                                   for p in pairs[start : start + n]]
        start += n
    out["test_pairs"] = pairs[start : start + test_size]
    return out
