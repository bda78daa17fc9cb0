"""The SPA math against independent computations.

Every expected value here is computed WITHOUT the code under test: separately loaded models (plain
transformers, peft adapters merged into the weights), unpadded one-sequence-at-a-time forward passes with an
explicit log_softmax + gather loop, TRL's own DPOTrainer, numpy.percentile and closed-form formulas.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

try:
    import spa_lite  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spa_lite.generation import encode_prompt
from spa_lite.judge import judge_logprob
from spa_lite.logps import TokenizedPair, collate_pairs, encode_response
from spa_lite.losses import ConfidenceWindow, lambda_for_iteration, refined_dpo_loss
from spa_lite.models import count_base_weight_copies, load_base_model
from spa_lite.stack import LoraSettings, PolicyStack, build_stack, save_adapter
from spa_lite.training import LoopSpec, pair_loss, run_dpo_loop

LORA = LoraSettings(r=4, alpha=8)
TOL = 1e-5

PROMPTS = ["How do I boil an egg?", "Name a fast animal.", "Why is the sky blue?"]
Y1 = ["Put it in boiling water for nine minutes.", "A cheetah.", "Rayleigh scattering of sunlight."]
Y2 = ["no idea", "Probably a snail, or maybe a very slow turtle on a lazy day.", "because"]


# ----------------------------------------------------------------------------------------------- helpers


def _plain_base(model_dir):
    """pi_init loaded independently of spa_lite.models: plain transformers, float32, eval."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    m.eval()
    return m


def _merged(model_dir, *adapter_dirs):
    """base + adapters, each merged into the weights one after the other (no multi-adapter activation)."""
    from peft import PeftModel

    m = _plain_base(model_dir)
    for d in adapter_dirs:
        m = PeftModel.from_pretrained(m, str(d)).merge_and_unload()
    m.eval()
    return m


def _randomize_lora(model, name: str, seed: int, scale: float = 0.3) -> None:
    """Give adapter ``name`` random non-zero A and B so that it changes the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _make_adapter(model_dir, out_dir, name: str, seed: int):
    from peft import get_peft_model

    base = _plain_base(model_dir)
    model = get_peft_model(base, LORA.to_peft(), adapter_name=name)
    _randomize_lora(model, name, seed)
    return save_adapter(model, name, out_dir)


def _naive_logp(model, prompt: list[int], response: list[int]) -> float:
    """sum_t log p(y_t | x, y_<t) from one unpadded forward pass, by an explicit loop over response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(response)):
        total += lp[t - 1, ids[0, t]].item()
    return total


