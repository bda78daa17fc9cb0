"""Verifiable instruction-following demo task (pure Python, no torch).

Everyday questions (``data/questions.txt``, one per line) are combined with one
checkable constraint each ("Answer in at most 40 words.", "Do not use any
commas.", ...).  Every constraint kind is one :class:`ConstraintKind` record
in :data:`KINDS` (instruction template, parameter choices, sampling weight,
verifier), so preference pairs can be labelled by a program rather than by a
judge model.

The verifier is only used to build the *seed* pairs and the held-out *eval*
pairs; SPA iterations label their own responses with the model itself.

Record format (JSON-serialisable)::

    {"id": "q0123-c05",
     "prompt": [{"role": "user", "content": "<question> <instruction>"}],
     "constraint": {"kind": "max_words", "params": {"n": 40}}}

The ``q`` part is the index of the question in :data:`QUESTIONS`, the ``c``
part the index of the kind in :data:`CONSTRAINT_KINDS`.
"""

from __future__ import annotations

import importlib.resources
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "QUESTIONS",
    "QUESTIONS_FILE",
    "ConstraintKind",
    "KINDS",
    "QUESTION_WORD",
    "CONSTRAINT_KINDS",
    "KIND_WEIGHTS",
    "LOW_SEPARATION_KINDS",
    "instruction",
    "describe",
    "verify",
    "sample_constraint",
    "make_record",
    "make_prompt_records",
    "question_index",
    "count_words",
    "count_sentences",
    "count_paragraphs",
    "count_bullets",
]

# --------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------

#: The question file, one question per line; the line order is the ``q`` part of record ids, so append, never
#: reorder (blank lines are skipped).
QUESTIONS_FILE = Path(str(importlib.resources.files("spa_lite.demo").joinpath("data", "questions.txt")))


def _load_questions(path: Path) -> List[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"demo question file {path} is missing; the installed package lacks its demo data") from None
    return [q.strip() for q in text.splitlines() if q.strip()]


QUESTIONS: List[str] = _load_questions(QUESTIONS_FILE)

# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------

_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:['\u2019\-][A-Za-z0-9]+)*")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])[\"')\]\u201d]*\s+|\n+")
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*\n")
_BULLET_RE = re.compile(r"^[ \t]*[-*\u2022][ \t]+\S")
_FENCE_RE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL)
_LEADING_JUNK_RE = re.compile(r"^[^A-Za-z0-9]+")


def _clean(response: Optional[str]) -> str:
    if response is None:
        return ""
    return str(response).strip()


def count_words(text: str) -> int:
    """Number of words (runs of letters/digits, with inner ' or -)."""
    return len(_WORD_RE.findall(text or ""))


def count_sentences(text: str) -> int:
    """Sentences: split after . ! ? followed by whitespace, and at newlines."""
    parts = _SENTENCE_SPLIT_RE.split(_clean(text))
    return sum(1 for p in parts if _WORD_RE.search(p))


def count_paragraphs(text: str) -> int:
    """Blocks of text separated by at least one blank line."""
    parts = _PARAGRAPH_SPLIT_RE.split(_clean(text))
    return sum(1 for p in parts if _WORD_RE.search(p))


def count_bullets(text: str) -> int:
    """Lines starting with "- " or "* " (or a bullet character)."""
    return sum(1 for line in _clean(text).splitlines() if _BULLET_RE.match(line))


def _word_pattern(word: str) -> re.Pattern:
    # whole word, case-insensitive, a plain plural (s / es) counts as the word
    return re.compile(
        r"(?<![A-Za-z0-9])" + re.escape(word) + r"(?:s|es)?(?![A-Za-z0-9])", re.IGNORECASE
    )


def _count_word(text: str, word: str) -> int:
    return len(_word_pattern(word).findall(text))


def _strip_code_fence(text: str) -> str:
    m = _FENCE_RE.match(text)
    return m.group(1).strip() if m else text


# --------------------------------------------------------------------------
# Verifiers: verify_X(response, params) -> bool.  An empty response never passes.
# --------------------------------------------------------------------------


def _v_max_words(text: str, p: Mapping) -> bool:
    return count_words(text) <= int(p["n"])


