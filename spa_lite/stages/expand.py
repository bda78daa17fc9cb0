"""Stage expand --iter i: sample N responses per prompt of X_i from pi_{i-1} (N = 2: the paper), judge them with
Eq. 7 (or the judge the recipe names), keep one pair per prompt, write D_i.

Work is done in shards of ``shard_size`` prompts, each written atomically when finished and seeded by its
index alone, so a killed expand resumes at the first missing shard and gives the same D_i as an
uninterrupted run.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace

from spa_lite.config import REWARD_JUDGES, Recipe
from spa_lite.data import iteration_prompts, load_pairs, load_prompts, pair_texts, shuffled, to_trl_conversational
from spa_lite.demo.tasks import verify
from spa_lite.distributed import get_dist
from spa_lite.errors import DataError, SpaError
from spa_lite.generation import encode_prompt, sample_responses
from spa_lite.io import atomic_write_json, atomic_write_jsonl, read_json
from spa_lite.judge import judge_llm, judge_logprob, score_responses
from spa_lite.label_signs import label_signs, warn_signs
from spa_lite.layout import Stage, adapter_name, read_manifest
from spa_lite.loading import load_stack
from spa_lite.metrics import confidence_histogram
from spa_lite.reward import RewardModel, load_run_reward_model, reward_scores
from spa_lite.runs import StageRun, stage_run
from spa_lite.sampling_copy import dtype_name, sampling_dtype
from spa_lite.stack import PolicyStack
from spa_lite.ui import progress
from spa_lite.vllm_backend import VLLMSampler, prepare_adapter

# Self-check of Eq. 7's log-probs read off a reduced-precision copy: largest |recorded - float32 forward| per
# response token. bf16 on SmolLM2: median 0.007, max 0.042 over 96 samples (bench/RESULTS.md, generation); a
# recorder that applied the temperature first is off by several tenths per token.
REDUCED_TOL_PER_TOKEN = 0.1


def judge_reference(stack_names: list[str], judge_ref: str) -> list[str] | None:
    """Eq. 7's reference: init = pi_init (paper), prev = the stack one stage back, none = no reference."""
    if judge_ref == "init":
        return []
    if judge_ref == "prev":
        return stack_names[:-1]
    return None


