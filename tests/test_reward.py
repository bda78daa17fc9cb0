"""The Bradley-Terry reward adapter (spa_lite.reward, `spa-lite reward`, expand.judge: reward) against
independent computations: transformers' LlamaForSequenceClassification with the saved adapter merged into its
weights and the saved head as its ``score`` layer, scored one unpadded sequence at a time, and TRL's
RewardTrainer.compute_loss on its rewards."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_overrides
from safetensors.torch import load_file
from test_math import LORA, PROMPTS, TOL, Y1, Y2, _make_adapter, _merged, _naive_logp, _plain_base, adapters  # noqa: F401

from spa_lite.config import load_recipe
from spa_lite.generation import encode_prompt, sample_responses
from spa_lite.logps import collate_pairs, tokenize_pair
from spa_lite.models import count_base_weight_copies, load_base_model
from spa_lite.reward import (
    REWARD_ADAPTER,
    RewardModel,
    RewardSpec,
    bt_loss,
    load_reward_model,
    new_head,
    run_reward_loop,
    sequence_rewards,
)
from spa_lite.stack import build_stack

QUESTIONS = [{"id": f"q{i}", "prompt": [{"role": "user", "content": q}]} for i, q in enumerate(PROMPTS + ["Give a tip."])]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _seqcls(model_dir, adapter_dir, head_weight: torch.Tensor):
    """The reward model built without spa_lite: a sequence-classification Llama (num_labels 1), the adapter
    merged into its weights by peft, the head copied into ``score``."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    cfg.task_type = None  # saved for a causal LM: as a plain adapter, its LoRA layers merge into any head's model
    m = PeftModel.from_pretrained(m, str(adapter_dir), config=cfg).merge_and_unload()
    with torch.no_grad():
        m.score.weight.copy_(head_weight)
    return m.eval()


def _naive_reward(m, prompt: list[int], response: list[int]) -> float:
    with torch.no_grad():
        return m(input_ids=torch.tensor([prompt + response])).logits[0, 0].item()


def _pairs(tok):
    return [tokenize_pair(tok, [{"role": "user", "content": q}], a, b) for q, a, b in zip(PROMPTS, Y1, Y2)]


@pytest.fixture(scope="module")
def reward_adapter(tiny_model_dir, tmp_path_factory):
    """A reward adapter with random non-zero LoRA weights, and a random head."""
    d = _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("rm") / "adapter", REWARD_ADAPTER, 5)
    return d, torch.randn(1, 64, generator=torch.Generator().manual_seed(9)) * 0.5


def test_rewards_and_loss_match_sequence_classification_and_trl(tiny_model_dir, reward_adapter):
    from trl import RewardTrainer

    adir, w = reward_adapter
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    stack = build_stack(base, tok, [(REWARD_ADAPTER, adir)])
    head = torch.nn.Linear(64, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    rm = RewardModel(stack, head)
    pairs = _pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)  # right-padded: rows of different lengths
    assert batch["attention_mask"].sum(-1).unique().numel() > 1
    with torch.no_grad():
        ours = sequence_rewards(rm, batch)
    ref = _seqcls(tiny_model_dir, adir, w)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    naive = torch.tensor([_naive_reward(ref, x, y) for x, y in seqs])
    assert naive.std() > 0.05  # the adapter and head make rewards differ, so the comparison can fail
    torch.testing.assert_close(ours, naive, atol=TOL, rtol=1e-5)
    # TRL's RewardTrainer.compute_loss on the sequence-classification model and the same padded batch
    n = len(pairs)
    for coef in (None, 0.01):
        fake = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=coef),
                               accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x),
                               _metrics={"eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            trl_loss = RewardTrainer.compute_loss(fake, ref, inputs).item()
            loss = bt_loss(ours[:n], ours[n:], coef or 0.0).item()
        assert loss == pytest.approx(trl_loss, abs=TOL)
        assert abs(trl_loss - math.log(2)) > 1e-3
        # and the formula by hand: mean(-log sigmoid(d)) + c * mean((r_c + r_r)^2)
        d, s = naive[:n] - naive[n:], naive[:n] + naive[n:]
        by_hand = sum(-math.log(_sigmoid(v)) for v in d.tolist()) / n + (coef or 0.0) * float((s ** 2).mean())
        assert loss == pytest.approx(by_hand, abs=TOL)


def test_training_moves_the_adapter_and_head_not_the_base(tiny_model_dir, tmp_path):
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    torch.manual_seed(0)
    stack = build_stack(base, tok, trainable=REWARD_ADAPTER, lora=LORA)
    rm = RewardModel(stack, new_head(64, seed=1))
    before = {n: p.detach().clone() for n, p in stack.model.named_parameters()}
    head0 = rm.head.weight.detach().clone()
    pairs = _pairs(tok)
    spec = RewardSpec(lr=5e-3, epochs=4, batch_size=2, grad_accum=1, seed=0, warmup_ratio=0.0, save_every=100)
    s = run_reward_loop(rm, pairs, spec, tmp_path / "rm")
    assert s["steps"] == 8 and s["last10"]["loss"] < s["first_loss"]
    moved = {n for n, p in stack.model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if "lora_" in n and f".{REWARD_ADAPTER}." in n}
    assert moved == lora and any("lora_B" in n for n in moved)
    assert not torch.equal(rm.head.weight, head0)


def _recipe(tiny_model_dir, tiny_data, runs, name, **extra):
    settings = {"reward.batch_size": 2, "reward.grad_accum": 1, "reward.lr": 5e-3, "reward.epochs": 2,
                "reward.save_every": 2, "reward.holdout": 0.25, "expand.judge": "reward", **extra}
    return load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, runs, name=name, **settings))


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, tiny_data, tmp_path_factory):
    from spa_lite.stages import reward

    runs = tmp_path_factory.mktemp("reward") / "runs"
    r = _recipe(tiny_model_dir, tiny_data, runs, "whole")
    return r, reward.run(r)