def _naive_mixed_logp(pol, ref, prompt: list[int], response: list[int], lam: float) -> float:
    """Eq. 12 by hand: log_softmax((1 + lam) h_theta - lam h_ref), gathered and summed over response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        h_t = pol(input_ids=ids).logits[0].double()
        h_r = ref(input_ids=ids).logits[0].double()
    lp = torch.log_softmax((1 + lam) * h_t - lam * h_r, dim=-1)
    return sum(lp[t - 1, ids[0, t]].item() for t in range(len(prompt), len(prompt) + len(response)))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _tokenized(tok):
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in PROMPTS]
    y1 = [encode_response(tok, t) for t in Y1]
    y2 = [encode_response(tok, t) for t in Y2]
    return prompts, y1, y2


def _load(model_dir):
    return load_base_model(str(model_dir), quantization="none", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {"seed": _make_adapter(tiny_model_dir, d / "seed", "seed", 1),
            "iter1": _make_adapter(tiny_model_dir, d / "iter1", "iter1", 2)}


@pytest.fixture(scope="module")
def independent(tiny_model_dir, adapters):
    """pi_init, pi_0 and pi_1 as three separately loaded, merged models."""
    return {"init": _plain_base(tiny_model_dir),
            "seed": _merged(tiny_model_dir, adapters["seed"]),
            "seed+iter1": _merged(tiny_model_dir, adapters["seed"], adapters["iter1"])}


# ----------------------------------------------------------------------------------------------- 1. Eq. 7


def test_judge_logprob_matches_brute_force_eq7(tiny_model_dir, adapters, independent):
    base, tok = _load(tiny_model_dir)
    stack = build_stack(base, tok, [("seed", adapters["seed"]), ("iter1", adapters["iter1"])])
    prompts, y1, y2 = _tokenized(tok)
    assert any(len(a) != len(b) for a, b in zip(y1, y2))  # the length penalty must matter

    lp = {k: [(_naive_logp(m, p, a), _naive_logp(m, p, b)) for p, a, b in zip(prompts, y1, y2)]
          for k, m in independent.items()}
    # the adapters must matter, or the comparisons below could not tell the policies apart
    assert abs(lp["seed+iter1"][0][0] - lp["init"][0][0]) > 0.05
    assert abs(lp["seed+iter1"][0][0] - lp["seed"][0][0]) > 0.05

    beta = 0.1
    for ref_names, ref_key in (([], "init"), (None, None), (["seed"], "seed")):
        for a_pen in (0.0, 0.05):
            rows = judge_logprob(stack, ["seed", "iter1"], ref_names, prompts, y1, y2, beta=beta,
                                 length_penalty=a_pen, batch_size=2)  # 2 batches: 2 + 1 pairs
            assert len(rows) == len(prompts)
            for i, row in enumerate(rows):
                (p1, p2) = lp["seed+iter1"][i]
                (q1, q2) = lp[ref_key][i] if ref_key else (0.0, 0.0)
                r1, r2 = p1 - q1, p2 - q2
                z = beta * ((r1 - a_pen * len(y1[i])) - (r2 - a_pen * len(y2[i])))
                # sums of up to ~50 float32 token log-probs (|log p| up to ~300): float32 rounding alone is ~1e-7
                # relative, so the log-ratios get TOL plus 1e-6 of the magnitudes involved
                tol1 = TOL + 1e-6 * (abs(p1) + abs(q1))
                tol2 = TOL + 1e-6 * (abs(p2) + abs(q2))
                assert row["logratio_1"] == pytest.approx(r1, abs=tol1), (ref_names, i)
                assert row["logratio_2"] == pytest.approx(r2, abs=tol2), (ref_names, i)
                assert row["len_1"] == len(y1[i]) and row["len_2"] == len(y2[i])
                assert row["p"] == pytest.approx(_sigmoid(z), abs=TOL), (ref_names, a_pen, i)


# ----------------------------------------------------------------------------------------------- 2. TRL


def test_pair_loss_equals_trl_dpo_trainer_loss_and_grads(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    base, tok = _load(tiny_model_dir)
    ds = Dataset.from_dict({"prompt": [f"Question: {q}\nAnswer:" for q in PROMPTS],
                            "chosen": [" " + t for t in Y1], "rejected": [" " + t for t in Y2]})
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                     bf16=False, fp16=False, gradient_checkpointing=False, per_device_train_batch_size=3,
                     max_length=None, dataset_num_proc=None, save_strategy="no", logging_steps=1)
    trainer = DPOTrainer(model=base, args=args, train_dataset=ds, processing_class=tok, peft_config=LORA.to_peft())
    model = trainer.model
    _randomize_lora(model, "default", seed=3, scale=0.2)  # B = 0 would make every gradient but B's vanish
    stack = PolicyStack(model, tok, frozen=[], trainable="default")
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert params and set(map(id, params.values())) == set(map(id, stack.trainable_parameters()))

    examples = [trainer.train_dataset[i] for i in range(len(ds))]
    assert all(ex["chosen_ids"][-1] == tok.eos_token_id for ex in examples)  # TRL adds EOS, as encode_response does
    trl_batch = trainer.data_collator(examples)
    pairs = [TokenizedPair(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) for ex in examples]
    ours = collate_pairs(pairs, tok.pad_token_id)
    assert torch.equal(ours["input_ids"], trl_batch["input_ids"])
    assert torch.equal(ours["attention_mask"], trl_batch["attention_mask"])
    assert torch.equal(ours["loss_mask"].long(), trl_batch["completion_mask"].long())

    model.train()
    trl_loss = trainer.compute_loss(model, trl_batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.detach().clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)

    spec = LoopSpec(lr=1e-3, epochs=1, batch_size=3, grad_accum=1, beta=0.1, seed=0, ref=[])
    out = pair_loss(stack, ours, spec, window=None, refining=False)
    out.loss.backward()
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the randomized adapter moves the loss off log 2
    assert out.loss.item() == pytest.approx(trl_loss.item(), abs=TOL)
    assert not out.flagged.any()
    nonzero = 0
    for n, p in params.items():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, trl_grads[n], atol=TOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
        nonzero += int(trl_grads[n].abs().max() > 1e-6)
    assert nonzero > len(params) // 2


# ----------------------------------------------------------------------------------------------- 3. Eq. 10, DND


def test_refined_dpo_loss_explicit_formula():
    m = torch.tensor([-3.0, -0.5, 0.0, 0.7, 2.5, 6.0], dtype=torch.float64)
    z = torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool)
    alpha = 0.1
    got = refined_dpo_loss(m, z, alpha)
    for i in range(len(m)):
        s = 1.0 / (1.0 + math.exp(-m[i].item()))
        if z[i]:
            want = -((1 - alpha) * math.log(s) + alpha * math.log(1 - s))
        else:
            want = -math.log(s)
        assert got[i].item() == pytest.approx(want, abs=1e-12), i
    assert torch.allclose(refined_dpo_loss(m, torch.zeros_like(z), alpha), -F.logsigmoid(m))


def test_dnd_confidence_matches_explicit_extrapolation(tiny_model_dir, adapters, independent, tmp_path):
    base, tok = _load(tiny_model_dir)
    stack = build_stack(base, tok, [("seed", adapters["seed"])], trainable="iter1", lora=LORA)
    _randomize_lora(stack.model, "iter1", seed=5, scale=0.3)  # pi_theta != pi_{i-1}
    pol = _merged(tiny_model_dir, adapters["seed"], stack.save_trainable(tmp_path / "theta"))
    prompts, y1, y2 = _tokenized(tok)
    batch = collate_pairs([TokenizedPair(p, a, b) for p, a, b in zip(prompts, y1, y2)], tok.pad_token_id)
    n, beta = len(prompts), 0.1

    for ref_names, ref_model in (([], independent["init"]), (["seed"], independent["seed"])):
        ref_lp = [[_naive_logp(ref_model, p, y) for y in ys] for p, ys in zip(prompts, zip(y1, y2))]
        for lam in (0.5, 0.0):
            spec = LoopSpec(lr=1e-3, epochs=1, batch_size=n, grad_accum=1, beta=beta, seed=0, ref=ref_names,
                            dnd=True, lam=lam)
            got = pair_loss(stack, batch, spec, window=None, refining=False).confidences
            for i in range(n):
                mix = [_naive_mixed_logp(pol, ref_model, prompts[i], y, lam) for y in (y1[i], y2[i])]
                want = _sigmoid(beta * ((mix[0] - ref_lp[i][0]) - (mix[1] - ref_lp[i][1])))
                assert got[i].item() == pytest.approx(want, abs=TOL), (ref_names, lam, i)
            if lam == 0.0:  # lam = 0 is Eq. 9, the policy's own confidence
                own = pair_loss(stack, batch, LoopSpec(lr=1e-3, epochs=1, batch_size=n, grad_accum=1, beta=beta,
                                                       seed=0, ref=ref_names), None, False).confidences
                torch.testing.assert_close(got, own, atol=TOL, rtol=0)
            else:
                lam0 = pair_loss(stack, batch, LoopSpec(lr=1e-3, epochs=1, batch_size=n, grad_accum=1, beta=beta,
                                                        seed=0, ref=ref_names), None, False).confidences
                assert (got - lam0).abs().max() > 1e-4  # extrapolation must change something


def test_confidence_window_keeps_last_values_and_percentile():
    w = ConfidenceWindow(size=5, k_percent=30.0)
    assert w.tau == float("-inf")
    pushed: list[float] = []
    rng = np.random.default_rng(0)
    for size in (2, 3, 4, 1, 6):
        vals = torch.tensor(rng.random(size), dtype=torch.float32)  # confidences are float32 tensors
        tau = w.push(vals)
        pushed += vals.tolist()
        last = pushed[-5:]
        assert list(w.values) == pytest.approx(last, abs=1e-12)
        assert tau == pytest.approx(float(np.percentile(last, 30.0)), abs=1e-12)
        assert w.tau == tau
    w2 = ConfidenceWindow(size=2, k_percent=50.0)
    w2.load_state_dict(w.state_dict())
    assert list(w2.values) == list(w.values) and w2.size == 5 and w2.tau == w.tau


def test_refinement_never_before_refine_start(tiny_model_dir, adapters, tmp_path):
    base, tok = _load(tiny_model_dir)
    stack = build_stack(base, tok, [("seed", adapters["seed"])], trainable="iter1", lora=LORA)
    prompts, y1, y2 = _tokenized(tok)
    pairs = [TokenizedPair(prompts[i % 3], y1[(i + j) % 3], y2[(i + 2 * j) % 3], {"row": i})
             for i, j in ((k, k // 3) for k in range(10))]
    # 10 pairs / batch 2 = 5 steps; refine_from = floor(0.5 * 5) = 2, so steps 1-2 must not refine.
    # k_percent = 90 makes tau high, so the first step would flag a pair if refinement started early.
    spec = LoopSpec(lr=1e-2, epochs=1, batch_size=2, grad_accum=1, beta=0.1, seed=0, ref=["seed"], refine=True,
                    alpha=0.1, k_percent=90.0, window=50, refine_start=0.5, dnd=True, lam=0.5, warmup_ratio=0.0)
    summary = run_dpo_loop(stack, pairs, spec, tmp_path / "loop")
    assert summary["steps"] == 5
    rows = [json.loads(x) for x in (tmp_path / "loop" / "metrics.jsonl").read_text().splitlines()]
    flags = [json.loads(x) for x in (tmp_path / "loop" / "flags.jsonl").read_text().splitlines()]
    refine_from = math.floor(0.5 * 5)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        early = r["step"] <= refine_from
        assert r["refining"] is (not early), r
        if early:
            assert r["flagged_frac"] == 0.0, r
    assert all(not f["flagged"] for f in flags if f["step"] <= refine_from)
    assert any(r["flagged_frac"] > 0 for r in rows if r["step"] > refine_from)  # refinement does happen later
    for r in rows:  # per-pair flags agree with the logged fraction
        fs = [f["flagged"] for f in flags if f["step"] == r["step"]]
        assert len(fs) == 2 and sum(fs) / 2 == pytest.approx(r["flagged_frac"])


# ----------------------------------------------------------------------------------------------- 4. toggling


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_adapter_toggling_and_single_base_copy(tiny_model_dir, adapters, independent):
    base, tok = _load(tiny_model_dir)
    base_ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    stack = build_stack(base, tok, [("seed", adapters["seed"])], trainable="iter1", lora=LORA)
    prompts, y1, _ = _tokenized(tok)
    ids = torch.tensor([prompts[0] + y1[0]])

    with stack.use([]) as m:
        m.eval()
        init = _logits(m, ids)
    torch.testing.assert_close(init, _logits(independent["init"], ids), atol=0, rtol=0)
    with stack.use(["seed"]) as m:
        seed = _logits(m, ids)
    # merged weights round W + BA once, the stack adds x @ A @ B to x @ W: fp32 rounding alone differs by up
    # to ~2e-5 on these logits (measured 1.7e-5 with transformers 5.24 / torch 2.13); an adapter bug is > 1e-2
    torch.testing.assert_close(seed, _logits(independent["seed"], ids), atol=1e-4, rtol=0)
    assert (seed - init).abs().max() > 1e-2
    with stack.use(stack.theta) as m:
        theta = _logits(m, ids)
    with stack.use(stack.prev) as m:
        prev = _logits(m, ids)
    assert torch.equal(theta, prev)  # the new adapter's B is zero: pi_theta == pi_{i-1} at step 0
    assert all(p.requires_grad for p in stack.trainable_parameters())  # use(prev) left the trainable one trainable
    # and the switch is real: once iter1 is non-zero, theta leaves prev
    _randomize_lora(stack.model, "iter1", seed=7)
    with stack.use(stack.theta) as m:
        assert (_logits(m, ids) - prev).abs().max() > 1e-2
    with stack.use([]) as m:  # pi_init unaffected by any adapter
        torch.testing.assert_close(_logits(m, ids), init, atol=0, rtol=0)

    # one copy of the base weights: peft wrapped the very tensors of `base`, it did not copy them
    seen: dict[int, str] = {}
    stack_base_bytes = 0
    q_ptrs = []
    for n, p in stack.model.named_parameters():
        if "lora_" in n:
            continue
        assert p.data_ptr() not in seen, (n, seen.get(p.data_ptr()))
        seen[p.data_ptr()] = n
        stack_base_bytes += p.numel() * p.element_size()
        if n.endswith("q_proj.base_layer.weight"):
            q_ptrs.append(p.data_ptr())
    n_layers = base.config.num_hidden_layers
    assert len(q_ptrs) == n_layers and len(set(q_ptrs)) == n_layers
    assert set(seen) == set(base_ptrs.values())
    assert stack_base_bytes == base_bytes
    assert count_base_weight_copies(stack.model) == 1
    assert count_base_weight_copies(base) == 1  # build_stack wrapped `base` in place


# ----------------------------------------------------------------------------------------------- 5. lambda


def test_lambda_for_iteration_halving():
    assert [lambda_for_iteration(i) for i in range(1, 7)] == [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625]
    assert [lambda_for_iteration(i, [0.3, 0.2]) for i in range(1, 5)] == pytest.approx([0.3, 0.2, 0.1, 0.05])