def _v_min_words(text: str, p: Mapping) -> bool:
    return count_words(text) >= int(p["n"])


def _v_include_word(text: str, p: Mapping) -> bool:
    return _count_word(text, p["word"]) >= 1


def _v_exclude_word(text: str, p: Mapping) -> bool:
    return _count_word(text, p["word"]) == 0


def _v_no_commas(text: str, p: Mapping) -> bool:
    return "," not in text and "\uff0c" not in text


def _v_lowercase(text: str, p: Mapping) -> bool:
    return any(c.isalpha() for c in text) and text == text.lower()


def _v_uppercase(text: str, p: Mapping) -> bool:
    return any(c.isalpha() for c in text) and text == text.upper()


def _v_bullets(text: str, p: Mapping) -> bool:
    return count_bullets(text) == int(p["n"])


def _v_json_object(text: str, p: Mapping) -> bool:
    body = _strip_code_fence(text)
    try:
        obj = json.loads(body)
    except (ValueError, TypeError):
        return False
    return isinstance(obj, dict) and p["key"] in obj


def _v_end_with(text: str, p: Mapping) -> bool:
    target = str(p["sentence"]).strip().lower()
    # tolerate closing quotes / markdown emphasis wrapped around the sentence
    tail = text.rstrip().rstrip("\"'*_\u201d` ").rstrip().lower()
    return tail.endswith(target) or text.rstrip().lower().endswith(target)


def _v_start_with(text: str, p: Mapping) -> bool:
    words = _WORD_RE.findall(_LEADING_JUNK_RE.sub("", text))
    return bool(words) and words[0].lower() == str(p["word"]).lower()


def _v_max_sentences(text: str, p: Mapping) -> bool:
    return count_sentences(text) <= int(p["n"])


def _v_paragraphs(text: str, p: Mapping) -> bool:
    return count_paragraphs(text) == int(p["n"])


def _v_word_frequency(text: str, p: Mapping) -> bool:
    return _count_word(text, p["word"]) >= int(p["n"])


# --------------------------------------------------------------------------
# Constraint kinds: one record each
# --------------------------------------------------------------------------

#: Parameter choices meaning "a topical word of the question" (see :func:`_content_words`).
QUESTION_WORD = "<word of the question>"


@dataclass(frozen=True)
class ConstraintKind:
    """One checkable constraint: its instruction, how its parameters are drawn, how often, how it is verified.

    Attributes:
        name: the ``kind`` of a constraint record.
        template: instruction text, ``str.format``-ed with the parameters.
        verify: ``verify(response, params) -> bool`` on the stripped, non-empty response.
        weight: sampling weight in :func:`make_prompt_records` (see :data:`KIND_WEIGHTS`).
        params: parameter name -> choices, drawn in this order with ``rng.choice`` (the order fixes the demo
            data for a seed); the choices :data:`QUESTION_WORD` draw a topical word of the question.
        low_separation: the tiny bundled model (almost) never satisfies it, so seed-pair construction spends
            few samples on it.
    """

    name: str
    template: str
    verify: Callable[[str, Mapping], bool]
    weight: float
    params: Mapping[str, Union[Tuple, str]] = field(default_factory=dict)
    low_separation: bool = False


_END_SENTENCES = (
    "I hope this helps.",
    "Is there anything else I can help with?",
    "Thanks for asking.",
    "Good luck!",
    "That is all.",
)

# The order is the ``cNN`` part of record ids: append, never reorder.  Weights were measured on the bundled
# SmolLM2-135M-Instruct: word limits, "no commas", "include word" and bullet counts separate samples (some
# pass, some fail); "lowercase" and "end with a sentence" never passed, so they are kept rare.
_START_WORDS = ("Sure", "Yes", "Well", "First", "Honestly", "Great", "Okay", "Absolutely")
_JSON_KEYS = ("answer", "tips", "summary", "steps", "explanation")