def test_reward_stage_writes_adapter_head_and_heldout_accuracy(reward_run):
    r, m = reward_run
    d = r.run_path / "reward"
    assert m["status"] == "complete" and (d / "adapter" / "adapter_model.safetensors").is_file()
    assert load_file(str(d / "head.safetensors"))["weight"].shape == (1, 64)
    s = m["summary"]
    # 12 gold pairs, a quarter held out (and not trained on), 2 epochs of 9 pairs in batches of 2
    assert s["pairs_used"] == 9 and s["steps"] == 10
    assert s["heldout"]["pairs"] == 3 and s["heldout"]["source"].startswith("holdout of")
    assert 0.0 <= s["heldout"]["accuracy"] <= 1.0
    assert set(m["identity"]) >= {"adapter", "head"}


def test_reward_stage_resumes_to_identical_weights(tiny_model_dir, tiny_data, reward_run):
    from spa_lite.stages import reward

    r_whole, m_whole = reward_run
    r = _recipe(tiny_model_dir, tiny_data, r_whole.run_path.parent, "killed")
    from inject import crash_at_step

    # killed at step 3, between checkpoints (save_every 2): the last checkpoint is step 2's
    with crash_at_step(reward, "run_reward_loop", 3), pytest.raises(KeyboardInterrupt, match="crash at step 3"):
        reward.run(r)
    d = r.run_path / "reward"
    assert json.loads((d / "checkpoint" / "state.json").read_text())["step"] == 2
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 3
    assert not (d / "adapter").exists() and not (d / "manifest.json").exists() and not (d / "LOCK").exists()
    torch.rand(3)  # other use of torch's RNG in between must not matter
    m = reward.run(r)
    assert m["summary"]["resumed_from"] == 2 and m["summary"]["steps"] == m_whole["summary"]["steps"]
    for f in ("adapter/adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(str(d / f)), load_file(str(r_whole.run_path / "reward" / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert m["summary"]["heldout"]["accuracy"] == m_whole["summary"]["heldout"]["accuracy"]


def test_expand_requires_the_reward_stage_and_its_files(tiny_model_dir, tiny_data, reward_run):
    from spa_lite.errors import InputChangedError, StageOrderError
    from spa_lite.layout import REWARD_STAGE, Stage
    from spa_lite.runs import require_stage, stage_hash

    r, _ = reward_run
    missing = _recipe(tiny_model_dir, tiny_data, r.run_path.parent, "no-reward")
    with pytest.raises(StageOrderError, match="run `spa-lite reward --recipe RECIPE` first"):
        require_stage(missing, REWARD_STAGE, "spa-lite expand --iter 1")
    require_stage(r, REWARD_STAGE, "spa-lite expand --iter 1")
    # D_i's hash follows the reward model's config with a reward judge, and ignores it otherwise
    other = _recipe(tiny_model_dir, tiny_data, r.run_path.parent, "whole", **{"reward.lr": 1e-3})
    assert stage_hash(other, Stage("expand", 1)) != stage_hash(r, Stage("expand", 1))
    lp = [_recipe(tiny_model_dir, tiny_data, r.run_path.parent, "whole", **{"expand.judge": "logprob", "reward.lr": x})
          for x in (1e-3, 2e-3)]
    assert stage_hash(lp[0], Stage("expand", 1)) == stage_hash(lp[1], Stage("expand", 1))
    head = r.run_path / "reward" / "head.safetensors"
    saved = head.read_bytes()
    try:
        head.write_bytes(saved[:-4] + b"\0\0\0\1")
        with pytest.raises(InputChangedError, match="head.safetensors differs"):
            require_stage(r, REWARD_STAGE, "spa-lite expand --iter 1")
    finally:
        head.write_bytes(saved)


def _ragged(fn, tok):
    """``fn`` with each prompt's k-th sample cut to 2k fewer tokens (at least one), so a pair's lengths differ (the
    tiny model almost never ends a response, so its samples all run to max_new_tokens)."""
    from spa_lite.generation import Sample

    def sample(*args, **kw):
        kw.pop("on_batch", None)
        out = []
        for ss in fn(*args, **kw):
            row = []
            for k, y in enumerate(ss):
                ids = y.token_ids[: max(1, len(y.token_ids) - 2 * k)]
                row.append(Sample(tok.decode(ids, skip_special_tokens=True), ids, len(ids), y.truncated))
            out.append(row)
        return out
    return sample


@pytest.mark.parametrize("judge,n,cut_eos,lp", [("reward", 2, False, 0.0), ("reward", 3, False, 0.0),
                                                ("logprob+reward", 2, False, 0.0), ("reward", 3, True, 0.0),
                                                ("logprob+reward", 2, True, 0.0), ("reward", 3, False, -0.7),
                                                ("reward", 2, True, 0.9), ("logprob+reward", 2, False, 0.5)])
def test_expand_labels_with_the_saved_reward_model(tiny_model_dir, tiny_data, adapters, reward_run, judge, n, cut_eos,
                                                   lp):
    """The rows' rewards and p against the reward model loaded separately as a sequence classifier; with
    expand.reward_cut_eos a response cut at max_new_tokens is scored with the end-of-turn token appended (the
    tiny model almost never ends a response, so most are cut); with expand.length_penalty a, judge reward ranks by
    r - a * sampled tokens."""
    from spa_lite.stages.expand import expand_shard

    r, _ = reward_run
    d = r.run_path / "reward"
    recipe = _recipe(tiny_model_dir, tiny_data, r.run_path.parent, "whole", **{
        "expand.judge": judge, "expand.num_samples": n, "expand.temperature": 1.5, "expand.max_new_tokens": 6,
        "expand.judge_logps": "forward", "expand.reward_cut_eos": cut_eos, "expand.length_penalty": lp})
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    stack = build_stack(base, tok, [("seed", adapters["seed"])])
    rm = load_reward_model(stack, d / "adapter", d / "head.safetensors")
    assert count_base_weight_copies(stack.model) == 1  # the reward adapter sits on the policies' base
    sample_fn = _ragged(sample_responses, tok) if lp else sample_responses
    res = expand_shard(stack, recipe, QUESTIONS, seed=5, reward_model=rm, sample_fn=sample_fn)
    c = recipe.expand
    # pi_0's samples drawn on a stack without the reward adapter: loading it changes no policy
    base2, _ = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    with build_stack(base2, tok, [("seed", adapters["seed"])]).use(["seed"]) as m:
        samples = sample_fn(m, tok, [q["prompt"] for q in QUESTIONS], num_samples=n,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=5,
                                   batch_size=c.batch_size)
    ref = _seqcls(tiny_model_dir, d / "adapter", load_file(str(d / "head.safetensors"))["weight"])
    pol, init = (_merged(tiny_model_dir, adapters["seed"]), _plain_base(tiny_model_dir)) if "logprob" in judge else (None, None)
    rows = {row["id"]: row for row in res["rows"]}
    cut = 0
    for q, ss in zip(QUESTIONS, samples):
        distinct = list({y.text: y for y in reversed(ss) if y.text}.values())[::-1]
        assert (q["id"] in rows) == (len(distinct) >= 2)
        if q["id"] not in rows:
            continue
        x = encode_prompt(tok, q["prompt"])
        rw = [_naive_reward(ref, x, y.token_ids + ([tok.eos_token_id] if cut_eos and y.truncated else []))
              - (lp * len(y.token_ids) if judge == "reward" else 0.0) for y in distinct]
        cut += sum(y.truncated for y in distinct)
        best, worst = max(range(len(rw)), key=rw.__getitem__), min(range(len(rw)), key=rw.__getitem__)
        if n == 2:
            best, worst = (0, 1) if rw[0] > rw[1] or judge != "reward" else (1, 0)
        row = rows[q["id"]]
        i, j = sorted((best, worst))  # y1, y2 in sampling order
        p = _sigmoid(rw[i] - rw[j])
        if judge == "logprob+reward":
            # the length penalty is Eq. 7's (its half of the mean), in log-ratio units; the reward half has none
            lr = [_naive_logp(pol, x, y.token_ids) - _naive_logp(init, x, y.token_ids) - lp * len(y.token_ids)
                  for y in distinct[:2]]
            p = 0.5 * (p + _sigmoid(c.beta * (lr[0] - lr[1])))
            assert row["p_reward"] == pytest.approx(_sigmoid(rw[0] - rw[1]), abs=1e-5)
            assert row["chosen"] == distinct[0 if p > 0.5 else 1].text
        else:
            assert (row["chosen"], row["rejected"]) == (distinct[best].text, distinct[worst].text)
            assert row["reward_chosen"] == pytest.approx(rw[best], abs=1e-4)
            assert row["reward_rejected"] == pytest.approx(rw[worst], abs=1e-4)
        assert row["p_y1"] == pytest.approx(p, abs=1e-5)
    assert len(rows) >= 3 and cut > 0  # the setting is exercised on cut responses
    if lp:  # the penalty is exercised: some prompt's candidates differ in length
        assert any(len({len(y.token_ids) for y in ss if y.text}) > 1 for ss in samples)


def test_cli_reward_command(tiny_model_dir, tiny_data, tmp_path):
    from conftest import invoke, ok, write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs",
                                                             **{"reward.epochs": 0.5, "reward.grad_accum": 1}))
    res = ok(invoke("reward", "--recipe", path, "--set", "reward.holdout=0.5"))
    assert "held-out accuracy" in res.output
    m = json.loads((tmp_path / "runs" / "tiny" / "reward" / "manifest.json").read_text())
    assert m["summary"]["heldout"]["pairs"] == 6 and m["recipe"]["reward"]["holdout"] == 0.5
    # the Python API runs the same stage: complete with this config, so it is not redone
    import spa_lite

    again = spa_lite.run_stage(spa_lite.load_recipe(path, {"reward.holdout": 0.5}), "reward")
    assert again["timings"] == m["timings"] and again["config_hash"] == m["config_hash"]


