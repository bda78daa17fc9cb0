"""Direct preference judgment (Eq. 7), its ablations, and the LLM-as-judge baseline.

Judging is an explicit ``torch.no_grad()`` function that returns rows; it never trains, never writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from spa_lite.generation import encode_prompt
from spa_lite.logps import batch_logps, collate_sequences
from spa_lite.pairwise import LLM_JUDGE_PROMPT
from spa_lite.stack import PolicyStack


def stable_sigmoid(z: float) -> float:
    """1 / (1 + exp(-z)) without OverflowError: math.exp overflows above 709, so exponentiate -|z| only."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)  # z < 0: exp(z) in (0, 1), underflows to 0.0 at worst
    return e / (1.0 + e)


@torch.no_grad()
def response_logps(stack: PolicyStack, names: Sequence[str], prompts: Sequence[list[int]],
                   responses: Sequence[list[int]], batch_size: int = 8) -> torch.Tensor:
    """Sum of log pi_names(y | x) over response tokens, for each (prompt, response), in batches."""
    out = []
    pad = stack.tokenizer.pad_token_id
    for s in range(0, len(prompts), batch_size):
        batch = collate_sequences(prompts[s : s + batch_size], responses[s : s + batch_size], pad)
        out.append(batch_logps(stack, batch, names).policy.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def judge_logprob(
    stack: PolicyStack,
    judge: Sequence[str],
    ref: Sequence[str] | None,
    prompts: Sequence[list[int]],
    y1: Sequence[list[int]],
    y2: Sequence[list[int]],
    beta: float = 0.1,
    length_penalty: float = 0.0,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    cache: dict | None = None,
    per_token: bool = False,
    judge_logps: tuple[Sequence[float], Sequence[float]] | None = None,
    check: dict | None = None,
    check_pairs: int = 2,
) -> list[dict]:
    """Eq. 7: p(y1 > y2 | x) = sigmoid(beta * [r(y1) - r(y2)]), r(y) = log pi_judge(y|x) - log pi_ref(y|x).

    Args:
        judge: adapters of the judging policy pi_{i-1}.
        ref: adapters of the reference ([] = pi_init, the paper's choice); None = no reference (r = log pi).
        length_penalty: a in Eq. 13, r(y) - a * |y| with |y| in tokens.
        per_token: the reward divided by |y| (``expand.judge_norm: per_token``); a length penalty then cancels.
        cache: reuse log-probs across calls on the SAME prompts and responses (keyed by adapters and batch),
            so judging with several references or judges scores each policy once.
        judge_logps: log pi_judge(y1|x) and log pi_judge(y2|x) already known (recorded while sampling,
            ``sample_responses(record_logps=True)``): the judge's forward pass is skipped, only the reference
            runs. The first ``check_pairs`` pairs are still scored by a forward pass and compared: if any differs
            by more than ``check["tol"]`` nats (default 0.05; e.g. a model whose generation_config adds a
            repetition penalty ahead of the recorder), the recorded values are dropped and every batch is
            scored by forward passes. ``check`` (a dict, optional) receives "max_abs_dev", "checked" and "reused";
            with ``check["per_token"]`` true, the deviation compared with ``tol`` is per response token (log-probs
            recorded by a reduced-precision copy drift with length: ``expand.sample_dtype``).

    Pairs are scored longest first (batches then pad little; the self-check reads the longest pairs) and
    returned in the given order.

    Returns:
        per pair: p, the two log-ratios (rewards before the penalty) and the two token lengths.
    """
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + max(len(y1[i]), len(y2[i]))))
    def perm(xs):
        return [xs[i] for i in order]

    known = None if judge_logps is None else (perm(judge_logps[0]), perm(judge_logps[1]))
    rows = _judge_in_order(stack, judge, ref, perm(prompts), perm(y1), perm(y2), beta, length_penalty, batch_size,
                           on_batch, cache, known, check, check_pairs, per_token)
    out: list[dict] = [{}] * len(rows)
    for k, i in enumerate(order):
        out[i] = rows[k]
    return out