KINDS: Dict[str, ConstraintKind] = {
    k.name: k
    for k in (
        ConstraintKind("max_words", "Answer in at most {n} words.", _v_max_words, 3.0,
                       params={"n": (25, 30, 35, 40, 45, 50)}),
        ConstraintKind("min_words", "Answer in at least {n} words.", _v_min_words, 1.0,
                       params={"n": (25, 30, 35, 40)}),
        ConstraintKind("include_word", 'Include the word "{word}" in your answer.', _v_include_word, 2.0,
                       params={"word": QUESTION_WORD}),
        ConstraintKind("exclude_word", 'Do not use the word "{word}" anywhere in your answer.', _v_exclude_word, 1.5,
                       params={"word": QUESTION_WORD}),
        ConstraintKind("no_commas", "Do not use any commas in your answer.", _v_no_commas, 2.5),
        ConstraintKind("lowercase", "Write your whole answer in lowercase letters, with no capital letters at all.",
                       _v_lowercase, 0.5, low_separation=True),
        ConstraintKind("uppercase", "Write your whole answer in capital letters only.", _v_uppercase, 0.5,
                       low_separation=True),
        ConstraintKind("bullets", 'Answer with exactly {n} bullet points, each on its own line starting with "- ".',
                       _v_bullets, 2.0, params={"n": (2, 3, 4, 5)}),
        ConstraintKind("json_object", 'Reply only with a JSON object that has the key "{key}".', _v_json_object, 0.75,
                       params={"key": _JSON_KEYS}, low_separation=True),
        ConstraintKind("end_with", 'End your answer with the exact sentence "{sentence}"', _v_end_with, 0.5,
                       params={"sentence": _END_SENTENCES}, low_separation=True),
        ConstraintKind("start_with", 'Start your answer with the word "{word}".', _v_start_with, 1.0,
                       params={"word": _START_WORDS}),
        ConstraintKind("max_sentences", "Answer in at most {n} sentences.", _v_max_sentences, 2.0,
                       params={"n": (2, 3, 4)}),
        ConstraintKind("paragraphs", "Write exactly {n} paragraphs, separated by a blank line.", _v_paragraphs, 1.0,
                       params={"n": (2, 3)}),
        # the word is drawn before the count
        ConstraintKind("word_frequency", 'Use the word "{word}" at least {n} times.', _v_word_frequency, 1.5,
                       params={"word": QUESTION_WORD, "n": (2, 3)}),
    )
}

#: Constraint kind names; the position is the ``cNN`` part of record ids.
CONSTRAINT_KINDS: List[str] = list(KINDS)

#: Sampling weights for :func:`make_prompt_records`, by kind.
KIND_WEIGHTS: Dict[str, float] = {k.name: k.weight for k in KINDS.values()}

#: Kinds the tiny bundled model (almost) never satisfies: seed-pair construction spends few samples on them.
LOW_SEPARATION_KINDS = frozenset(k.name for k in KINDS.values() if k.low_separation)

#: Words to draw when a question has no topical word.
_FALLBACK_WORDS = ["important", "simple", "example", "easy", "time"]

_STOPWORDS = frozenset(
    """
    a about above after again against all also am an and any are as at be because been before
    being below best better between both but by can could did do does doing down during each
    few for from further get gets getting good had has have having he her here hers him his
    how i if in into is it its it's itself just keep know let like make makes making me more
    most my myself new no nor not now of off often on once only or other our ours out over own
    same she should so some such than that the their theirs them then there these they this
    those through to too under until up very want was way ways we were what when where which
    while who whom why will with without would you your yours yourself okay much many help
    tell use used using start first well there's i'm don't without things thing really need
    """.split()
)


def _content_words(question: str, min_len: int = 4) -> List[str]:
    """Topical words of a question, in order, deduplicated (surface form kept)."""
    out: List[str] = []
    seen = set()
    tokens = re.findall(r"[A-Za-z][A-Za-z'\-]*", question)
    for i, tok in enumerate(tokens):
        low = tok.lower()
        if "'" in tok or "-" in tok or len(tok) < min_len or low in _STOPWORDS or low in seen:
            continue
        seen.add(low)
        # keep capitalisation of proper nouns / acronyms, lowercase the first word
        out.append(tok if (i > 0 and tok[0].isupper()) else low)
    if not out and min_len > 3:
        return _content_words(question, min_len=3)
    return out


def instruction(constraint: Mapping) -> str:
    """The instruction text appended to the question for ``constraint``."""
    kind = constraint.get("kind") if isinstance(constraint, Mapping) else None
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind: {kind!r} (known: {', '.join(CONSTRAINT_KINDS)})")
    return KINDS[kind].template.format(**(constraint.get("params") or {}))