def test_expand_stage_with_the_reward_judge(tiny_model_dir, tiny_data, reward_run):
    """`spa-lite expand` with judge: reward: refused without the reward stage, then D_1 labelled by it, and its
    config hash carries the reward stage's."""
    import shutil

    from spa_lite.errors import StageOrderError
    from spa_lite.layout import REWARD_STAGE
    from spa_lite.runs import stage_hash
    from spa_lite.stages import expand, seed_dpo

    r, _ = reward_run
    seed_dpo.run(r)
    bare = _recipe(tiny_model_dir, tiny_data, r.run_path.parent, "seed-only")
    shutil.copytree(r.run_path / "seed", bare.run_path / "seed")
    with pytest.raises(StageOrderError, match="spa-lite expand --iter 1 needs .*reward.*run `spa-lite reward"):
        expand.run(bare, 1)
    m = expand.run(r, 1)
    assert m["status"] == "complete" and m["config"]["reward"] == stage_hash(r, REWARD_STAGE)
    rows = [json.loads(x) for x in (r.run_path / "iter1/expand/data.jsonl").read_text().splitlines()]
    assert rows and m["summary"]["pairs"] == len(rows)
    shard = json.loads((r.run_path / "iter1/expand/shards/00000.json").read_text())
    for row in shard["rows"]:
        assert row["confidence"] == pytest.approx(_sigmoid(row["reward_chosen"] - row["reward_rejected"]), abs=1e-9)


