"""Win rate of a policy's responses against a reference model's responses, under a pluggable pairwise judge.

A judge is anything with ``judge(items) -> list[float]``: for each :class:`JudgeItem` the probability that the
candidate (``response_a``) is better than the reference (``response_b``); 1 a win, 0 a loss, 0.5 a tie.

Judges here:

* :class:`spa_lite.http_judge.HTTPJudge` -- an OpenAI-compatible ``/v1/chat/completions`` endpoint
  (OpenAI, vLLM, llama.cpp, ...), asked for "A" or "B" in both presentation orders, with retries and a
  resumable on-disk cache.
* :class:`LocalLLMJudge` -- a local policy of a :class:`~spa_lite.stack.PolicyStack` as LLM-as-judge
  (:func:`spa_lite.judge.judge_llm`).
* :class:`VerifierJudge` -- the demo task's program verifier (:func:`spa_lite.demo.tasks.verify`).

:func:`win_rate_eval` turns the probabilities into win/tie/loss outcomes and the win rate with its CI
(:func:`spa_lite.metrics.win_rate`); :func:`compare_policies` is `spa-lite winrate` (``spa_lite.policy_win_rate``): two
policies of a run answer the same prompts and a judge compares them. ``JudgeItem``, ``PairwiseJudge`` and
``JudgeError`` are :mod:`spa_lite.pairwise`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from spa_lite.config import Recipe
from spa_lite.data import load_prompts
from spa_lite.demo.tasks import verify as demo_verify
from spa_lite.errors import SpaError
from spa_lite.generation import sample_responses
from spa_lite.http_judge import HTTPJudge
from spa_lite.io import atomic_write_json
from spa_lite.judge import judge_llm
from spa_lite.layout import complete_policies, eval_dir, policy_label, policy_names, resolve_policy
from spa_lite.loading import load_stack
from spa_lite.metrics import bootstrap_ci, win_rate
from spa_lite.options import WinrateOptions
from spa_lite.pairwise import JudgeError, JudgeItem, PairwiseJudge
from spa_lite.sampling_copy import sampling_dtype
from spa_lite.stack import PolicyStack
from spa_lite.ui import task

__all__ = ["LocalLLMJudge", "VerifierJudge", "win_rate_eval", "compare_policies"]


# --------------------------------------------------------------------------------------------------
# Local and verifier judges
# --------------------------------------------------------------------------------------------------


class LocalLLMJudge:
    """A policy of a PolicyStack as LLM-as-judge (:func:`spa_lite.judge.judge_llm`, both orders averaged).

    ``names`` are the adapters of the judging policy (``spa_lite.layout.policy_names(k)``; [] = pi_init).
    """

    def __init__(self, stack, names: Sequence[str], batch_size: int = 4):
        self.stack = stack
        self.names = list(names)
        self.batch_size = batch_size

    def judge_details(self, items: Sequence[JudgeItem]) -> list[dict]:
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
        self.verify = demo_verify if verify is None else verify
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


# --------------------------------------------------------------------------------------------------
# Two policies of a run (`spa-lite winrate`)
# --------------------------------------------------------------------------------------------------


def check_judge(judge: str, records: list[dict]) -> None:
    """Refuse the verifier judge on prompts it cannot check, before any response is sampled."""
    if judge == "verifier" and not all("constraint" in x for x in records):
        raise SpaError("--judge verifier needs prompts with a 'constraint' (the demo task)")


def make_judge(opts: WinrateOptions, stack: PolicyStack, recipe: Recipe):
    """The pairwise judge ``opts.judge`` names; HTTP verdicts are cached under RUN/eval/winrate_cache."""
    if opts.judge == "verifier":
        return VerifierJudge()
    if opts.judge == "local":
        return LocalLLMJudge(stack, [])
    return HTTPJudge(opts.judge_url, opts.judge_model, api_key_env=opts.judge_key_env,
                     cache_dir=eval_dir(recipe) / "winrate_cache")


def responses(stack: PolicyStack, recipe: Recipe, ks: list[int | None], prompts: list, on_batch=None) -> dict:
    """One sampled response per prompt from each pi_k (None: pi_init), with the recipe's expand settings."""
    c = recipe.expand
    out = {}
    for k in ks:
        with stack.use(policy_names(k)) as m:
            out[k] = [ss[0].text for ss in sample_responses(
                m, stack.tokenizer, prompts, num_samples=1, max_new_tokens=c.max_new_tokens,
                temperature=c.temperature, seed=recipe.seed, batch_size=c.batch_size, on_batch=on_batch,
                dtype=sampling_dtype(c.sample_dtype, m))]
    return out


def compare_policies(recipe: Recipe, opts: WinrateOptions) -> dict:
    """Sample both policies' responses to the prompts, judge them and write
    RUN/eval/winrate_<cand>_vs_<ref>_<judge>.json; returns it (``win_rate_eval``'s result, plus ``candidate``
    and ``reference``: the policies' labels).

    Raises:
        SpaError: a policy that is not complete, no prompts, or a judge that cannot judge them.
    """
    ks = complete_policies(recipe)
    cand_k, ref_k = resolve_policy(recipe, opts.policy), resolve_policy(recipe, opts.reference)
    spec = opts.prompts or recipe.data.eval_prompts
    if not spec:
        raise SpaError("no prompts: give --prompts or set data.eval_prompts in the recipe")
    recs = load_prompts(spec)[: opts.limit]
    check_judge(opts.judge, recs)
    stack = load_stack(recipe, frozen_upto=max(ks) if ks else -1)
    texts = [x["prompt"] for x in recs]
    with task("winrate: responses of both policies", 2 * len(recs)) as advance:
        outs = responses(stack, recipe, [cand_k, ref_k], texts, on_batch=advance)
    judge = make_judge(opts, stack, recipe)
    with task(f"winrate: {opts.judge} judge", len(recs)) as advance:
        res = win_rate_eval(outs[cand_k], outs[ref_k], texts, judge,
                            metadata=[{"constraint": x.get("constraint")} for x in recs], on_batch=advance)
    cand, ref = policy_label(cand_k), policy_label(ref_k)
    atomic_write_json(eval_dir(recipe) / f"winrate_{cand}_vs_{ref}_{opts.judge}.json",
                      {k: v for k, v in res.items() if k != "items"} | {"items": res["items"]})
    return {**res, "candidate": cand, "reference": ref}