def expand_shard(stack: PolicyStack, recipe: Recipe, prompts: list[dict], seed: int, on_gen=None, on_judge=None,
                 sample_fn=sample_responses, reward_model: RewardModel | None = None) -> dict:
    """Sample, judge and pair up one shard of prompts. Returns {"rows": [...], "counts": {...}}.

    ``sample_fn`` is transformers' batched sampling on the stack, or a vLLM sampler serving pi_{i-1} as one
    exported adapter (``expand.backend: vllm``); judging always runs on the stack. With ``expand.num_samples``
    N = 2 each prompt's pair is its two samples (the paper); with N > 2 it is the best and the worst of the N by
    judged reward (``best_worst_pairs``). ``reward_model``: the judge of ``expand.judge: reward`` (and of
    logprob+reward), loaded into ``stack`` by ``spa_lite.reward.load_reward_model``.
    """
    c = recipe.expand
    if c.judge in REWARD_JUDGES and reward_model is None:
        raise SpaError(f"expand.judge: {c.judge} needs the reward model (spa_lite.reward.load_reward_model)")
    # Eq. 7's log pi_{i-1}(y|x) read off the sampling pass (transformers backend): judging runs only the reference
    record = c.judge in ("logprob", "logprob+reward") and c.judge_logps == "sampler" and sample_fn is sample_responses
    # prompts over model.max_prompt_length are skipped and counted, as in training (a 100,000-character
    # prompt would otherwise make generation allocate gigabytes)
    fits = [len(encode_prompt(stack.tokenizer, p["prompt"])) <= recipe.model.max_prompt_length for p in prompts]
    kept_prompts = [p for p, f in zip(prompts, fits) if f]
    samples, dtype = _sample(stack, recipe, kept_prompts, seed, on_gen, sample_fn, record)
    if on_gen is not None and len(kept_prompts) < len(prompts):
        on_gen(len(prompts) - len(kept_prompts))
    counts = {"prompts": len(prompts), "prompt_too_long": len(prompts) - len(kept_prompts), "identical": 0,
              "truncated": 0, "empty": 0, "dropped_truncated": 0,
              # the cost of the shard: every response sampled, and their tokens (N per prompt)
              "samples": sum(len(ss) for ss in samples),
              "sampled_tokens": sum(y.num_tokens for ss in samples for y in ss)}
    if c.max_length_ratio:
        counts["length_mismatched"] = 0
    if c.judge == "verifier":
        counts["undecided"] = 0
        if c.verifier_undecided == "coin":
            counts["undecided_coin"] = 0
        if c.verifier_accuracy < 1:
            counts["flipped"] = 0
    check: dict = {}
    if c.num_samples > 2:
        rows = best_worst_pairs(stack, recipe, kept_prompts, samples, counts, record, dtype, check, on_judge,
                                reward_model)
    else:
        keep = _pairs_of_two(kept_prompts, samples, counts, c.drop_truncated, c.max_length_ratio)
        keep, judged = _judge_pairs(stack, recipe, keep, counts, record, dtype, check, on_judge, reward_model)
        if c.verifier_decided:
            judged = verifier_correct(keep, judged, counts, recipe.data.prompts)
        rows = [_row(rec, y1, y2, j) for (rec, y1, y2), j in zip(keep, judged)]
    if c.min_confidence > 0:  # a confidence floor: pairs the judge barely separates are left out, and counted
        counts["below_min_confidence"] = sum(r["confidence"] < c.min_confidence for r in rows)
        rows = [r for r in rows if r["confidence"] >= c.min_confidence]
    out = {"rows": rows, "counts": counts, "sample_dtype": dtype_name(dtype)}
    if check.get("checked"):
        out["sampler_logps"] = {k: check[k] for k in ("reused", "max_abs_dev", "checked", "per_token")}
    return out


def _sample(stack: PolicyStack, recipe: Recipe, prompts: list[dict], seed: int, on_gen, sample_fn, record: bool):
    """N samples per prompt from pi_{i-1}, and the reduced dtype they were decoded in (None: the model's)."""
    c = recipe.expand
    if not prompts:
        return [], None
    dtype = None
    with stack.use(stack.prev) as m:
        extra = {}
        if sample_fn is sample_responses and not (record and c.sample_dtype == "auto"):
            # auto keeps full precision where Eq. 7 reads pi_{i-1}'s log-probs off the sampling pass: a bf16
            # copy's log-probs are not pi_{i-1}'s, and a float32 forward of pi_{i-1} costs more than bf16
            # decoding saves (bench/RESULTS.md, generation). A dtype asked for by name with judge_logps:
            # sampler reads Eq. 7 off the reduced copy: approximate labels (README, "Sampling precision")
            dtype = sampling_dtype(c.sample_dtype, m)
            extra = {"dtype": dtype} if dtype is not None else {}
        samples = sample_fn(
            m, stack.tokenizer, [p["prompt"] for p in prompts], num_samples=c.num_samples,
            max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p, seed=seed,
            batch_size=c.batch_size, on_batch=on_gen, **({"record_logps": True} if record else {}), **extra,
        )
    return samples, dtype


def length_matched(t1: int, t2: int, ratio: float) -> bool:
    """Whether responses of ``t1`` and ``t2`` tokens (each counted as at least 1) are within a factor ``ratio``
    (``expand.max_length_ratio``; 0: no limit)."""
    lo, hi = sorted((max(1, t1), max(1, t2)))
    return not ratio or hi <= ratio * lo * (1 + 1e-12)  # a ratio met exactly is matched, whatever R's rounding


