"""`spa-lite winrate`: one policy's responses against another's under a pairwise judge, with a 95% CI."""

from __future__ import annotations

from spa_lite import winrate as wr
from spa_lite.config import Recipe
from spa_lite.data import load_prompts
from spa_lite.errors import SpaError
from spa_lite.generation import sample_responses, sampling_dtype
from spa_lite.io import atomic_write_json
from spa_lite.layout import complete_policies, eval_dir, policy_label, policy_names, resolve_policy
from spa_lite.loading import load_stack
from spa_lite.stack import PolicyStack
from spa_lite.tasks import RecipeArgs, setup_logging
from spa_lite.ui import console, task

JUDGES = ("verifier", "local", "http")


def check_judge(judge: str, records: list[dict], url: str | None, model: str | None) -> None:
    """Refuse a judge that cannot run, before any response is sampled."""
    if judge not in JUDGES:
        raise SpaError(f"--judge '{judge}' is not verifier, local or http")
    if judge == "verifier" and not all("constraint" in x for x in records):
        raise SpaError("--judge verifier needs prompts with a 'constraint' (the demo task)")
    if judge == "http" and (not url or not model):
        raise SpaError("--judge http needs --judge-url and --judge-model")


def make_judge(judge: str, stack: PolicyStack, recipe: Recipe, url: str | None, model: str | None, key_env: str):
    """The pairwise judge ``--judge`` names; HTTP verdicts are cached under RUN/eval/winrate_cache."""
    if judge == "verifier":
        return wr.VerifierJudge()
    if judge == "local":
        return wr.LocalLLMJudge(stack, [])
    return wr.HTTPJudge(url, model, api_key_env=key_env, cache_dir=eval_dir(recipe) / "winrate_cache")


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


def run_winrate(args: RecipeArgs, *, policy: str, reference: str, judge: str, judge_url: str | None,
                judge_model: str | None, judge_key_env: str, prompts: str | None, limit: int) -> dict:
    """Sample both policies' responses, judge them and write RUN/eval/winrate_<cand>_vs_<ref>_<judge>.json."""
    setup_logging()
    r = args.load()
    ks = complete_policies(r)
    cand_k, ref_k = resolve_policy(r, policy), resolve_policy(r, reference)
    spec = prompts or r.data.eval_prompts
    if not spec:
        raise SpaError("no prompts: give --prompts or set data.eval_prompts in the recipe")
    recs = load_prompts(spec)[:limit]
    check_judge(judge, recs, judge_url, judge_model)
    stack = load_stack(r, frozen_upto=max(ks) if ks else -1)
    texts = [x["prompt"] for x in recs]
    with task("winrate: responses of both policies", 2 * len(recs)) as advance:
        outs = responses(stack, r, [cand_k, ref_k], texts, on_batch=advance)
    j = make_judge(judge, stack, r, judge_url, judge_model, judge_key_env)
    with task(f"winrate: {judge} judge", len(recs)) as advance:
        res = wr.win_rate_eval(outs[cand_k], outs[ref_k], texts, j,
                               metadata=[{"constraint": x.get("constraint")} for x in recs], on_batch=advance)
    cand, ref = policy_label(cand_k), policy_label(ref_k)
    atomic_write_json(eval_dir(r) / f"winrate_{cand}_vs_{ref}_{judge}.json",
                      {k: v for k, v in res.items() if k != "items"} | {"items": res["items"]})
    console.print(f"{cand} vs {ref} ({judge} judge, n={res['n']}): win rate {res['win_rate']:.3f} "
                  f"[{res['ci_low']:.2f}, {res['ci_high']:.2f}], wins {res['wins']}, ties {res['ties']}, "
                  f"losses {res['losses']}")
    return res
