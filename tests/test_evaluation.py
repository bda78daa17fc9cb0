"""Eval-stage math: the fused (hidden-state) and logits paths agree, judge accuracy counts swapped
presentations correctly, and self-labelling noise is counted as defined."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import margin_bound

from spa_lite import evaluation, logps
from spa_lite.layout import policy_names
from spa_lite.logps import tokenize_pair
from spa_lite.models import load_base_model
from spa_lite.stack import build_stack


@pytest.fixture(scope="module")
def stack(tiny_model_dir):
    torch.manual_seed(0)
    base, tok = load_base_model(str(tiny_model_dir), "none", "float32", "cpu")
    st = build_stack(base, tok, (), trainable="seed")
    with torch.no_grad():
        for n, p in st.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # make pi_0 differ from pi_init
    return st


def _pairs(tok, n=6):
    rows = [({"role": "user", "content": f"Question {i}?"}, f"Good answer {i}.", f"bad {i} lol") for i in range(n)]
    return [tokenize_pair(tok, [m], c, r, {"prompt": [m], "chosen": c, "rejected": r}) for m, c, r in rows]


def test_fused_and_logits_paths_give_the_same_confidences(stack, monkeypatch):
    pairs = _pairs(stack.tokenizer)
    flipped = np.array([False, True, False, False, True, False])
    assert logps.fused_head(stack.model) is not None
    fused = evaluation.pair_confidences(stack, pairs, ["seed"], [], [0.5, 0.25], 0.1, flipped)
    monkeypatch.setattr(logps, "fused_head", lambda model: None)
    plain = evaluation.pair_confidences(stack, pairs, ["seed"], [], [0.5, 0.25], 0.1, flipped)
    with torch.no_grad():
        batch = logps.collate_pairs(pairs, stack.tokenizer.pad_token_id)
        scale = logps.forward_logits(stack.model, batch).abs().max()
    tokens = int(batch["loss_mask"].sum(1).max())
    tol = margin_bound(stack.model, scale, tokens, beta=0.1, lam=0.5) / 4  # sigmoid's slope is at most 1/4
    for k in plain:
        np.testing.assert_allclose(fused[k], plain[k], rtol=0, atol=tol)
    # a flipped label turns the confidence c into 1 - c
    unflipped = evaluation.pair_confidences(stack, pairs, ["seed"], [], [0.5], 0.1, None)
    np.testing.assert_allclose(fused["eq9"][flipped], 1 - unflipped["eq9"][flipped], rtol=1e-5)


def test_judge_accuracy_is_invariant_to_presentation_order(stack):
    """Accuracy counts p > 0.5 for the gold-chosen response whichever slot it was shown in: with the
    no-reference judge and a length-biased toy pair set, recompute it by hand from response_logps."""
    from spa_lite.judge import response_logps

    pairs = _pairs(stack.tokenizer)
    acc = evaluation.judge_accuracy(stack, pairs, 0, ["none"])["none"]
    lp_c = response_logps(stack, ["seed"], [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs])
    lp_r = response_logps(stack, ["seed"], [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs])
    expected = float((lp_c > lp_r).float().mean())
    assert acc["n"] == len(pairs) and acc["accuracy"] == pytest.approx(expected)


def test_self_label_noise_counts():
    verify = lambda text, c: "ok" in text  # noqa: E731
    rows = [{"chosen": "ok", "rejected": "no", "constraint": {}},  # confirmed
            {"chosen": "no", "rejected": "ok", "constraint": {}},  # contradicted
            {"chosen": "ok", "rejected": "ok", "constraint": {}},  # undetermined
            {"chosen": "no", "rejected": "ok!", "constraint": {}}]  # contradicted
    flags = [{"row": 1, "flagged": True}, {"row": 0, "flagged": False}, {"row": 3, "flagged": False}]
    out = evaluation.self_label_noise(rows, verify, flags)
    assert (out["confirmed"], out["contradicted"], out["undetermined"]) == (1, 2, 1)
    assert out["contradicted_frac_of_decided"] == pytest.approx(2 / 3)
    assert out["flagged_pairs"] == 1 and out["contradicted_rate_flagged"] == 1.0
    assert out["contradicted_rate_unflagged"] == pytest.approx(1 / 2)  # rows 0 (confirmed) and 3 (contradicted)


def test_response_outcomes_restore_prompt_order(stack):
    """Length-sorted batching returns outcomes in the records' order: greedy responses one by one in file order
    give the same lengths and verdicts."""
    from spa_lite.generation import sample_responses

    words = ["a", "b c d e f g", "h i", "j k l m n o p q r s", "t"]
    records = [{"id": f"r{i}", "prompt": [{"role": "user", "content": w}], "constraint": {}} for i, w in enumerate(words)]
    verify = lambda text, c: len(text) % 2 == 0  # noqa: E731 - any deterministic function of the text
    rows = evaluation.response_outcomes(stack, records, 0, verify, temperature=0.0, max_new_tokens=6, batch_size=1)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    with stack.use(policy_names(0)) as m:
        ref = [sample_responses(m, stack.tokenizer, [r["prompt"]], num_samples=1, max_new_tokens=6, temperature=0.0,
                                batch_size=1)[0][0] for r in records]
    assert [r["tokens"] for r in rows] == [s.num_tokens for s in ref]
    assert [r["passed"] for r in rows] == [verify(s.text, {}) for s in ref]
    assert [r["truncated"] for r in rows] == [s.truncated for s in ref]
    summ = evaluation.summarize_outcomes(rows)
    assert summ["n"] == 5 and summ["pass_rate"] == pytest.approx(np.mean([r["passed"] for r in rows]))
    assert summ["truncated_rate"] == pytest.approx(np.mean([s.truncated for s in ref]))


def test_verifier_judge_labels_decided_pairs_and_drops_the_rest():
    """The oracle-label control: the verifier's verdict orders a pair it separates; undecided pairs are dropped."""
    from spa_lite.errors import DataError
    from spa_lite.generation import Sample
    from spa_lite.stages.expand import verifier_judge

    c = {"kind": "include_word", "params": {"word": "cat"}}
    s = lambda t: Sample(t, [1], 1, False)  # noqa: E731
    keep = [({"id": "a", "constraint": c}, s("a cat"), s("a dog")),   # y1 passes
            ({"id": "b", "constraint": c}, s("a dog"), s("the cat")),  # y2 passes
            ({"id": "c", "constraint": c}, s("cat"), s("cat!")),       # both pass
            ({"id": "d", "constraint": c}, s("dog"), s("bird"))]       # neither
    counts = {"undecided": 0}
    kept, judged = verifier_judge(keep, counts)
    assert [r["id"] for r, _, _ in kept] == ["a", "b"]
    assert [j["p"] for j in judged] == [1.0, 0.0]
    assert counts["undecided"] == 2
    with pytest.raises(DataError, match="constraint"):
        verifier_judge([({"id": "x"}, s("a"), s("b"))], {"undecided": 0})