def test_run_trains_the_reward_model_before_expand_only_when_the_judge_needs_it(tiny_recipe, monkeypatch):
    from spa_lite.stages import expand, pipeline, reward, seed_dpo, train

    monkeypatch.setattr(pipeline, "release_memory", lambda: None)  # no model is loaded: nothing to hand back
    for judge, want in (("reward", ["seed", "reward", "iter1/expand", "iter1/train"]),
                        ("logprob+reward", ["seed", "reward", "iter1/expand", "iter1/train"]),
                        ("logprob", ["seed", "iter1/expand", "iter1/train"])):
        order: list[str] = []
        for mod, key in ((seed_dpo, "seed"), (reward, "reward")):
            monkeypatch.setattr(mod, "run", lambda r, key=key, order=order, **kw: order.append(key) or {"status": "complete"})
        for mod, step in ((expand, "expand"), (train, "train")):
            monkeypatch.setattr(mod, "run", lambda r, i, step=step, order=order, **kw:
                                order.append(f"iter{i}/{step}") or {"status": "complete"})
        done = pipeline.run(tiny_recipe(iterations=1, **{"expand.judge": judge}))
        assert order == want == [k for k, _ in done]


def test_divergence_leaves_the_reward_stage_incomplete(tiny_recipe):
    from spa_lite.errors import DivergedError
    from spa_lite.stages import reward

    r = tiny_recipe(**{"reward.lr": 1e6, "reward.epochs": 4, "reward.batch_size": 2, "reward.grad_accum": 1,
                       "reward.warmup_ratio": 0.0})
    with pytest.raises(DivergedError, match="reward model diverged.*spa-lite reward --force"):
        reward.run(r)
    d = r.run_path / "reward"
    assert not (d / "manifest.json").exists() and not (d / "adapter").exists() and not (d / "head.safetensors").exists()