def _pairs_of_two(prompts: list[dict], samples: list, counts: dict, drop_truncated: bool,
                  max_length_ratio: float = 0.0) -> list[tuple]:
    """The paper's pairs (y1, y2) = the two samples of each prompt; unusable ones skipped and counted (with
    ``max_length_ratio``, pairs whose lengths differ by more than that factor, as length_mismatched)."""
    keep = []
    for rec, ss in zip(prompts, samples):
        y1, y2 = ss[0], ss[1]
        trunc = y1.truncated or y2.truncated
        counts["truncated"] += int(trunc)
        if not y1.text or not y2.text:
            counts["empty"] += 1
            continue
        if y1.text == y2.text:
            counts["identical"] += 1
            continue
        if trunc and drop_truncated:
            counts["dropped_truncated"] += 1
            continue
        if not length_matched(y1.num_tokens, y2.num_tokens, max_length_ratio):
            counts["length_mismatched"] += 1
            continue
        keep.append((rec, y1, y2))
    return keep


def _judge_pairs(stack: PolicyStack, recipe: Recipe, keep: list, counts: dict, record: bool, dtype, check: dict,
                 on_judge, reward_model: RewardModel | None = None) -> tuple[list, list[dict]]:
    """Label (rec, y1, y2) with the recipe's judge; returns the pairs kept (the verifier drops some) and their
    judgments (each with p = p(y1 > y2)).

    reward: p = sigmoid(r(y1) - r(y2)) of the Bradley-Terry reward model (no beta: its reward is a logit), r less
    ``expand.length_penalty`` x tokens (Eq. 13's term); logprob+reward: the mean of Eq. 7's p (with its own length
    term) and the reward model's p without one (both kept in the row as p_logprob and p_reward).
    """
    c = recipe.expand
    names = stack.prev
    if c.judge in REWARD_JUDGES:
        x = [encode_prompt(stack.tokenizer, r["prompt"]) for r, _, _ in keep]
        resp = [a for _, a, _ in keep] + [b for _, _, b in keep]  # every y1, then every y2
        r = reward_scores(reward_model, x + x, [reward_tokens(stack.tokenizer, y, c.reward_cut_eos) for y in resp],
                          batch_size=2 * c.judge_batch_size)
        n = len(keep)
        if c.judge == "reward":
            r = [v - c.length_penalty * y.num_tokens for v, y in zip(r, resp)]
        rm = [{"p": 1.0 / (1.0 + math.exp(-(r[i] - r[n + i]))), "reward_1": r[i], "reward_2": r[n + i]} for i in range(n)]
        if c.judge == "reward":
            if on_judge:
                on_judge(n)
            return keep, rm
        _, lp = _judge_pairs(stack, replace(recipe, expand=replace(c, judge="logprob")), keep, counts, record, dtype,
                             check, on_judge)
        return keep, [{**a, **b, "p": 0.5 * (a["p"] + b["p"]), "p_logprob": a["p"], "p_reward": b["p"]}
                      for a, b in zip(lp, rm)]
    if c.judge == "verifier":
        return verifier_judge(keep, counts, recipe.data.prompts, accuracy=c.verifier_accuracy, seed=recipe.seed,
                              flip=c.verifier_flip, undecided=c.verifier_undecided)
    if c.judge == "llm":
        return keep, judge_llm(stack, names, [r["prompt"] for r, _, _ in keep], [a.text for _, a, _ in keep],
                               [b.text for _, _, b in keep], batch_size=c.judge_batch_size, on_batch=on_judge)
    prompt_ids = [encode_prompt(stack.tokenizer, r["prompt"]) for r, _, _ in keep]
    known = None
    if record and all(a.logp is not None and b.logp is not None for _, a, b in keep):
        known = ([a.logp for _, a, _ in keep], [b.logp for _, _, b in keep])
        if dtype is not None:  # a reduced copy's log-probs: the self-check allows its rounding, per token
            check.update(tol=REDUCED_TOL_PER_TOKEN, per_token=True)
    return keep, judge_logprob(stack, names, judge_reference(names, c.judge_ref), prompt_ids,
                               [a.token_ids for _, a, _ in keep], [b.token_ids for _, _, b in keep],
                               beta=c.beta, length_penalty=c.length_penalty, batch_size=c.judge_batch_size,
                               on_batch=on_judge, judge_logps=known, check=check,
                               per_token=c.judge_norm == "per_token")