def implicit_reward(logratio: float, length: int, beta: float, length_penalty: float, per_token: bool) -> float:
    """Eq. 7's (Eq. 13's with a penalty) reward of one response: beta * (logratio - a * |y|), per token if asked."""
    r = logratio - length_penalty * length
    return beta * (r / max(1, length) if per_token else r)


def _judge_in_order(stack, judge, ref, prompts, y1, y2, beta, length_penalty, batch_size, on_batch, cache,
                    judge_logps, check, check_pairs, per_token=False) -> list[dict]:
    """``judge_logprob`` on pairs in the order given, in batches of ``batch_size`` pairs."""
    rows = []
    check = check if check is not None else {}
    tol = check.setdefault("tol", 0.05)
    check_per_token = check.setdefault("per_token", False)
    check.update(max_abs_dev=None, checked=0, reused=judge_logps is not None)
    for s in range(0, len(prompts), batch_size):
        p_, a, b = prompts[s : s + batch_size], y1[s : s + batch_size], y2[s : s + batch_size]
        both_p, both_r, n = list(p_) + list(p_), list(a) + list(b), len(p_)

        def logps(names, s=s, both_p=both_p, both_r=both_r, n_pairs=n):  # this batch's inputs, bound per batch
            key = (tuple(names), s)
            if cache is None or key not in cache:
                out = response_logps(stack, names, both_p, both_r, batch_size=2 * n_pairs)
                if cache is None:
                    return out
                cache[key] = out
            return cache[key]

        if check["reused"]:
            pol = torch.tensor(list(judge_logps[0][s : s + batch_size]) + list(judge_logps[1][s : s + batch_size]),
                               dtype=torch.float32)
            if s == 0:  # self-check on the first pairs: recorded vs teacher-forced log-probs
                k = min(len(p_), check_pairs)
                forward = response_logps(stack, judge, list(p_[:k]) * 2, list(a[:k]) + list(b[:k]), batch_size=2 * k)
                dev = (forward - torch.cat([pol[:k], pol[n : n + k]])).abs()
                if check_per_token:
                    dev = dev / torch.tensor([max(1, len(y)) for y in list(a[:k]) + list(b[:k])])
                dev = dev.max().item()
                check.update(max_abs_dev=dev, checked=2 * k)
                if not dev <= tol:
                    check["reused"] = False
                    pol = logps(judge)
        else:
            pol = logps(judge)
        refl = torch.zeros_like(pol) if ref is None else logps(ref)
        r = pol - refl
        for i in range(n):
            r1, r2 = r[i].item(), r[n + i].item()
            l1, l2 = len(a[i]), len(b[i])
            z = (implicit_reward(r1, l1, beta, length_penalty, per_token)
                 - implicit_reward(r2, l2, beta, length_penalty, per_token))
            rows.append({"p": stable_sigmoid(z), "logratio_1": r1, "logratio_2": r2, "len_1": l1, "len_2": l2})
        if on_batch:
            on_batch(n)
    return rows