def test_reward_cut_eos_needs_a_reward_judge_and_changes_d_is_hash_only_when_on(tiny_model_dir, tiny_data, tmp_path):
    import dataclasses

    from spa_lite.errors import SpaError
    from spa_lite.layout import Stage
    from spa_lite.runs import stage_config, stage_hash

    with pytest.raises(SpaError, match="expand.reward_cut_eos"):
        _recipe(tiny_model_dir, tiny_data, tmp_path, "x", **{"expand.judge": "logprob", "expand.reward_cut_eos": True})
    with pytest.raises(SpaError, match="drop_truncated"):  # nothing cut is left to score
        _recipe(tiny_model_dir, tiny_data, tmp_path, "x", **{"expand.reward_cut_eos": True,
                                                             "expand.drop_truncated": True})
    off, on = (_recipe(tiny_model_dir, tiny_data, tmp_path, "x", **{"expand.reward_cut_eos": v}) for v in (False, True))
    assert stage_hash(on, Stage("expand", 1)) != stage_hash(off, Stage("expand", 1))
    # off, the key is left out of the stage config: runs made before the setting existed keep their hash
    assert "reward_cut_eos" not in stage_config(off, Stage("expand", 1))["expand"]
    assert stage_config(on, Stage("expand", 1))["expand"]["reward_cut_eos"] is True
    assert dataclasses.asdict(off.expand)["reward_cut_eos"] is False


def test_length_penalty_with_the_reward_judge_marks_d_is_config_so_runs_made_when_it_was_ignored_are_redone(
        tiny_model_dir, tiny_data, tmp_path):
    from spa_lite.layout import Stage
    from spa_lite.runs import stage_config

    def key(**kw):
        return stage_config(_recipe(tiny_model_dir, tiny_data, tmp_path, "x", **kw), Stage("expand", 1))["expand"]
    assert key(**{"expand.length_penalty": -0.01})["length_penalty_on_reward"] is True
    # unchanged where the penalty was always applied (Eq. 7) or is 0: those runs keep their hash
    assert "length_penalty_on_reward" not in key(**{"expand.length_penalty": 0.0})
    assert "length_penalty_on_reward" not in key(**{"expand.judge": "logprob", "expand.length_penalty": -0.01})