def _row(rec: dict, y1, y2, j: dict) -> dict:
    """One row of D_i from a judged pair: chosen = y1 iff p(y1 > y2) > 0.5 (Eq. 7; ties go to y2)."""
    first = j["p"] > 0.5
    w, l = (y1, y2) if first else (y2, y1)
    row = {k: v for k, v in rec.items() if k not in {"chosen", "rejected"}}
    row.update(
        chosen=w.text, rejected=l.text, p_y1=j["p"], confidence=max(j["p"], 1 - j["p"]),
        chosen_is_y1=first, len_chosen=w.num_tokens, len_rejected=l.num_tokens,
        truncated_chosen=w.truncated, truncated_rejected=l.truncated,
    )
    for key in ("logratio", "reward"):  # per-response scores, where the judge has them
        if f"{key}_1" in j:
            row.update({f"{key}_chosen": j[f"{key}_1"] if first else j[f"{key}_2"],
                        f"{key}_rejected": j[f"{key}_2"] if first else j[f"{key}_1"]})
    # the ensemble's two judges, and the uncorrected judge of verifier_decided: each its own p(y1 > y2)
    row.update({k: j[k] for k in ("p_logprob", "p_reward", "p_judge") if k in j})
    return row


def _candidates(ss: list, drop_truncated: bool) -> tuple[list[tuple[int, object]], str | None]:
    """A prompt's distinct non-empty samples as (sample index, sample), the first of each text (truncated ones
    left out with ``drop_truncated``), and why there are fewer than two (a ``counts`` key) or None."""
    nonempty = [(k, y) for k, y in enumerate(ss) if y.text]
    seen: set[str] = set()
    distinct = []
    for k, y in nonempty:
        if y.text not in seen:
            seen.add(y.text)
            distinct.append((k, y))
    usable = [(k, y) for k, y in distinct if not (drop_truncated and y.truncated)]
    why = ("empty" if len(nonempty) < 2 else "identical" if len(distinct) < 2
           else "dropped_truncated" if len(usable) < 2 else None)
    return usable, why


def best_worst_pairs(stack: PolicyStack, recipe: Recipe, prompts: list[dict], samples: list, counts: dict,
                     record: bool, dtype, check: dict, on_judge=None, reward_model: RewardModel | None = None
                     ) -> list[dict]:
    """N > 2 samples per prompt: the pair of the highest and the lowest judged reward among its distinct
    non-empty samples (iterative DPO's usual choice), as rows of D_i.

    The reward is Eq. 7's r(y) = beta * [log pi_{i-1}(y|x) - log pi_ref(y|x) - a * |y|] (``score_responses``), or
    with ``expand.judge: reward`` the reward model's r(x, y) - a * |y| (``spa_lite.reward.reward_scores``; a =
    ``expand.length_penalty``, 0 by default).
    The pair keeps its sampling order as (y1, y2), so p_y1 = sigmoid(r(y1) - r(y2)) is Eq. 7's p and the
    confidence is sigmoid(r_best - r_worst). A prompt with fewer than two candidates is counted under ``empty``,
    ``identical`` or ``dropped_truncated`` (the first that applies); ``judged_responses`` counts the responses
    scored. With ``expand.max_length_ratio`` the pair is the largest reward gap among the length-matched pairs of
    candidates, and a prompt without one is counted under ``length_mismatched``.
    """
    c = recipe.expand
    cands = []
    for rec, ss in zip(prompts, samples):
        counts["truncated"] += int(any(y.truncated for y in ss))
        usable, why = _candidates(ss, c.drop_truncated)
        if why:
            counts[why] += 1
            continue
        cands.append((rec, usable))
    flat = [(rec, y) for rec, usable in cands for _, y in usable]
    counts["judged_responses"] = len(flat)
    prompt_ids = [encode_prompt(stack.tokenizer, rec["prompt"]) for rec, _ in flat]
    if c.judge == "reward":  # r(x, y) - a * |y| (Eq. 13's length term; a = expand.length_penalty, 0 by default)
        scores = [{"reward": r - c.length_penalty * y.num_tokens}
                  for r, (_, y) in zip(reward_scores(reward_model, prompt_ids,
                                                     [reward_tokens(stack.tokenizer, y, c.reward_cut_eos)
                                                      for _, y in flat], batch_size=2 * c.judge_batch_size), flat)]
    else:
        known = None
        if record and all(y.logp is not None for _, y in flat):
            known = [y.logp for _, y in flat]
            if dtype is not None:
                check.update(tol=REDUCED_TOL_PER_TOKEN, per_token=True)
        names = stack.prev
        scores = score_responses(stack, names, judge_reference(names, c.judge_ref), prompt_ids,
                                 [y.token_ids for _, y in flat], beta=c.beta, length_penalty=c.length_penalty,
                                 batch_size=2 * c.judge_batch_size, judge_logps=known, check=check,
                                 per_token=c.judge_norm == "per_token")
    rows, at = [], 0
    for rec, usable in cands:
        sc = scores[at : at + len(usable)]
        at += len(usable)
        r = [x["reward"] for x in sc]
        if c.max_length_ratio:  # the largest reward gap among length-matched pairs (first such pair on ties)
            matched = [(a, b) for a in range(len(r)) for b in range(a + 1, len(r))
                       if length_matched(usable[a][1].num_tokens, usable[b][1].num_tokens, c.max_length_ratio)]
            if not matched:
                counts["length_mismatched"] += 1
                continue
            a, b = max(matched, key=lambda ab: abs(r[ab[0]] - r[ab[1]]))
        else:
            hi, lo = r.index(max(r)), r.index(min(r))
            if hi == lo:  # every reward equal: any two, p = 0.5
                hi, lo = 0, 1
            a, b = sorted((hi, lo))  # sampling order: y1 is the earlier sample
        z = r[a] - r[b]
        j = {"p": 1.0 / (1.0 + math.exp(-z)), "reward_1": r[a], "reward_2": r[b]}
        if "logratio" in sc[a]:
            j.update(logratio_1=sc[a]["logratio"], logratio_2=sc[b]["logratio"])
        row = _row(rec, usable[a][1], usable[b][1], j)
        row.update(num_samples=c.num_samples, candidates=len(usable))
        rows.append(row)
    if on_judge:
        on_judge(len(rows))
    return rows