@torch.no_grad()
def score_responses(
    stack: PolicyStack,
    judge: Sequence[str],
    ref: Sequence[str] | None,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    beta: float = 0.1,
    length_penalty: float = 0.0,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
    judge_logps: Sequence[float] | None = None,
    check: dict | None = None,
    check_responses: int = 4,
    per_token: bool = False,
) -> list[dict]:
    """Eq. 7's implicit reward of single responses: r(y) = beta * [log pi_judge(y|x) - log pi_ref(y|x) - a * |y|].

    ``judge_logprob``'s p for a pair is sigmoid(r(y1) - r(y2)) with this r (up to float rounding), so N samples
    scored once can be paired offline (best vs worst: ``expand.num_samples`` > 2).

    Args:
        judge, ref, length_penalty, per_token: as in ``judge_logprob`` (ref None: no reference).
        batch_size: responses per forward pass.
        judge_logps: log pi_judge(y|x) per response, recorded while sampling: only the reference runs, after a
            self-check of the first ``check_responses`` (longest) responses against a forward pass, as in
            ``judge_logprob`` (``check`` takes and returns the same keys).

    Returns:
        per response, in the given order: reward, logratio (before the penalty and beta) and len (tokens).
    """
    n = len(prompts)
    order = sorted(range(n), key=lambda i: -(len(prompts[i]) + len(responses[i])))  # batches pad little
    ps, ys = [prompts[i] for i in order], [responses[i] for i in order]
    known = None if judge_logps is None else torch.tensor([float(judge_logps[i]) for i in order])
    check = check if check is not None else {}
    tol, check_per_token = check.setdefault("tol", 0.05), check.setdefault("per_token", False)
    check.update(max_abs_dev=None, checked=0, reused=known is not None)
    if known is not None and n:
        k = min(n, check_responses)
        dev = (response_logps(stack, judge, ps[:k], ys[:k], batch_size=k) - known[:k]).abs()
        if check_per_token:
            dev = dev / torch.tensor([max(1, len(y)) for y in ys[:k]])
        check.update(max_abs_dev=dev.max().item(), checked=k)
        if not check["max_abs_dev"] <= tol:
            check["reused"] = False
    scored: list[dict] = []
    for s in range(0, n, batch_size):
        p_, y_ = ps[s : s + batch_size], ys[s : s + batch_size]
        pol = known[s : s + batch_size] if check["reused"] else response_logps(stack, judge, p_, y_, len(p_))
        refl = torch.zeros_like(pol) if ref is None else response_logps(stack, ref, p_, y_, len(p_))
        for lr, y in zip((pol - refl).tolist(), y_):
            scored.append({"reward": implicit_reward(lr, len(y), beta, length_penalty, per_token), "logratio": lr,
                           "len": len(y)})
        if on_batch:
            on_batch(len(p_))
    out: list[dict] = [{}] * n
    for k, i in enumerate(order):
        out[i] = scored[k]
    return out


def _option_token(tokenizer, letter: str) -> int:
    ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
    return ids[-1]


@torch.no_grad()
def judge_llm(
    stack: PolicyStack,
    judge: Sequence[str],
    prompts: Sequence[list[dict]],
    texts1: Sequence[str],
    texts2: Sequence[str],
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> list[dict]:
    """The paper's LLM-as-judge baseline: the judging model reads both responses and names the better one.

    p(y1 > y2) is the softmax of the next-token logits of "A" vs "B" after the answer prefix "(",
    averaged over both presentation orders to cancel position bias.
    """
    tok = stack.tokenizer
    a_id, b_id = _option_token(tok, "A"), _option_token(tok, "B")
    prefix = tok("(", add_special_tokens=False)["input_ids"]

    def encode(question: str, first: str, second: str) -> list[int]:
        msg = [{"role": "user", "content": LLM_JUDGE_PROMPT.format(question=question, a=first, b=second)}]
        return encode_prompt(tok, msg) + prefix

    rows = []
    pad = tok.pad_token_id
    with stack.use(judge) as m:
        device = next(m.parameters()).device
        for s in range(0, len(prompts), batch_size):
            seqs = []
            for p, t1, t2 in zip(prompts[s : s + batch_size], texts1[s : s + batch_size], texts2[s : s + batch_size]):
                q = p[-1]["content"]
                seqs += [encode(q, t1, t2), encode(q, t2, t1)]
            width = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, x in enumerate(seqs):  # left padding: the last position is every row's next token
                ids[i, width - len(x) :] = torch.tensor(x)
                attn[i, width - len(x) :] = 1
            # only the next-token logits are read: logits_to_keep=1 skips the [N, L, V] projection
            logits = m(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=False,
                       logits_to_keep=1).logits[:, -1].float()
            pa = torch.softmax(logits[:, [a_id, b_id]], dim=-1)[:, 0].cpu()
            for i in range(len(seqs) // 2):
                p1 = 0.5 * (pa[2 * i].item() + (1.0 - pa[2 * i + 1].item()))
                rows.append({"p": p1, "p_order_ab": pa[2 * i].item(), "p_order_ba": 1.0 - pa[2 * i + 1].item()})
            if on_batch:
                on_batch(len(seqs) // 2)
    return rows
