"""Pairwise judge on an OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, ...).

:class:`HTTPJudge` puts together small parts, each usable and testable on its own:

* :class:`JudgePrompt` -- the request payload for one presentation order of an item;
* :class:`ChatEndpoint` -- one payload sent, retried on 429, 5xx, timeouts and connection errors;
* :class:`AnswerCache` -- answers by payload hash, in a resumable JSONL file;
* :func:`fetch_concurrently` -- many requests through a thread pool, each answer stored as it arrives;
* :func:`score_both_orders` -- the candidate's probability from the answers in both orders.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spa_lite.pairwise import LLM_JUDGE_PROMPT, JudgeError, JudgeItem, format_question, parse_verdict

__all__ = [
    "CACHE_FILE",
    "HTTPJudge",
    "JudgePrompt",
    "ChatEndpoint",
    "AnswerCache",
    "fetch_concurrently",
    "score_both_orders",
]

CACHE_FILE = "http_judge_cache.jsonl"


def _chat_url(base_url: str) -> str:
    u = base_url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/chat/completions"
    return u + "/v1/chat/completions"


# --------------------------------------------------------------------------------------------------
# Prompt building
# --------------------------------------------------------------------------------------------------


@dataclass
class JudgePrompt:
    """Builds the chat request asking which of two responses is better.

    ``template`` has ``{question}``, ``{a}`` and ``{b}``; ``max_tokens`` and ``temperature`` are left out of
    the request when None; ``extra_body`` adds request fields (e.g. ``{"max_completion_tokens": 16}``).
    """

    model: str
    template: str
    system: str | None = None
    max_tokens: int | None = 16
    temperature: float | None = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

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


# --------------------------------------------------------------------------------------------------
# HTTP with retries
# --------------------------------------------------------------------------------------------------


class _RetryableError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _redact(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


class ChatEndpoint:
    """Sends one chat payload and returns the answer text, retrying transient failures.

    The API key is read from the environment variable ``api_key_env`` only when a request is about to be sent
    (:meth:`api_key`), passed to :meth:`post` and never kept, logged or put in an error message. Retries wait
    ``backoff * 2**attempt`` seconds plus jitter (or the server's Retry-After), at most ``max_backoff``.
    ``resume_hint`` ends the "out of retries" message (what the caller kept, how to resume).
    """

    def __init__(self, url: str, api_key_env: str | None, *, timeout: float = 60, max_retries: int = 4,
                 backoff: float = 1.0, max_backoff: float = 60.0, resume_hint: str = ""):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = url
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.resume_hint = resume_hint
        self.requests = 0  # attempts sent, retries included
        self.retries = 0
        self._lock = threading.Lock()

    def api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"HTTP judge: environment variable {self.api_key_env} is not set; export the API key there "
                "(or use api_key_env=None for a server without authentication)"
            )
        return key

    def post(self, payload: dict, key: str | None) -> str:
        """The answer to ``payload``; JudgeError when refused (4xx other than 429) or out of retries."""
        last = ""
        for attempt in range(self.max_retries + 1):
            with self._lock:
                self.requests += 1
                if attempt:
                    self.retries += 1
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
            f"(model {payload.get('model')!r}); last error: {_redact(last, key)}. {self.resume_hint}"
        )

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
            raise self._http_error(e, key) from None
        except (TimeoutError, OSError, http.client.HTTPException) as e:  # timeouts, refused/reset/cut connections
            reason = getattr(e, "reason", e)
            raise _RetryableError(f"{type(reason).__name__}: {reason}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"HTTP judge: {self.url} answered without choices[0].message.content: "
                f"{_redact(raw[:300].decode('utf-8', 'replace'), key)}"
            ) from None
        return "" if content is None else str(content)

    def _http_error(self, e: urllib.error.HTTPError, key: str | None) -> Exception:
        """429 and 5xx are worth retrying (with the server's Retry-After); other 4xx fail at once."""
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
            return _RetryableError(msg, retry_after)
        return JudgeError(f"HTTP judge: {self.url} refused the request ({_redact(msg, key)})")


# --------------------------------------------------------------------------------------------------
# Answer cache
# --------------------------------------------------------------------------------------------------


class AnswerCache:
    """Answers keyed by the sha256 of the request payload.

    With a ``path``, one JSON line per answer is appended and flushed as it arrives, so an interrupted
    evaluation resumes without re-asking; a torn last line (a crash mid-write) is skipped when loading
    (counted in ``skipped_lines``) and the next answer starts on a fresh line. Without one, answers are kept
    in memory only. :meth:`store` is safe to call from several threads.
    """

    def __init__(self, path: Path | None, model: str):
        self.path = path
        self.model = model  # recorded on each line, for a reader of the file
        self.skipped_lines = 0
        self._answers: dict[str, str] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def key(payload: Mapping) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def answers(self) -> dict[str, str]:
        """All answers, read from the file on first use."""
        if self._answers is None:
            self._answers = self._read()
        return self._answers

    def _read(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.path is None or not self.path.exists():
            return out
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = rec["content"]
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1  # torn by a crash mid-write
        return out

    def store(self, key: str, content: str) -> None:
        answers = self.answers()
        with self._lock:
            answers[key] = content
            if self.path is None:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"key": key, "model": self.model, "content": content}, ensure_ascii=False) + "\n"
            with open(self.path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn last line: start ours on a fresh one
                        line = "\n" + line
                    f.seek(0, os.SEEK_END)
                f.write(line.encode("utf-8"))
                f.flush()


# --------------------------------------------------------------------------------------------------
# Concurrency and scoring
# --------------------------------------------------------------------------------------------------


def fetch_concurrently(jobs: Sequence[tuple[str, dict]], fetch: Callable[[str, dict], None], workers: int) -> None:
    """Call ``fetch(key, payload)`` for every job, ``workers`` at a time on a thread pool.

    Jobs run in rounds of ``workers``; a round is waited for completely (so every answer that arrived has
    been stored by ``fetch``) before its first JudgeError is raised and the remaining jobs are dropped.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for s in range(0, len(jobs), workers):
            futures = [pool.submit(fetch, k, p) for k, p in jobs[s : s + workers]]
            error = None
            for fut in futures:
                try:
                    fut.result()
                except JudgeError as e:
                    error = error or e
            if error is not None:
                raise error


def score_both_orders(answer_ab: str, answer_ba: str) -> dict:
    """The candidate's probability from the answers with it shown as A, then as B.

    Each answer scores the candidate 1 (it was named), 0 (the reference was named) or 0.5 (no clear
    verdict); ``p`` is the mean, so a judge that always names the first response scores 0.5.
    """
    v_ab, v_ba = parse_verdict(answer_ab), parse_verdict(answer_ba)
    s_ab = 0.5 if v_ab is None else float(v_ab == "A")
    s_ba = 0.5 if v_ba is None else float(v_ba == "B")
    return {"p": 0.5 * (s_ab + s_ba), "verdict_ab": v_ab, "verdict_ba": v_ba, "answer_ab": answer_ab,
            "answer_ba": answer_ba}


# --------------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------------


class HTTPJudge:
    """Pairwise judge on an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Each item is asked twice, once as (A=candidate, B=reference) and once swapped (:func:`score_both_orders`).

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
        cache_dir: folder of the answer cache ``http_judge_cache.jsonl`` (:class:`AnswerCache`). None keeps
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
        if template is None:
            template = LLM_JUDGE_PROMPT
        self.model = model
        self.batch_size = batch_size
        self.cache_path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        self.prompt = JudgePrompt(model, template, system, max_tokens, temperature, dict(extra_body or {}))
        self.cache = AnswerCache(self.cache_path, model)
        hint = "Answers received so far are cached" + (f" in {self.cache_path}" if self.cache_path else "")
        self.endpoint = ChatEndpoint(_chat_url(base_url), api_key_env, timeout=timeout, max_retries=max_retries,
                                     backoff=backoff, max_backoff=max_backoff, resume_hint=hint + "; rerun to resume.")
        self.cache_hits = 0

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def stats(self) -> dict[str, int]:
        """Requests sent (retries included), retries, answers found in the cache, torn cache lines skipped."""
        return {"requests": self.endpoint.requests, "retries": self.endpoint.retries, "cache_hits": self.cache_hits,
                "cache_skipped_lines": self.cache.skipped_lines}

    def __repr__(self) -> str:
        return f"HTTPJudge(url={self.url!r}, model={self.model!r}, api_key_env={self.endpoint.api_key_env!r})"

    def payload(self, question: str, first: str, second: str) -> dict:
        return self.prompt.payload(question, first, second)

    cache_key = staticmethod(AnswerCache.key)

    def answers(self, payloads: Sequence[dict]) -> list[str]:
        """The endpoint's answer text for each payload: from the cache, else asked concurrently."""
        cached = self.cache.answers()
        keys = [AnswerCache.key(p) for p in payloads]
        todo: dict[str, dict] = {}
        for k, p in zip(keys, payloads):
            if k in cached:
                self.cache_hits += 1
            else:
                todo.setdefault(k, p)
        if todo:
            api_key = self.endpoint.api_key()
            fetch_concurrently(list(todo.items()), lambda k, p: self.cache.store(k, self.endpoint.post(p, api_key)),
                               self.batch_size)
        return [cached[k] for k in keys]

    def judge_details(self, items: Sequence[JudgeItem]) -> list[dict]:
        """Per item: ``p`` and, per order, the raw answer and the parsed verdict (None = unclear)."""
        payloads = []
        for it in items:
            q = format_question(it.prompt)
            payloads.append(self.payload(q, it.response_a, it.response_b))  # candidate shown as A
            payloads.append(self.payload(q, it.response_b, it.response_a))  # candidate shown as B
        texts = self.answers(payloads)
        return [score_both_orders(texts[2 * i], texts[2 * i + 1]) for i in range(len(items))]

    def judge(self, items: list[JudgeItem]) -> list[float]:
        return [r["p"] for r in self.judge_details(items)]