def _verdicts(rec: dict, y1, y2, source: object, what: str) -> tuple[bool, bool]:
    """The demo verifier on both responses of a pair; a prompt without a ``constraint`` is a DataError."""
    if "constraint" not in rec:
        raise DataError(source, None, "constraint", f"prompt {rec.get('id', '?')!r} has none; {what} and needs "
                        "demo prompts (data.prompts: demo:prompts)")
    return verify(y1.text, rec["constraint"]), verify(y2.text, rec["constraint"])


def flip_label(seed: int, prompt_id: object, accuracy: float, rate_scale: float = 1.0) -> bool:
    """Whether the noisy oracle flips this prompt's pair (probability ``rate_scale * (1 - accuracy)``): a draw
    seeded by (recipe seed, prompt id) alone, so the same pair gets the same verdict whatever the shard size,
    order or resume point."""
    # u >= 1 - rate (not u < rate): the draw that the runs made before rate_scale existed used (u >= accuracy)
    return accuracy < 1 and random.Random(f"verifier-flip/{seed}/{prompt_id}").random() >= 1 - rate_scale * (1 - accuracy)


def coin_label(seed: int, prompt_id: object) -> bool:
    """A fair coin for an undecided pair (True: y1 chosen), seeded by (recipe seed, prompt id) alone like
    ``flip_label``: the same pair gets the same label whatever the shard size, order or resume point."""
    return random.Random(f"verifier-coin/{seed}/{prompt_id}").random() < 0.5