@pytest.mark.parametrize("judge", ["llm", "verifier"])
def test_length_penalty_is_refused_with_a_judge_that_scores_no_reward(tiny_model_dir, tiny_data, tmp_path, judge):
    from spa_lite.errors import SpaError

    with pytest.raises(SpaError, match=f"expand.length_penalty: -0.01 .*judge '{judge}' scores none"):
        _recipe(tiny_model_dir, tiny_data, tmp_path, "x", **{"expand.judge": judge, "expand.length_penalty": -0.01})
    _recipe(tiny_model_dir, tiny_data, tmp_path, "x", **{"expand.judge": judge})  # 0: accepted as before


def test_odin_terms_match_numpy():
    """ODIN's losses against numpy: |corrcoef(r_Q, L)| - corrcoef(r_L, L) and |cos| of the head rows."""
    import numpy as np

    from spa_lite.reward import odin_terms, pearson

    g = torch.Generator().manual_seed(3)
    r = torch.randn(8, 2, generator=g, dtype=torch.float64)
    lengths = torch.tensor([3, 9, 4, 12, 7, 7, 20, 1])
    w = torch.randn(2, 64, generator=g, dtype=torch.float64)
    length_loss, orth = odin_terms(r, lengths, w)
    L = lengths.numpy().astype(float)
    want = abs(np.corrcoef(r[:, 0].numpy(), L)[0, 1]) - np.corrcoef(r[:, 1].numpy(), L)[0, 1]
    assert float(length_loss) == pytest.approx(want, abs=1e-9)
    wn = w.numpy()
    assert float(orth) == pytest.approx(abs(wn[0] @ wn[1]) / (np.linalg.norm(wn[0]) * np.linalg.norm(wn[1])), abs=1e-9)
    assert float(pearson(torch.ones(4, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64))) == 0.0