def test_noisy_verifier_flips_decided_labels_at_its_rate_and_per_prompt():
    """expand.verifier_accuracy: a decided pair's label is flipped with probability 1 - accuracy, by a draw tied to
    (seed, prompt id) alone: the same pairs flip in any order or shard split, undecided pairs are still dropped, and
    the flip rate over many prompts is within a binomial bound of 1 - accuracy."""
    from spa_lite.generation import Sample
    from spa_lite.stages.expand import verifier_judge

    c = {"kind": "include_word", "params": {"word": "cat"}}
    s = lambda t: Sample(t, [1], 1, False)  # noqa: E731
    n = 2000
    keep = [({"id": f"q{i}", "constraint": c}, s("a cat"), s("a dog")) for i in range(n)]  # y1 passes every time
    keep.append(({"id": "both", "constraint": c}, s("cat"), s("cat!")))
    counts = {"undecided": 0}
    kept, judged = verifier_judge(keep, counts, accuracy=0.7, seed=42)
    assert counts["undecided"] == 1 and len(kept) == n
    flipped = [j["p"] == 0.0 for j in judged]
    assert counts["flipped"] == sum(flipped)
    # 1 - accuracy = 0.3; sd of the count is sqrt(n * 0.3 * 0.7) ~ 20.5: 5 sd either side
    assert abs(sum(flipped) - 0.3 * n) < 5 * (n * 0.3 * 0.7) ** 0.5
    # the same prompts in reverse order and split in two shards flip the same way
    back: dict = {}
    for part in (keep[: n // 2][::-1], keep[n // 2 :]):
        k2, j2 = verifier_judge(part, {"undecided": 0}, accuracy=0.7, seed=42)
        back.update({r["id"]: j["p"] for (r, _, _), j in zip(k2, j2)})
    assert [back[r["id"]] for r, _, _ in kept] == [j["p"] for j in judged]
    # another seed draws other flips; accuracy 1 flips nothing
    _, j3 = verifier_judge(keep, {"undecided": 0}, accuracy=0.7, seed=43)
    assert [j["p"] for j in j3] != [j["p"] for j in judged]
    c1 = {"undecided": 0}
    _, j4 = verifier_judge(keep, c1, accuracy=1.0, seed=42)
    assert all(j["p"] == 1.0 for j in j4) and "flipped" not in c1


def test_verifier_coin_keeps_undecided_pairs_with_a_fair_seeded_coin_and_leaves_decided_ones_alone():
    """expand.verifier_undecided: coin: undecided pairs are kept with a label drawn per (seed, prompt id), half each
    way within a binomial bound and with no lean to the shorter or longer response; decided pairs keep the
    verifier's label; the same prompts in another order or shard split get the same coins."""
    import random

    from spa_lite.config import load_recipe
    from spa_lite.errors import SpaError
    from spa_lite.generation import Sample
    from spa_lite.stages.expand import verifier_judge

    c = {"kind": "include_word", "params": {"word": "cat"}}
    n = 2000
    # undecided pairs (neither passes); y1 the longer in even ids
    und = [({"id": f"u{i}", "constraint": c}, Sample("dog " * (3 if i % 2 == 0 else 1), [1] * (3 if i % 2 == 0 else 1),
                                                     3 if i % 2 == 0 else 1, False),
            Sample("bird " * (1 if i % 2 == 0 else 3), [1] * (1 if i % 2 == 0 else 3), 1 if i % 2 == 0 else 3, False))
           for i in range(n)]
    dec = [({"id": "d", "constraint": c}, Sample("dog", [1], 1, False), Sample("a cat", [1], 1, False))]
    keep = dec + und
    counts = {"undecided": 0, "undecided_coin": 0}
    kept, judged = verifier_judge(keep, counts, seed=42, undecided="coin")
    assert len(kept) == n + 1 and counts == {"undecided": n, "undecided_coin": n}
    assert judged[0]["p"] == 0.0  # the decided pair: y2 passes
    ones = [j["p"] == 1.0 for j in judged[1:]]
    assert all(j["p"] in (0.0, 1.0) for j in judged)
    # independent recomputation of the coins, and a fair count (sd sqrt(n / 4) ~ 22: 5 sd)
    assert ones == [random.Random(f"verifier-coin/42/u{i}").random() < 0.5 for i in range(n)]
    assert abs(sum(ones) - n / 2) < 5 * (n / 4) ** 0.5
    longer_chosen = [o == (i % 2 == 0) for i, o in enumerate(ones)]
    assert abs(sum(longer_chosen) - n / 2) < 5 * (n / 4) ** 0.5
    back: dict = {}
    for part in (keep[: n // 2][::-1], keep[n // 2 :]):
        k2, j2 = verifier_judge(part, {"undecided": 0, "undecided_coin": 0}, seed=42, undecided="coin")
        back.update({r["id"]: j["p"] for (r, _, _), j in zip(k2, j2)})
    assert [back[r["id"]] for r, _, _ in kept] == [j["p"] for j in judged]
    # the default drops them, as before
    assert len(verifier_judge(keep, {"undecided": 0}, seed=42)[0]) == 1
    with pytest.raises(SpaError, match="expand.verifier_undecided"):
        load_recipe("smollm2-demo", {"expand.verifier_undecided": "coin"})


def test_noisy_verifier_shorter_flips_only_pairs_whose_right_answer_is_longer():
    """verifier_flip: shorter: a pair is flipped only when its passing response has more tokens, at rate
    2 (1 - accuracy), so every wrong label prefers the shorter answer; the random flips of the same seed are a
    subset of the same draws (u >= 1 - rate), so the shorter mode's flips are exactly predictable from them."""
    import random

    from spa_lite.generation import Sample
    from spa_lite.stages.expand import verifier_judge

    c = {"kind": "include_word", "params": {"word": "cat"}}
    n = 2000
    # even ids: the passing response is the longer (3 tokens vs 1); odd ids: the shorter
    keep = [({"id": f"q{i}", "constraint": c},
             Sample("a cat", [1, 2, 3] if i % 2 == 0 else [1], 3 if i % 2 == 0 else 1, False),
             Sample("a dog", [1] if i % 2 == 0 else [1, 2, 3], 1 if i % 2 == 0 else 3, False)) for i in range(n)]
    counts = {"undecided": 0}
    _, judged = verifier_judge(keep, counts, accuracy=0.8, seed=7, flip="shorter")
    wrong = [i for i, j in enumerate(judged) if j["p"] == 0.0]  # y1 passes: p = 0 is a flipped label
    assert all(i % 2 == 0 for i in wrong)  # every error chose the shorter response
    u = [random.Random(f"verifier-flip/7/q{i}").random() for i in range(n)]
    assert wrong == [i for i in range(n) if i % 2 == 0 and u[i] >= 1 - 2 * 0.2]  # independent recomputation
    assert counts["flipped"] == len(wrong)
    assert abs(len(wrong) - 0.4 * n / 2) < 5 * (n / 2 * 0.4 * 0.6) ** 0.5  # 2 (1 - a) of the eligible half
    _, rnd = verifier_judge(keep, {"undecided": 0}, accuracy=0.8, seed=7)
    assert [i for i, j in enumerate(rnd) if j["p"] == 0.0] == [i for i in range(n) if u[i] >= 0.8]


def test_verifier_decided_turns_only_decided_labels_and_keeps_confidence():
    """expand.verifier_decided: a decided pair the judge got wrong is turned to the verifier's side with the same
    confidence; decided pairs it got right and undecided pairs keep the judge's p; counts say how many."""
    from spa_lite.generation import Sample
    from spa_lite.stages.expand import _row, verifier_correct

    c = {"kind": "include_word", "params": {"word": "cat"}}
    s = lambda t: Sample(t, [1], 1, False)  # noqa: E731
    keep = [({"id": "a", "constraint": c}, s("a cat"), s("a dog")),    # y1 passes; judge says y2 (wrong)
            ({"id": "b", "constraint": c}, s("a dog"), s("the cat")),  # y2 passes; judge says y2 (right)
            ({"id": "c", "constraint": c}, s("cat"), s("cat!")),       # undecided; judge says y2
            ({"id": "d", "constraint": c}, s("dog"), s("bird"))]       # undecided; judge says y1
    judged = [{"p": 0.3, "logratio_1": -1.0, "logratio_2": 1.0}, {"p": 0.45}, {"p": 0.2}, {"p": 0.6}]
    counts: dict = {}
    out = verifier_correct(keep, judged, counts)
    assert [j["p"] for j in out] == pytest.approx([0.7, 0.45, 0.2, 0.6])
    assert [j["p_judge"] for j in out] == [0.3, 0.45, 0.2, 0.6]
    assert counts == {"verifier_decided": 2, "verifier_corrected": 1}
    row = _row(keep[0][0], keep[0][1], keep[0][2], out[0])
    assert row["chosen"] == "a cat" and row["confidence"] == pytest.approx(0.7) and row["p_judge"] == 0.3
    assert row["logratio_chosen"] == -1.0  # the scores stay the judge's, attached to their responses


def test_verifier_accuracy_needs_the_verifier_judge(tiny_recipe):
    from spa_lite.config import validate

    base = tiny_recipe()
    bad = replace(base, expand=replace(base.expand, verifier_accuracy=0.8))
    assert any("expand.verifier_accuracy" in p for p in validate(bad))
    ok = replace(bad, expand=replace(bad.expand, judge="verifier"))
    assert not any("verifier_accuracy" in p for p in validate(ok))
    hybrid = replace(base, expand=replace(base.expand, verifier_decided=True))
    assert not any("verifier_decided" in p for p in validate(hybrid))
    assert any("expand.verifier_decided" in p for p in validate(replace(hybrid, expand=replace(
        hybrid.expand, judge="verifier"))))
    exact = replace(ok, expand=replace(ok.expand, verifier_accuracy=1.0, verifier_flip="shorter"))
    assert any("expand.verifier_flip" in p for p in validate(exact))
    assert not any("verifier_flip" in p for p in validate(replace(exact, expand=replace(exact.expand,
                                                                                         verifier_accuracy=0.75))))


def test_eval_stage_greedy_pass_rates_are_cached_and_paired(tiny_recipe):
    """`eval` decodes each policy once per adapter and settings: a second eval reads every policy from the
    cache and reports the same numbers; a changed adapter is decoded again. Differences are paired."""
    from spa_lite.options import EvalOptions
    from spa_lite.stages import evaluate, seed_dpo

    r = tiny_recipe(**{"data.prompts": "demo:prompts", "data.eval_prompts": "demo:eval_prompts",
                       "expand.max_new_tokens": 4, "seed_dpo.epochs": 1})
    seed_dpo.run(r)
    opts = EvalOptions(methods=["init"], flip=0.0, prompt_limit=6, tag="t")
    first = evaluate.run(r, opts)
    assert set(first["pass_rate"]) == {"pi_init", "pi_0"} and first["pass_rate_settings"]["cached"] == []
    assert first["pass_rate"]["pi_0"]["n"] == 6 and 0 <= first["pass_rate"]["pi_0"]["truncated_rate"] <= 1
    (d,) = first["pass_rate_diff"]
    assert (d["a"], d["b"], d["n"]) == ("pi_0", "pi_init", 6)
    assert d["diff"] == pytest.approx(first["pass_rate"]["pi_0"]["pass_rate"] - first["pass_rate"]["pi_init"]["pass_rate"])
    second = evaluate.run(r, opts)
    assert second["pass_rate_settings"]["cached"] == ["pi_init", "pi_0"]
    assert second["pass_rate"] == first["pass_rate"]
    r2 = tiny_recipe(**{"data.prompts": "demo:prompts", "data.eval_prompts": "demo:eval_prompts",
                        "expand.max_new_tokens": 4, "seed_dpo.epochs": 1, "seed_dpo.lr": 1e-2})
    seed_dpo.run(r2, force=True)  # another pi_0 in the same run: its outcomes are decoded again
    r = r2
    third = evaluate.run(r, opts)
    assert third["pass_rate_settings"]["cached"] == ["pi_init"]