def verifier_judge(keep: list, counts: dict, source: object = "prompts", accuracy: float = 1.0,
                   seed: int = 0, flip: str = "random", undecided: str = "drop") -> tuple[list, list[dict]]:
    """The oracle-label control: label (rec, y1, y2) with the demo task's gold verifier instead of Eq. 7.

    A pair the verifier separates gets p = 1 (y1 passes) or 0; pairs where both or neither pass carry no gold
    preference and are dropped (counted as ``undecided``). Prompts must carry the demo ``constraint``.
    ``accuracy`` < 1 is a noisy oracle: each decided pair's label is flipped with probability 1 - accuracy
    (``flip_label``; counted as ``flipped``), labels of known accuracy with no bias towards either response.
    ``flip="shorter"`` flips only pairs whose passing response has more tokens, with probability 2 (1 - accuracy)
    (about 1 - accuracy of all pairs when half are such), so the wrong labels all prefer the shorter answer.
    ``undecided="coin"`` keeps the undecided pairs (still counted as ``undecided``, and as ``undecided_coin``) with a
    fair coin's label seeded by (recipe seed, prompt id) (``coin_label``): labels with no lean where the task has no
    preference.
    """
    kept, judged = [], []
    for rec, y1, y2 in keep:
        v1, v2 = _verdicts(rec, y1, y2, source, "expand.judge: verifier labels with the demo task's verifier")
        pid = rec.get("id", str(rec.get("prompt")))  # what seeds this pair's coin and flip
        if v1 == v2:
            counts["undecided"] += 1
            if undecided == "coin":
                counts["undecided_coin"] = counts.get("undecided_coin", 0) + 1
                kept.append((rec, y1, y2))
                judged.append({"p": 1.0 if coin_label(seed, pid) else 0.0})
            continue
        good, bad = (y1, y2) if v1 else (y2, y1)
        eligible = flip == "random" or good.num_tokens > bad.num_tokens
        if eligible and flip_label(seed, pid, accuracy,
                                   1.0 if flip == "random" else 2.0):
            counts["flipped"] = counts.get("flipped", 0) + 1
            v1 = not v1
        kept.append((rec, y1, y2))
        judged.append({"p": 1.0 if v1 else 0.0})
    return kept, judged


def verifier_correct(keep: list, judged: list[dict], counts: dict, source: object = "prompts") -> list[dict]:
    """``expand.verifier_decided``: a model judge made right on every pair the demo verifier decides. Such a pair's
    p(y1 > y2) is turned to the verifier's side with its confidence max(p, 1 - p) kept, so Eq. 10's refinement sees
    the judge's confidences; undecided pairs keep the judge's label. The judge's own p is kept as ``p_judge``;
    ``verifier_decided`` and ``verifier_corrected`` count the decided pairs and the labels turned."""
    out = []
    counts.setdefault("verifier_decided", 0)
    counts.setdefault("verifier_corrected", 0)
    for (rec, y1, y2), j in zip(keep, judged):
        v1, v2 = _verdicts(rec, y1, y2, source, "expand.verifier_decided reads the demo task's verifier")
        j = {**j, "p_judge": j["p"]}
        if v1 != v2:
            counts["verifier_decided"] += 1
            conf = max(j["p"], 1 - j["p"])
            p = conf if v1 else 1 - conf
            if (p > 0.5) != (j["p"] > 0.5):
                counts["verifier_corrected"] += 1
            j["p"] = p
        out.append(j)
    return out


def run(recipe: Recipe, iteration: int, force: bool = False, recipe_arg: str = "RECIPE") -> dict:
    """Write D_i to runs/<name>/iter{i}/expand/data.jsonl. Returns the stage manifest (the existing one if the
    stage is already complete)."""
    with stage_run(recipe, Stage("expand", iteration), force, recipe_arg) as st:
        if st.done:
            return st.done
        c = recipe.expand
        pool_dropped: dict = {}  # blank prompts (and unusable pairs of a pair file), skipped and counted
        pool = load_prompts(recipe.data.prompts, recipe.data.format, dropped=pool_dropped)
        prompts = iteration_prompts(pool, recipe.data.iter_prompts, iteration, recipe.data.shuffle_seed)
        shards = [prompts[s : s + c.shard_size] for s in range(0, len(prompts), c.shard_size)]
        dist = get_dist()
        # process r makes shards r, r+N, ...: the same shards, seeds and batches as one process would
        todo = [k for k in range(len(shards))
                if k % dist.world == dist.rank and not (st.dir / "shards" / f"{k:05d}.json").exists()]
        if todo:
            _make_shards(st, shards, todo, recipe_arg)
        dist.barrier()
        summary = _collect(st, len(shards), pool_dropped)
        return st.finish(summary, {"prompts": recipe.data.prompts, "shards": len(shards)})


