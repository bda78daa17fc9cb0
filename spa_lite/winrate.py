"""Win rate of a policy's responses against a reference model's responses, under a pluggable pairwise judge.

A judge is anything with ``judge(items) -> list[float]``: for each :class:`JudgeItem` the probability that the
candidate (``response_a``) is better than the reference (``response_b``); 1 a win, 0 a loss, 0.5 a tie.

Judges here:

* :class:`HTTPJudge` -- an OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp,
  ...), asked for "A" or "B" in both presentation orders, with retries and a resumable on-disk cache.
* :class:`LocalLLMJudge` -- a local policy of a :class:`~spa_lite.stack.PolicyStack` as LLM-as-judge
  (:func:`spa_lite.judge.judge_llm`).
* :class:`VerifierJudge` -- the demo task's program verifier (:func:`spa_lite.demo.tasks.verify`).

:func:`win_rate_eval` turns the probabilities into win/tie/loss outcomes and the win rate with its CI
(:func:`spa_lite.metrics.win_rate`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from spa_lite.errors import SpaError
from spa_lite.metrics import bootstrap_ci, win_rate

__all__ = [
    "JudgeItem",
    "PairwiseJudge",
    "JudgeError",
    "HTTPJudge",
    "LocalLLMJudge",
    "VerifierJudge",
    "parse_verdict",
    "format_question",
    "win_rate_eval",
    "CACHE_FILE",
]

CACHE_FILE = "http_judge_cache.jsonl"


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


# --------------------------------------------------------------------------------------------------
# HTTP judge
# --------------------------------------------------------------------------------------------------


def _chat_url(base_url: str) -> str:
    u = base_url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class HTTPJudge:
    """Pairwise judge on an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Each item is asked twice, once as (A=candidate, B=reference) and once swapped; each answer scores the
    candidate 1 (it was named), 0 (the reference was named) or 0.5 (no clear verdict), and the item's
    probability is the mean of the two, so a judge that always names the first response scores 0.5.

    Args:
        base_url: the server, e.g. ``https://api.openai.com/v1`` or ``http://localhost:8000``;
            ``/v1/chat/completions`` is appended as needed (a full ``.../chat/completions`` URL is used as is).
        model: the ``model`` field of the request.
        api_key_env: the environment variable holding the key, sent as ``Authorization: Bearer <key>``. It is
            read only when a request is sent (never kept on the object, written to the cache or put in an
            error message); None sends no Authorization header (local servers). Fully cached runs need no key.
        batch_size: requests in flight at once (a ThreadPoolExecutor of this many threads).
        max_retries: retries after the first attempt on 429, 5xx, timeouts and connection errors, waiting
            ``backoff * 2**attempt`` seconds (plus jitter, or the server's Retry-After, at most ``max_backoff``).
            Other 4xx answers (bad key, unknown model) fail at once.
        timeout: seconds per request.
        cache_dir: folder of the answer cache ``http_judge_cache.jsonl``: one JSON line per answer, keyed by
            the sha256 of the request payload, appended and flushed as each answer arrives, so an interrupted
            evaluation resumes without re-asking. A torn last line (a crash mid-write) is skipped. None keeps
            answers in memory only.
        template: the judge prompt, with ``{question}``, ``{a}`` and ``{b}`` (default: the one the local
            LLM-as-judge uses, asking for "(A)" or "(B)").
        max_tokens, temperature: sampling settings sent with every request (None leaves one out).
        system: an optional system message.
        extra_body: more request fields (e.g. ``{"max_completion_tokens": 16}``), part of the cache key.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        batch_size: int = 8,
        max_retries: int = 4,
        timeout: float = 60,
        cache_dir: str | os.PathLike | None = None,
        *,
        template: str | None = None,
        max_tokens: int | None = 16,
        temperature: float | None = 0.0,
        system: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = _chat_url(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.timeout = timeout
        self.cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        if template is None:
            from spa_lite.judge import LLM_JUDGE_PROMPT as template
        self.template = template
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.system = system
        self.extra_body = dict(extra_body or {})
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._cache: dict[str, str] | None = None
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "cache_hits": 0, "cache_skipped_lines": 0}

    def __repr__(self) -> str:
        return f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    # ---- requests -------------------------------------------------------------------------------

    def payload(self, question: str, first: str, second: str) -> dict:
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": self.template.format(question=question, a=first, b=second)})
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        body.update(self.extra_body)
        return body

    @staticmethod
    def cache_key(payload: Mapping) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"HTTP judge: environment variable {self.api_key_env} is not set; export the API key there "
                "(or use api_key_env=None for a server without authentication)"
            )
        return key

    def _redact(self, text: str, key: str | None) -> str:
        return text.replace(key, "***") if key else text

    def _post_once(self, payload: dict, key: str | None) -> str:
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                body = e.read(500).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001 - the body is only for the message
                body = ""
            msg = f"HTTP {e.code} {e.reason}: {body.strip()[:300]}"
            if e.code == 429 or e.code >= 500:
                ra = e.headers.get("Retry-After") if e.headers else None
                try:
                    retry_after = float(ra) if ra is not None else None
                except ValueError:
                    retry_after = None
                raise _RetryableError(msg, retry_after) from None
            raise JudgeError(f"HTTP judge: {self.url} refused the request ({self._redact(msg, key)})") from None
        except (TimeoutError, OSError, http.client.HTTPException) as e:  # timeouts, refused/reset/cut connections
            reason = getattr(e, "reason", e)
            raise _RetryableError(f"{type(reason).__name__}: {reason}") from None
        try:
            obj = json.loads(raw)
            content = obj["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"HTTP judge: {self.url} answered without choices[0].message.content: "
                f"{self._redact(raw[:300].decode('utf-8', 'replace'), key)}"
            ) from None
        return "" if content is None else str(content)

    def _post(self, payload: dict, key: str | None) -> str:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
            with self._lock:
                self.stats["requests"] += 1
            try:
                return self._post_once(payload, key)
            except _RetryableError as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                wait = self.backoff * (2**attempt) + random.uniform(0, self.backoff)
                if e.retry_after is not None:
                    wait = max(wait, e.retry_after)
                time.sleep(min(wait, self.max_backoff))
        raise JudgeError(
            f"HTTP judge: {self.url} failed after {self.max_retries + 1} attempts "
            f"(model {self.model!r}); last error: {self._redact(last, key)}. Answers received so far are cached"
            + (f" in {self.cache_path}" if self.cache_path else "")
            + "; rerun to resume."
        )

    # ---- cache ----------------------------------------------------------------------------------

    def _load_cache(self) -> dict[str, str]:
        if self._cache is not None:
            return self._cache
        cache: dict[str, str] = {}
        if self.cache_path is not None and self.cache_path.exists():
            with open(self.cache_path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        cache[rec["key"]] = rec["content"]
                    except (ValueError, KeyError, TypeError):
                        self.stats["cache_skipped_lines"] += 1  # torn by a crash mid-write
        self._cache = cache
        return cache

    def _store(self, key: str, content: str) -> None:
        with self._lock:
            self._cache[key] = content
            if self.cache_path is None:
                return
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "model": self.model, "content": content}, ensure_ascii=False) + "\n"
            with open(self.cache_path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn last line: start ours on a fresh one
                        line = "\n" + line
                    f.seek(0, os.SEEK_END)
                f.write(line.encode("utf-8"))
                f.flush()

    def _fetch(self, key: str, payload: dict, api_key: str | None) -> None:
        self._store(key, self._post(payload, api_key))

    def answers(self, payloads: Sequence[dict]) -> list[str]:
        """The endpoint's answer text for each payload: from the cache, else asked concurrently."""
        cache = self._load_cache()
        keys = [self.cache_key(p) for p in payloads]
        todo: dict[str, dict] = {}
        for k, p in zip(keys, payloads):
            if k in cache:
                self.stats["cache_hits"] += 1
            else:
                todo.setdefault(k, p)
        if todo:
            api_key = self._api_key()
            pending = list(todo.items())
            with ThreadPoolExecutor(max_workers=self.batch_size) as pool:
                for s in range(0, len(pending), self.batch_size):
                    chunk = pending[s : s + self.batch_size]
                    futures = [pool.submit(self._fetch, k, p, api_key) for k, p in chunk]
                    error = None
                    for fut in futures:  # each answer is cached as it arrives, before any error is raised
                        try:
                            fut.result()
                        except JudgeError as e:
                            error = error or e
                    if error is not None:
                        raise error
        return [cache[k] for k in keys]

    # ---- the judge --------------------------------------------------------------------------------

    def judge_details(self, items: Sequence[JudgeItem]) -> list[dict]:
        """Per item: ``p`` and, per order, the raw answer and the parsed verdict (None = unclear)."""
        payloads = []
        for it in items:
            q = format_question(it.prompt)
            payloads.append(self.payload(q, it.response_a, it.response_b))  # candidate shown as A
            payloads.append(self.payload(q, it.response_b, it.response_a))  # candidate shown as B
        texts = self.answers(payloads)
        rows = []
        for i in range(len(items)):
            t_ab, t_ba = texts[2 * i], texts[2 * i + 1]
            v_ab, v_ba = parse_verdict(t_ab), parse_verdict(t_ba)
            s_ab = 0.5 if v_ab is None else float(v_ab == "A")
            s_ba = 0.5 if v_ba is None else float(v_ba == "B")
            rows.append({"p": 0.5 * (s_ab + s_ba), "verdict_ab": v_ab, "verdict_ba": v_ba,
                         "answer_ab": t_ab, "answer_ba": t_ba})
        return rows

    def judge(self, items: list[JudgeItem]) -> list[float]:
        return [r["p"] for r in self.judge_details(items)]


# --------------------------------------------------------------------------------------------------
# Local and verifier judges
# --------------------------------------------------------------------------------------------------


class LocalLLMJudge:
    """A policy of a PolicyStack as LLM-as-judge (:func:`spa_lite.judge.judge_llm`, both orders averaged).

    ``names`` are the adapters of the judging policy (``spa_lite.evaluation.policy_names(k)``; [] = pi_init).
    """

    def __init__(self, stack, names: Sequence[str], batch_size: int = 4):
        self.stack = stack
        self.names = list(names)
        self.batch_size = batch_size

    def judge_details(self, items: Sequence[JudgeItem]) -> list[dict]:
        from spa_lite.judge import judge_llm

        if not items:
            return []
        return judge_llm(self.stack, self.names, [it.prompt for it in items], [it.response_a for it in items],
                         [it.response_b for it in items], batch_size=self.batch_size)

    def judge(self, items: list[JudgeItem]) -> list[float]:
        return [r["p"] for r in self.judge_details(items)]


class VerifierJudge:
    """The demo verifier: 1 if the candidate passes and the reference fails, 0 the reverse, 0.5 otherwise.

    ``verify(response, constraint) -> bool`` defaults to :func:`spa_lite.demo.tasks.verify`; the constraint
    is ``item.metadata[key]`` (or the metadata itself when it has a ``kind``).
    """

    def __init__(self, verify: Callable[[str, Any], bool] | None = None, key: str = "constraint"):
        if verify is None:
            from spa_lite.demo.tasks import verify
        self.verify = verify
        self.key = key

    def _constraint(self, item: JudgeItem, i: int):
        md = item.metadata or {}
        if self.key in md:
            return md[self.key]
        if "kind" in md:
            return md
        raise ValueError(f"item {i}: the verifier judge needs metadata[{self.key!r}] (a demo constraint)")

    def judge_details(self, items: Sequence[JudgeItem]) -> list[dict]:
        rows = []
        for i, it in enumerate(items):
            c = self._constraint(it, i)
            pa, pb = bool(self.verify(it.response_a, c)), bool(self.verify(it.response_b, c))
            rows.append({"p": 1.0 if pa and not pb else 0.0 if pb and not pa else 0.5,
                         "candidate_pass": pa, "reference_pass": pb})
        return rows

    def judge(self, items: list[JudgeItem]) -> list[float]:
        return [r["p"] for r in self.judge_details(items)]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _outcome(p: float, tie_margin: float) -> float:
    if p > 0.5 + tie_margin:
        return 1.0
    if p < 0.5 - tie_margin:
        return 0.0
    return 0.5


def win_rate_eval(
    candidates: Sequence[str],
    references: Sequence[str],
    prompts: Sequence[list[dict]],
    judge: PairwiseJudge,
    metadata: Sequence[dict | None] | None = None,
    *,
    tie_margin: float = 0.0,
    chunk_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Win rate of ``candidates`` against ``references`` (same prompts, same order) under ``judge``.

    Each judge probability p becomes an outcome: 1 (win) if p > 0.5 + tie_margin, 0 (loss) if
    p < 0.5 - tie_margin, else 0.5 (tie). Items go to the judge ``chunk_size`` at a time, ``on_batch(n)``
    after each chunk. A judge with ``judge_details`` (all judges here) adds its details to the items.

    Returns:
        ``n, win_rate, ci_low, ci_high`` (:func:`spa_lite.metrics.win_rate`, bootstrap 95% CI),
        ``wins, ties, losses``, ``mean_p`` with ``mean_p_ci_low/high`` (the soft win rate, bootstrap, seed 0),
        ``tie_margin`` and ``items``: per item ``index, p, outcome`` and the judge's details.
    """
    n = len(candidates)
    if len(references) != n or len(prompts) != n:
        raise ValueError(f"candidates, references and prompts differ in length: {n}, {len(references)}, {len(prompts)}")
    if metadata is not None and len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} entries for {n} candidates")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    items = [JudgeItem(list(prompts[i]), candidates[i], references[i], None if metadata is None else metadata[i])
             for i in range(n)]
    details: list[dict] = []
    for s in range(0, n, chunk_size):
        chunk = items[s : s + chunk_size]
        if hasattr(judge, "judge_details"):
            rows = [dict(r) for r in judge.judge_details(chunk)]
        else:
            rows = [{"p": p} for p in judge.judge(chunk)]
        if len(rows) != len(chunk):
            raise JudgeError(f"the judge returned {len(rows)} results for {len(chunk)} items")
        details += rows
        if on_batch:
            on_batch(len(chunk))
    per_item = []
    for i, r in enumerate(details):
        p = float(r.pop("p"))
        if not (0.0 <= p <= 1.0) or math.isnan(p):
            raise JudgeError(f"item {i}: the judge returned p={p}, outside [0, 1]")
        per_item.append({"index": i, "p": p, "outcome": _outcome(p, tie_margin), **r})
    outcomes = [r["outcome"] for r in per_item]
    ps = [r["p"] for r in per_item]
    summary = win_rate(outcomes)
    lo, hi = bootstrap_ci(ps, seed=0)
    return {
        **summary,
        "wins": sum(o == 1.0 for o in outcomes),
        "ties": sum(o == 0.5 for o in outcomes),
        "losses": sum(o == 0.0 for o in outcomes),
        "mean_p": float(sum(ps) / n) if n else math.nan,
        "mean_p_ci_low": lo,
        "mean_p_ci_high": hi,
        "tie_margin": tie_margin,
        "items": per_item,
    }
