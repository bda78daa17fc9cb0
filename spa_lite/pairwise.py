"""The pairwise-judge interface: one comparison, the protocol every judge follows, and the text helpers
that judges asking a language model share (the question shown, the verdict parsed from the answer).

A judge is anything with ``judge(items) -> list[float]``: for each :class:`JudgeItem` the probability that the
candidate (``response_a``) is better than the reference (``response_b``); 1 a win, 0 a loss, 0.5 a tie.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spa_lite.errors import SpaError

__all__ = ["JudgeItem", "PairwiseJudge", "JudgeError", "format_question", "parse_verdict"]


class JudgeError(SpaError):
    """A judge could not produce a verdict (endpoint unreachable, refused, out of retries, no API key)."""


@dataclass
class JudgeItem:
    """One comparison: ``response_a`` is the candidate, ``response_b`` the reference."""

    prompt: list[dict]  # chat messages, e.g. [{"role": "user", "content": "..."}]
    response_a: str
    response_b: str
    metadata: dict | None = None  # e.g. {"constraint": {...}} for the demo task


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, items: list[JudgeItem]) -> list[float]:
        """P(candidate better than reference) in [0, 1] per item (1 win, 0 loss, 0.5 tie)."""
        ...


# --------------------------------------------------------------------------------------------------
# Prompt and answer parsing
# --------------------------------------------------------------------------------------------------


def format_question(messages: Sequence[Mapping]) -> str:
    """The text shown to the judge as the user's question.

    A single user turn is shown as its content; a longer conversation as ``Role: content`` blocks, so the
    judge sees the context the final user turn depends on.
    """
    msgs = [m for m in messages if m.get("role") != "system"] or list(messages)
    if len(msgs) == 1:
        return str(msgs[0].get("content", ""))
    return "\n\n".join(f"{str(m.get('role', 'user')).capitalize()}: {m.get('content', '')}" for m in msgs)


_BRACKETED = re.compile(r"\[\[\s*([AB])\s*\]\]")
_PAREN = re.compile(r"\(\s*([AB])\s*\)")
_RESPONSE = re.compile(r"\b(?i:response)(?:\s+(?i:is))?\s*\(?\s*([AB])\b")
_VERDICT = re.compile(r"\b(?i:answer|verdict|better|winner|choice)(?:\s+(?i:is))?\s*[:=]?\s*[*_`'\"]*\s*([AB])\b(?!\s+[a-z])")
_MARKUP = " \t\r\n*_`'\".,:;!()[]{}"


def parse_verdict(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or None (no clear verdict) from a judge's answer.

    Accepts ``[[A]]`` (the verdict is the last one), ``(A)``, ``Response A`` / ``Response (A)``,
    ``Answer: A``, a bare ``A`` with markup (``**A**``, ``A.``) or an answer that starts with ``A`` followed by
    punctuation or a line break. Answers naming both letters in the same form are ambiguous (None), and so is
    a leading article ("A good answer is ...").
    """
    if not text:
        return None
    s = text.strip()
    found = _BRACKETED.findall(s)
    if found:
        return found[-1]
    bare = s.strip(_MARKUP)
    if bare in ("A", "B"):
        return bare
    for pat in (_PAREN, _RESPONSE, _VERDICT):
        letters = {m.upper() for m in pat.findall(s)}
        if len(letters) == 1:
            return letters.pop()
        if len(letters) > 1:
            return None
    m = re.match(r"^[*_`'\"\s]*([AB])(?:[*_`'\"]*)(?:[.:,;!)\]]|\s*\n|$)", s)
    if m:
        return m.group(1)
    return None


# The LLM-as-judge prompt: the local judge (spa_lite.judge) and the HTTP judge ask the same question.
LLM_JUDGE_PROMPT = (
    "Review the user's question and the two responses below, then decide which response is more helpful, "
    "accurate, relevant and follows the user's instructions better. Do not let the order or the length of "
    "the responses influence you.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Response (A)]\n{a}\n[The End of Response (A)]\n\n"
    "[The Start of Response (B)]\n{b}\n[The End of Response (B)]\n\n"
    "Which response is better? Answer with \"(A)\" or \"(B)\" only."
)