def _make_shards(st: StageRun, shards: list[list[dict]], todo: list[int], recipe_arg: str) -> None:
    """Sample and judge shards ``todo`` of D_i, each written atomically to shards/<k>.json when it is done."""
    recipe, iteration, c = st.recipe, st.stage.iteration, st.recipe.expand
    stack = load_stack(recipe, frozen_upto=iteration - 1)
    assert stack.prev == [adapter_name(k) for k in range(iteration)]
    sample_fn = sample_responses
    if c.backend == "vllm":
        adapter = prepare_adapter(stack, iteration - 1, st.dir / "vllm_adapter")
        sample_fn = VLLMSampler.from_recipe(recipe, iteration - 1).as_sample_fn(adapter)
    rm = None
    if c.judge in REWARD_JUDGES:  # the reward adapter joins the stack: still one copy of the base
        rm = load_run_reward_model(stack, recipe, st.stage.command, recipe_arg)
    n_todo = sum(len(shards[k]) for k in todo)
    with progress(enabled=get_dist().main) as p:
        gen = p.add_task(f"sample iter {iteration}", total=n_todo, info=f"{len(shards) - len(todo)} shards done before")
        jud = p.add_task(f"judge iter {iteration} ({c.judge})", total=n_todo, info="")
        for k in todo:
            seed = recipe.seed * 1_000_003 + iteration * 10_007 + k * 101
            res = expand_shard(stack, recipe, shards[k], seed, on_gen=lambda n: p.advance(gen, n),
                               on_judge=lambda n: p.advance(jud, n), sample_fn=sample_fn, reward_model=rm)
            p.advance(jud, len(shards[k]) - len(res["rows"]))
            atomic_write_json(st.dir / "shards" / f"{k:05d}.json", {"shard": k, **res})


def _collect(st: StageRun, n_shards: int, pool_dropped: dict) -> dict:
    """Join the shards into D_i (data.jsonl, written by the main process) and return expand's summary."""
    rows, counts, checks, dtypes = [], {}, [], set()
    for k in range(n_shards):
        sh = read_json(st.dir / "shards" / f"{k:05d}.json")
        rows += sh["rows"]
        dtypes.add(sh.get("sample_dtype", "model"))
        for key, v in sh["counts"].items():
            counts[key] = counts.get(key, 0) + v
        if "sampler_logps" in sh:
            checks.append(sh["sampler_logps"])
    judged = rows  # the lean signs read the judge's own labels, before length_balance evens them
    if st.recipe.expand.length_balance:  # on the whole D_i, so a resumed or resharded run keeps the same pairs
        rows, counts["length_balance_dropped"] = length_balance(rows)
    main = get_dist().main
    if main:  # TRL's conversational preference format: DPOTrainer reads D_i as it is
        atomic_write_jsonl(st.dir / "data.jsonl", [to_trl_conversational(r) for r in rows])
    summary = summarize_pairs(rows, counts)
    summary["label_signs"] = d_label_signs(st.recipe, judged, _mean_tokens(st, summary))
    if main:
        warn_signs(summary["label_signs"], f"expand --iter {st.stage.iteration}")
    summary["sample_dtype"] = sorted(dtypes)
    summary["pool_dropped"] = pool_dropped
    if checks:  # how far the sampling pass's log-probs were from a forward pass on each shard's first batch
        summary["sampler_logps"] = {"shards_reused": sum(bool(x["reused"]) for x in checks), "shards": len(checks),
                                    "max_abs_dev": max(x["max_abs_dev"] for x in checks),
                                    "checked_sequences": sum(x["checked"] for x in checks),
                                    "per_token": any(x.get("per_token") for x in checks)}
    return summary


def reward_tokens(tokenizer, y, cut_eos: bool) -> list[int]:
    """The response tokens the reward adapter scores: as sampled, or (``expand.reward_cut_eos``) with the
    end-of-turn token appended when the response was cut at max_new_tokens, as ``spa_lite.logps.encode_response``
    ends every response the adapter was trained on."""
    return list(y.token_ids) + [tokenizer.eos_token_id] if cut_eos and y.truncated else list(y.token_ids)


