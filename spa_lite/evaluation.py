"""What `spa-lite eval` measures: judge accuracy on gold pairs, noise detection on flipped labels,
self-labelling noise of each D_i, and verifier pass rates of each policy (the alignment curve).

Every function here is ``torch.no_grad()`` and returns plain dicts; the eval stage writes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spa_lite.data import pair_texts
from spa_lite.generation import encode_prompt, sample_responses
from spa_lite.judge import judge_llm, judge_logprob
from spa_lite.layout import policy_names
from spa_lite.logps import batch_logps, collate_pairs, tokenize_pair, truncate_pair
from spa_lite.losses import pair_logits
from spa_lite.metrics import accuracy_with_ci, auroc, flip_labels, pass_rate_with_ci, precision_at_k_percent, summarize
from spa_lite.sampling_copy import sampling_dtype
from spa_lite.stack import PolicyStack


@torch.no_grad()
def judge_accuracy(stack: PolicyStack, pairs: Sequence, k: int | None, methods: Sequence[str], beta: float = 0.1,
                   batch_size: int = 8, cache: dict | None = None) -> dict:
    """Accuracy (with 95% Wilson intervals) of each judgment method against the gold labels, judged by pi_k.

    Methods: ``init`` (Eq. 7), ``prev`` (Eq. 7 with pi_{k-1} as reference), ``none`` (log pi_k alone),
    ``llm`` (the LLM-as-judge prompt). The gold chosen response is presented first to half of the pairs
    and second to the other half, so a judge biased toward a position cannot score above chance by it.
    """
    judge = policy_names(k)
    prompts = [p.prompt_ids for p in pairs]
    swap = [i % 2 == 1 for i in range(len(pairs))]
    y1 = [p.rejected_ids if s else p.chosen_ids for p, s in zip(pairs, swap)]
    y2 = [p.chosen_ids if s else p.rejected_ids for p, s in zip(pairs, swap)]
    out = {}
    cache = {} if cache is None else cache  # one log-prob pass per policy, shared by the methods (and by callers)
    for m in methods:
        if m in {"init", "prev"} and k is None:
            continue  # pi_init against itself: every log-ratio is 0
        if m == "llm":
            texts = [(p.meta["chosen"], p.meta["rejected"]) for p in pairs]
            t1 = [r if s else c for (c, r), s in zip(texts, swap)]
            t2 = [c if s else r for (c, r), s in zip(texts, swap)]
            rows = judge_llm(stack, judge, [p.meta["prompt"] for p in pairs], t1, t2, batch_size=max(1, batch_size // 2))
        else:
            ref = {"init": [], "prev": policy_names(k - 1) if k else [], "none": None}[m]
            rows = judge_logprob(stack, judge, ref, prompts, y1, y2, beta=beta, batch_size=batch_size, cache=cache)
        correct = [(r["p"] > 0.5) != s for r, s in zip(rows, swap)]
        out[m] = accuracy_with_ci(correct)
    return out


@torch.no_grad()
def pair_confidences(stack: PolicyStack, pairs: Sequence, theta: list[str], ref: list[str], lambdas: Sequence[float],
                     beta: float = 0.1, flipped: np.ndarray | None = None, batch_size: int = 4) -> dict[str, np.ndarray]:
    """Per-pair confidence that the (possibly flipped) label is right: Eq. 9 and DND (Eq. 11-12) per lambda."""
    pad = stack.tokenizer.pad_token_id
    flipped = np.zeros(len(pairs), bool) if flipped is None else flipped
    res: dict[str, list[float]] = {"eq9": [], **{f"dnd_{lam:g}": [] for lam in lambdas}}
    for s in range(0, len(pairs), batch_size):
        lp = batch_logps(stack, collate_pairs(list(pairs[s : s + batch_size]), pad), theta, ref, lambdas)
        sign = torch.tensor([-1.0 if f else 1.0 for f in flipped[s : s + batch_size]], device=lp.policy.device)
        res["eq9"] += torch.sigmoid(sign * pair_logits(lp.policy, lp.ref, beta)).tolist()
        for lam, mix in lp.extrapolated.items():
            res[f"dnd_{lam:g}"] += torch.sigmoid(sign * pair_logits(mix, lp.ref, beta)).tolist()
    return {k: np.asarray(v) for k, v in res.items()}


def noise_detection(stack: PolicyStack, pairs: Sequence, k: int, flip: float, lambdas: Sequence[float], seed: int = 0,
                    k_percent: float = 20.0, beta: float = 0.1) -> dict:
    """Flip ``flip`` of the gold labels; how well does low confidence find the flipped pairs?

    theta = pi_k, reference = pi_{k-1} (pi_init for k = 0), as in training iteration k.
    """
    flipped = flip_labels(len(pairs), flip, seed)
    conf = pair_confidences(stack, pairs, policy_names(k), policy_names(k - 1) if k > 0 else [], lambdas, beta, flipped)
    out = {"flipped": int(flipped.sum()), "n": len(pairs)}
    for name, c in conf.items():
        out[name] = {"auroc": auroc(-c, flipped) if 0 < flipped.sum() < len(pairs) else None,
                     f"precision_at_{k_percent:g}pct": precision_at_k_percent(c, flipped, k_percent, lowest=True)}
    return out


@torch.no_grad()
def response_outcomes(stack: PolicyStack, records: Sequence[dict], k: int | None, verify, samples: int = 1,
                      max_new_tokens: int = 64, temperature: float = 0.7, seed: int = 0,
                      batch_size: int = 16, on_batch=None, sample_dtype: str = "model") -> list[dict]:
    """pi_k's responses to held-out demo prompts, one row per (prompt, sample) in prompt order:
    ``{"id", "sample", "passed", "tokens", "truncated"}``. ``temperature`` 0 is greedy decoding.

    Prompts are batched by tokenised length (longest first) so a batch pads little; the samples of a prompt
    depend on its batch, so with sampling the draws differ from file-order batching (greedy ones do not).
    ``on_batch(n)`` is called as prompts finish (progress bars). ``sample_dtype``: as ``expand.sample_dtype``.
    """
    lengths = [len(encode_prompt(stack.tokenizer, r["prompt"])) for r in records]
    order = sorted(range(len(records)), key=lambda i: -lengths[i])
    with stack.use(policy_names(k)) as m:
        outs = sample_responses(m, stack.tokenizer, [records[i]["prompt"] for i in order], num_samples=samples,
                                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                batch_size=batch_size, on_batch=on_batch, dtype=sampling_dtype(sample_dtype, m))
    by_prompt = dict(zip(order, outs))
    rows = []
    for i, rec in enumerate(records):
        for s, smp in enumerate(by_prompt[i]):
            rows.append({"id": rec.get("id", str(i)), "sample": s, "passed": bool(verify(smp.text, rec["constraint"])),
                         "tokens": smp.num_tokens, "truncated": bool(smp.truncated)})
    return rows


def summarize_outcomes(rows: Sequence[dict]) -> dict:
    """Pass rate with its Wilson 95% CI, mean length in tokens and truncation rate of outcome rows."""
    res = pass_rate_with_ci([r["passed"] for r in rows])
    res["mean_tokens"] = summarize([r["tokens"] for r in rows])["mean"]
    res["truncated_rate"] = float(np.mean([r["truncated"] for r in rows])) if rows else float("nan")
    return res


def self_label_noise(rows: Sequence[dict], verify, flags: Sequence[dict] | None = None) -> dict:
    """How often the verifier contradicts Eq. 7's labels in D_i, and whether flagged pairs hold more of them.

    A pair is 'contradicted' when the verifier passes the rejected response and fails the chosen one,
    'confirmed' in the opposite case, and undetermined when both pass or both fail. Rows are D_i's records as
    written (TRL conversational) or with text responses.
    """
    status = []
    for r in map(pair_texts, rows):
        c, rj = verify(r["chosen"], r["constraint"]), verify(r["rejected"], r["constraint"])
        status.append("contradicted" if rj and not c else "confirmed" if c and not rj else "undetermined")
    n = len(status)
    out = {"n": n, **{s: status.count(s) for s in ("confirmed", "contradicted", "undetermined")}}
    decided = out["confirmed"] + out["contradicted"]
    out["contradicted_frac_of_decided"] = out["contradicted"] / decided if decided else None
    if flags:
        ever = {f["row"] for f in flags if f.get("flagged")}
        fl = [status[i] for i in ever if i is not None and i < n]
        nf = [s for i, s in enumerate(status) if i not in ever]

        def rate(xs):
            d = [x for x in xs if x != "undetermined"]
            return (sum(x == "contradicted" for x in d) / len(d)) if d else None

        out["flagged_pairs"] = len(fl)
        out["contradicted_rate_flagged"] = rate(fl)
        out["contradicted_rate_unflagged"] = rate(nf)
    return out


def encode_pairs_for_eval(tokenizer, rows: Sequence[dict], max_length: int, max_prompt_length: int | None = None,
                          truncation: str = "skip") -> list:
    """Tokenised pairs that also keep their texts (the LLM judge reads text; it reads them whole).

    A pair longer than ``max_length`` is left out (``skip``) or cut by :func:`~spa_lite.logps.truncate_pair`
    (``truncate``, which needs ``max_prompt_length``) and marked ``meta["truncated"]``."""
    out = []
    for r in rows:
        tp = tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"],
                           {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
        if len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids)) <= max_length:
            out.append(tp)
        elif truncation == "truncate":
            out.append(truncate_pair(tp, max_length, max_prompt_length))
    return out


__all__ = ["judge_accuracy", "noise_detection", "response_outcomes", "summarize_outcomes", "self_label_noise", "pair_confidences",
           "encode_pairs_for_eval"]