def test_length_head_loss_is_bt_on_the_sum_plus_odin_terms_and_the_judge_reads_the_quality_head(tiny_model_dir,
                                                                                                reward_adapter, tmp_path):
    import numpy as np

    from spa_lite.reward import _micro_loss, reward_scores, save_head

    adir, w = reward_adapter
    base, tok = load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu")
    stack = build_stack(base, tok, [(REWARD_ADAPTER, adir)])
    w2 = torch.cat([w, torch.randn(1, 64, generator=torch.Generator().manual_seed(4)) * 0.5])
    head = torch.nn.Linear(64, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(w2)
    rm = RewardModel(stack, head)
    pairs = _pairs(tok)
    batch = collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        both = sequence_rewards(rm, batch, all_heads=True)
        assert torch.equal(sequence_rewards(rm, batch), both[:, 0])
    # each head is the plain reward model of that row (sequence classification with that score weight)
    for k in (0, 1):
        ref = _seqcls(tiny_model_dir, adir, w2[k : k + 1])
        seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        torch.testing.assert_close(both[:, k], torch.tensor([_naive_reward(ref, x, y) for x, y in seqs]),
                                   atol=TOL, rtol=1e-5)
    n = len(pairs)
    spec = RewardSpec(lr=1e-3, epochs=1, batch_size=n, grad_accum=1, seed=0, length_head=True)
    parts: dict = {}
    with torch.no_grad():
        loss, acc, margin = _micro_loss(rm, pairs, list(range(n)), spec, parts)
    r = both.double().numpy()
    s = r.sum(1)
    L = np.array([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs], dtype=float)
    bt = float(np.mean(np.log1p(np.exp(-(s[:n] - s[n:])))))
    corr = abs(np.corrcoef(r[:, 0], L)[0, 1]) - np.corrcoef(r[:, 1], L)[0, 1]
    cos = abs(w2[0] @ w2[1]).item() / (w2[0].norm() * w2[1].norm()).item()
    assert float(loss) == pytest.approx(bt + corr + cos, abs=1e-4)
    assert margin == pytest.approx(float(np.mean(s[:n] - s[n:])), abs=1e-4)
    # the logged parts: each term by itself, and the accuracy of the quality head that judging reads
    assert (parts["bt_loss"], parts["length_loss"], parts["orth"]) == pytest.approx((bt, corr, cos), abs=1e-4)
    assert parts["accuracy_quality"] == pytest.approx(float(np.mean(r[:n, 0] > r[n:, 0])))
    assert acc == pytest.approx(float(np.mean(s[:n] > s[n:])))
    # saved and loaded back: a two-row head, and the judge's scores are the quality head's
    save_head(head, tmp_path / "head.safetensors")
    stack2 = build_stack(*load_base_model(str(tiny_model_dir), quantization="none", dtype="float32", device="cpu"), [])
    loaded = load_reward_model(stack2, adir, tmp_path / "head.safetensors")
    assert loaded.head.weight.shape == (2, 64)
    got = reward_scores(loaded, [p.prompt_ids for p in pairs] * 2,
                        [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs])
    assert got == pytest.approx(r[:, 0].tolist(), abs=TOL)


def test_reward_stage_with_a_length_head(tiny_model_dir, tiny_data, tmp_path):
    """reward.length_head: the stage trains and saves a two-row head; off, a stage keeps its old hash."""
    from spa_lite.layout import REWARD_STAGE
    from spa_lite.runs import stage_config, stage_hash
    from spa_lite.stages import reward

    r = _recipe(tiny_model_dir, tiny_data, tmp_path / "runs", "odin", **{"reward.length_head": True})
    off = _recipe(tiny_model_dir, tiny_data, tmp_path / "runs", "odin")
    assert "length_head" not in stage_config(off, REWARD_STAGE)["reward"]
    assert stage_hash(off, REWARD_STAGE) != stage_hash(r, REWARD_STAGE)
    m = reward.run(r)
    assert m["status"] == "complete"
    assert load_file(str(r.run_path / "reward" / "head.safetensors"))["weight"].shape == (2, 64)
    rows = [json.loads(x) for x in (r.run_path / "reward" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == m["summary"]["steps"] and all(math.isfinite(x["loss"]) for x in rows)
    for x in rows:  # the loss's parts are logged, and add up to it (micro-batches of 2 pairs: 4 responses)
        assert x["loss"] == pytest.approx(x["bt_loss"] + x["length_loss"] + x["orth"], abs=1e-6)
        assert 0.0 <= x["accuracy_quality"] <= 1.0


def test_odin_length_term_sends_gradients_that_match_finite_differences(monkeypatch):
    """The length term must train the heads: its gradient in r is non-zero and equals central differences (the
    numpy test above checks only values); and judging scores without building a graph."""
    from spa_lite import reward as rmod

    g = torch.Generator().manual_seed(5)
    r = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 9, 4, 12, 7, 7, 20, 1])
    w = torch.randn(2, 16, generator=g, dtype=torch.float64, requires_grad=True)
    length_loss, orth = rmod.odin_terms(r, lengths, w)
    (length_loss + orth).backward()
    assert r.grad[:, 0].abs().sum() > 0 and r.grad[:, 1].abs().sum() > 0 and w.grad.abs().sum() > 0
    h = 1e-6
    for i, j in [(0, 0), (3, 1), (6, 1), (7, 0)]:
        up, dn = r.detach().clone(), r.detach().clone()
        up[i, j] += h
        dn[i, j] -= h
        fd = (sum(rmod.odin_terms(up, lengths, w.detach())) - sum(rmod.odin_terms(dn, lengths, w.detach()))) / (2 * h)
        assert float(r.grad[i, j]) == pytest.approx(float(fd), abs=1e-6)
    # fewer than three responses: no length term (a correlation of two points is +-1 whatever the heads)
    two, _ = rmod.odin_terms(r[:2].detach(), lengths[:2], w.detach())
    assert float(two) == 0.0
    # judging runs without autograd, even where the adapter is trainable
    seen = []
    monkeypatch.setattr(rmod, "sequence_rewards", lambda rm, batch: seen.append(torch.is_grad_enabled())
                        or torch.zeros(batch["input_ids"].shape[0]))
    fake = SimpleNamespace(stack=SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0),
                                                 model=SimpleNamespace(eval=lambda: None)))
    assert rmod.reward_scores(fake, [[1, 2]], [[3]]) == [0.0] and seen == [False]