def length_balance(rows: list[dict]) -> tuple[list[dict], int]:
    """``expand.length_balance``: D_i's rows with its labels' length direction removed, and how many were dropped.

    Rows whose chosen response has more tokens than the rejected one and rows with fewer are made equal in number by
    dropping the least confident rows of the larger side (ties: the later row first); rows of equal length are
    kept and count for neither. Order is kept. Made for a judge whose labels lean to one length (per-token Eq. 7
    chose the shorter answer in 64-70% of its own policy's pairs, and iterating on that collapsed the answers). It
    evens the count only: on the demo the chosen-shorter pairs had twice the length gap of the chosen-longer ones,
    the balanced D_i still chose answers 8 tokens shorter on average, and SPA collapsed as before
    (bench/RESULTS.md, "Noisy oracles", spa_best_lb).
    """
    longer = [i for i, r in enumerate(rows) if r["len_chosen"] > r["len_rejected"]]
    shorter = [i for i, r in enumerate(rows) if r["len_chosen"] < r["len_rejected"]]
    big, small = (longer, shorter) if len(longer) > len(shorter) else (shorter, longer)
    excess = len(big) - len(small)
    drop = set(sorted(big, key=lambda i: (rows[i]["confidence"], -i))[:excess])
    return [r for i, r in enumerate(rows) if i not in drop], excess


def _mean_tokens(st: StageRun, summary: dict) -> tuple[float, float] | None:
    """(D_{i-1}, D_i) mean sampled tokens per response, from iteration 2 on (the label sign ``length_drop``)."""
    prev = read_manifest(st.recipe, Stage("expand", st.stage.iteration - 1)) if st.stage.iteration > 1 else None
    prev = (prev or {}).get("summary") or {}
    if not prev.get("samples") or not summary.get("samples"):
        return None
    return prev["sampled_tokens"] / prev["samples"], summary["sampled_tokens"] / summary["samples"]


def d_label_signs(recipe: Recipe, rows: list[dict], mean_tokens: tuple[float, float] | None = None) -> list[dict]:
    """Verifier-free signs of poor self-labels in the judged pairs (spa_lite/label_signs.py), against the gold
    pairs D0; with ``expand.length_balance`` the rows are the judged ones before it (the judge's own labels)."""
    if recipe.expand.judge == "verifier" or not rows:
        return []
    gold = shuffled(load_pairs(recipe.data.seed_pairs, recipe.data.format), recipe.data.shuffle_seed)
    gold = [pair_texts(r) for r in gold[: recipe.data.seed_limit or len(gold)]]
    probs = [(r["p_logprob"], r["p_reward"]) for r in rows if "p_logprob" in r and "p_reward" in r]
    cut = [(bool(r["truncated_chosen"]), bool(r["truncated_rejected"])) for r in rows
           if "truncated_chosen" in r and "truncated_rejected" in r]
    return label_signs([(r["chosen"], r["rejected"]) for r in rows], [(g["chosen"], g["rejected"]) for g in gold],
                       probs if len(probs) == len(rows) else (), mean_tokens, balanced=recipe.expand.length_balance,
                       cut=cut if len(cut) == len(rows) else ())


def summarize_pairs(rows: list[dict], counts: dict) -> dict:
    def mean(xs):
        return round(statistics.fmean(xs), 4) if xs else None

    return {
        "pairs": len(rows),
        **counts,
        "mean_confidence": mean([r["confidence"] for r in rows]),
        "frac_chosen_is_y1": mean([float(r["chosen_is_y1"]) for r in rows]),
        "mean_len_chosen": mean([r["len_chosen"] for r in rows]),
        "mean_len_rejected": mean([r["len_rejected"] for r in rows]),
        "frac_chosen_longer": mean([float(r["len_chosen"] > r["len_rejected"]) for r in rows]),
        "confidence_hist": confidence_histogram([r["confidence"] for r in rows]),
    }