def describe(constraint: Mapping) -> str:
    """Human-readable description, e.g. ``max_words(n=40): Answer in at most 40 words.``"""
    params = constraint.get("params") or {}
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(params.items()))
    return f"{constraint['kind']}({args}): {instruction(constraint)}"


def verify(response: str, constraint: Mapping) -> bool:
    """True when ``response`` satisfies ``constraint`` ({"kind", "params"}).

    Whitespace around the response is ignored; an empty response never passes.
    Raises ValueError for an unknown kind.
    """
    if not isinstance(constraint, Mapping):
        raise ValueError(f"constraint must be a mapping, got {type(constraint).__name__}")
    kind = constraint.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind: {kind!r} (known: {', '.join(CONSTRAINT_KINDS)})")
    text = _clean(response)
    if not text:
        return False
    return bool(KINDS[kind].verify(text, constraint.get("params") or {}))


def sample_constraint(kind: str, question: str, rng: random.Random) -> Dict:
    """Draw parameters for ``kind`` (natural for ``question``) from ``rng``."""
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind: {kind!r}")
    words = _content_words(question) or list(_FALLBACK_WORDS)
    # drawn in the kind's declared order: the order of rng calls fixes the demo data for a seed
    params = {name: rng.choice(words if choices == QUESTION_WORD else choices) for name, choices in KINDS[kind].params.items()}
    return {"kind": kind, "params": params}


def make_record(question_idx: int, constraint: Mapping) -> Dict:
    """A prompt record for ``QUESTIONS[question_idx]`` with ``constraint``."""
    kind = constraint["kind"]
    content = f"{QUESTIONS[question_idx]} {instruction(constraint)}"
    return {
        "id": f"q{question_idx:04d}-c{CONSTRAINT_KINDS.index(kind):02d}",
        "prompt": [{"role": "user", "content": content}],
        "constraint": {"kind": kind, "params": dict(constraint.get("params") or {})},
    }


def question_index(record_or_id) -> int:
    """Question index from a record or a record id (``"q0123-c05"`` -> 123)."""
    rid = record_or_id["id"] if isinstance(record_or_id, Mapping) else str(record_or_id)
    m = re.match(r"^q(\d+)-c\d+$", rid)
    if not m:
        raise ValueError(f"not a demo record id: {rid!r}")
    return int(m.group(1))


def _question_rng(seed: int, question_idx: int, salt: str = "") -> random.Random:
    return random.Random(f"spa-demo:{seed}:{question_idx}:{salt}")


def _weighted_kinds(rng: random.Random, k: int, weights: Mapping[str, float]) -> List[str]:
    """``k`` distinct kinds drawn without replacement, proportionally to weight."""
    pool = [kd for kd in CONSTRAINT_KINDS if weights.get(kd, 0) > 0]
    chosen: List[str] = []
    for _ in range(min(k, len(pool))):
        w = [weights[kd] for kd in pool]
        kd = rng.choices(pool, weights=w, k=1)[0]
        chosen.append(kd)
        pool.remove(kd)
    return chosen


def records_for_question(
    question_idx: int,
    kinds: Sequence[str],
    *,
    seed: int = 0,
    salt: str = "",
) -> List[Dict]:
    """Records for one question with the given constraint kinds (params seeded)."""
    rng = _question_rng(seed, question_idx, "params:" + salt)
    q = QUESTIONS[question_idx]
    return [make_record(question_idx, sample_constraint(kd, q, rng)) for kd in kinds]


def make_prompt_records(seed: int = 0) -> List[Dict]:
    """All question x sampled-constraint records; each question gets 1-2 kinds.

    Deterministic in ``seed``; kinds are drawn with :data:`KIND_WEIGHTS`.
    """
    records: List[Dict] = []
    for qi in range(len(QUESTIONS)):
        rng = _question_rng(seed, qi, "kinds")
        k = 2 if rng.random() < 0.5 else 1
        kinds = _weighted_kinds(rng, k, KIND_WEIGHTS)
        records.extend(records_for_question(qi, kinds, seed=seed))
    return records
