"""The benchmark scripts run end to end on the tiny model (--quick: a smoke test of the scripts, not a
measurement), so a change to the library cannot silently break them between measurement runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def demo_recipe(tmp_path: Path, tiny_model_dir: Path, **sections) -> Path:
    """A recipe on the tiny model with the demo task's data (verifier constraints), small sizes."""
    from conftest import write_recipe

    return write_recipe(tmp_path / "r.yaml", {
        "name": "x", "iterations": 1, "threads": 1, "seed": 1,
        "model": {"name_or_path": str(tiny_model_dir), "quantization": "none", "device": "cpu", "max_length": 500,
                  "max_prompt_length": 300, "lora_r": 4, "lora_alpha": 8},
        "data": {"seed_pairs": "demo:seed_pairs", "prompts": "demo:prompts", "eval_pairs": None,
                 "eval_prompts": "demo:eval_prompts", "seed_limit": 8, "iter_prompts": [16]},
        "seed_dpo": {"epochs": 1, "batch_size": 2, "grad_accum": 2, "lr": 5e-3},
        "expand": {"max_new_tokens": 8, "batch_size": 8, "shard_size": 8},
        **sections,
    })


def run_bench(script: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPA_LITE_QUIET": "1"}
    res = subprocess.run([sys.executable, str(BENCH / script), "--model", "tiny", "--quick", "--repeats", "1",
                          "--threads", "1", "--out", str(out), *extra], env=env, capture_output=True, text=True,
                         timeout=600, cwd=BENCH.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_judge_sides_agree(tmp_path):
    d = run_bench("bench_judge.py", tmp_path / "judge.json")
    assert d["quick"] is True
    assert {"stack", "naive", "stack_sampler"} <= set(d["sides"])
    assert {r["name"] for r in d["ratios"]} >= {"stack / naive throughput", "stack_sampler / naive throughput"}
    # the three judges compute the same Eq. 7 probabilities
    first = {k: d["sides"][k]["raw"][0]["p_first"] for k in ("stack", "naive", "stack_sampler")}
    assert len(first["naive"]) == 4
    for k in ("stack", "stack_sampler"):
        assert first[k] == pytest.approx(first["naive"], abs=1e-4), k


def test_bench_memory_runs_every_side_with_checkpointing(tmp_path):
    d = run_bench("bench_memory.py", tmp_path / "memory.json", "--gradient-checkpointing")
    assert d["settings"]["ckpt"] is True
    for side in ("spa", "threecopy", "trl"):
        assert d["sides"][side]["median"] > 0, side


def test_bench_spa_gain_pieces_and_paired_comparisons(tmp_path, tiny_model_dir):
    """bench/spa_gain.py on the tiny model with demo prompts: the SPA and same-compute arms run, same-compute DPO
    takes as many optimizer steps as seed DPO + the SPA iterations, and each comparison is paired over the same
    prompts. (The oracle arm is not run here: whether the verifier can separate any of a random tiny model's
    samples is chance; its labelling is unit-tested in test_evaluation.py.)"""

    rec = demo_recipe(tmp_path, tiny_model_dir, train={"batch_size": 2, "grad_accum": 1, "lr": 5e-3, "window": 8},
                      reward={"epochs": 1, "batch_size": 2, "grad_accum": 1, "lr": 5e-3})
    out, outcomes = tmp_path / "gain.json", tmp_path / "outcomes.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPA_LITE_QUIET": "1"}

    def spa_gain(*extra: str) -> None:
        res = subprocess.run([sys.executable, str(BENCH / "spa_gain.py"), "--recipe", str(rec), "--seeds", "1",
                              "--run-dir", str(tmp_path / "runs"), "--out", str(out), "--outcomes", str(outcomes),
                              *extra], env=env, capture_output=True, text=True, timeout=900, cwd=BENCH.parent)
        assert res.returncode == 0, res.stderr[-3000:]

    spa_gain("--arms", "spa,dpo_same", "--eval-prompts", "5", "--eval-batch", "5")
    d = json.loads(out.read_text())
    assert set(d["pieces"]) == {"s1/spa", "s1/dpo_same"}
    same = d["pieces"]["s1/dpo_same"]
    assert same["steps"] == same["target_steps"]
    assert set(d["policies"]) == {"pi_init", "s1/pi_0", "s1/spa_1", "s1/dpo_same_compute"}
    comps = {(c["a"], c["b"]): c for c in d["comparisons"]}
    assert {("spa_final", "pi_0"), ("spa_final", "dpo_same_compute"), ("pi_0", "pi_init")} <= set(comps)
    o = json.loads(outcomes.read_text())
    a, b = o["s1/spa_1"]["passed"], o["s1/pi_0"]["passed"]
    diff = (a.count("1") - b.count("1")) / len(a)
    c = comps[("spa_final", "pi_0")]
    assert c["diff"] == pytest.approx(diff, abs=1e-4) and c["ci_low"] <= c["diff"] <= c["ci_high"]
    assert c["n_prompts"] == 5 and c["seeds"] == [1]
    d1 = d["pieces"]["s1/spa"]["diagnostics"]["D_1"]
    assert d1["confirmed"] + d1["contradicted"] + d1["undecided"] == d1["pairs"]
    # the reward-adapter arm trains its reward stage first, and D_1 is labelled by it: p(y1 > y2) =
    # sigmoid(r(y1) - r(y2)), so each row's confidence is the sigmoid of its reward margin
    spa_gain("--arms", "spa_reward", "--eval-prompts", "5", "--eval-batch", "5")
    d = json.loads(out.read_text())
    assert "s1/spa_reward" in d["pieces"] and ("spa_reward_final", "pi_0") in {(c["a"], c["b"]) for c in d["comparisons"]}
    assert (tmp_path / "runs" / "s1-spa_reward" / "reward" / "manifest.json").exists()
    rows = [json.loads(ln) for ln in (tmp_path / "runs" / "s1-spa_reward" / "iter1" / "expand" / "data.jsonl")
            .read_text().splitlines() if ln.strip()]
    assert rows
    for r in rows:
        m = r["reward_chosen"] - r["reward_rejected"]
        assert m >= 0 and r["confidence"] == pytest.approx(1 / (1 + math.exp(-m)), rel=1e-6)
    # the exploratory judge diagnostic: Eq. 7 accuracy on gold pairs agrees with evaluation.judge_accuracy,
    # an independent implementation (position-balanced, through judge_logprob) on the same pairs
    spa_gain("--judge-diag")
    jd = json.loads(out.read_text())["judge_diagnostics"]["s1"]
    assert jd["D0 (trained on)"]["n_pairs"] == 8
    from spa_lite.config import load_recipe
    from spa_lite.data import load_pairs, shuffled
    from spa_lite.evaluation import judge_accuracy
    from spa_lite.loading import load_stack
    from spa_lite.stages.common import tokenize_pairs

    r = load_recipe(str(rec), {"name": "s1-spa", "run_dir": str(tmp_path / "runs"), "seed": 1})
    rows = shuffled(load_pairs(r.data.seed_pairs, r.data.format), r.data.shuffle_seed)[8:]
    stack = load_stack(r, frozen_upto=1)
    pairs, _ = tokenize_pairs(stack.tokenizer, rows, r.model.max_length, r.model.max_prompt_length)
    assert jd["held-out gold"]["n_pairs"] == len(pairs) > 100
    ref = judge_accuracy(stack, pairs, 0, ["init", "none"])
    assert jd["held-out gold"]["pi_0 init"]["accuracy"] == pytest.approx(ref["init"]["accuracy"], abs=1 / len(pairs) + 1e-9)
    assert jd["held-out gold"]["pi_0 none"]["accuracy"] == pytest.approx(ref["none"]["accuracy"], abs=1 / len(pairs) + 1e-9)
    ref1 = judge_accuracy(stack, pairs, 1, ["prev"])
    assert jd["held-out gold"]["pi_1 prev"]["accuracy"] == pytest.approx(ref1["prev"]["accuracy"], abs=1 / len(pairs) + 1e-9)
    # judge shift: pi_init's samples of X_1 judged by pi_0, next to D_1's own pairs (counts and pass rates
    # recomputed here from D_1 as written)
    spa_gain("--judge-shift")
    js = json.loads(out.read_text())["judge_shift"]["s1"]
    from spa_lite.data import pair_texts
    from spa_lite.demo.tasks import verify

    d1 = [json.loads(line) for line in (tmp_path / "runs" / "s1-spa" / "iter1" / "expand" / "data.jsonl").open()]
    own = js["pi_0 samples on X_1 (D_1)"]
    assert own["pairs"] == len(d1)
    passes = [verify(pair_texts(r)[k], r["constraint"]) for r in d1 for k in ("chosen", "rejected")]
    assert own["pass_rate"] == pytest.approx(sum(passes) / len(passes))
    assert own["decided"] == sum(verify(pair_texts(r)["chosen"], r["constraint"]) != verify(pair_texts(r)["rejected"],
                                 r["constraint"]) for r in d1)
    init = js["pi_init samples on X_1"]
    assert init["pairs"] == 16 and 0 <= init["decided"] <= 16 and 0.0 <= init["pass_rate"] <= 1.0


def test_bench_generation_sides_and_bf16_fidelity(tmp_path):
    d = run_bench("bench_generation.py", tmp_path / "generation.json")
    # bf16_eq7 (Eq. 7 read off the bf16 copy) is an expand-only side
    want = {f"{w}_{s}" for w in ("expand", "export") for s in ("old", "new", "bf16")} | {"expand_bf16_eq7"}
    assert set(d["sides"]) == want
    assert {r["name"] for r in d["ratios"]} == {f"{s.replace('_', ': ', 1)} / old throughput" for s in want
                                               if not s.endswith("_old")}
    fid = d["settings"]["bf16_fidelity"]
    assert 0 <= fid["greedy_identical_bf16_vs_new"] <= d["settings"]["prompts"]
    # the bf16 expand side scored its samples with a float32 forward: a deviation was measured for each sample
    assert fid["expand_logp_abs_dev_per_sequence_max"] >= fid["expand_logp_abs_dev_per_sequence_median"] >= 0
    # ... and each pair's Eq. 7 label from those float32 log-probs was compared with the bf16 copy's
    flipped, pairs = fid["eq7_labels_flipped"]
    assert pairs == d["settings"]["prompts"] * d["settings"]["repeats"] and 0 <= flipped <= pairs
    assert len(fid["eq7_flipped_abs_margin_nats"]) == flipped
    for side in d["sides"].values():
        assert side["median"] > 0


def test_bench_quickstart_reads_every_stage_peak(tmp_path, tiny_model_dir, tiny_data):
    from conftest import tiny_overrides, write_recipe

    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_overrides(tiny_model_dir, tiny_data, tmp_path / "runs"))
    d = run_bench("bench_quickstart.py", tmp_path / "quickstart.json", "--recipe", str(recipe), "--no-eval",
                  "--run-dir", str(tmp_path / "runs"))
    stages = ["seed", "iter1_expand", "iter1_train", "iter2_expand", "iter2_train"]
    for st in stages:
        assert 0 < d["sides"][st]["median"] < 100, st
    assert d["sides"]["run_peak"]["median"] == max(d["sides"][st]["median"] for st in stages)
    assert d["ratios"][0]["pass"] is (d["sides"]["run_peak"]["median"] <= 2.5)
    assert d["sides"]["iter1_expand"]["raw"][0]["summary_sample_dtype"] == ["model"]  # the tiny recipe pins it


def test_bench_judge_quality_runs_its_pieces_and_resumes(tmp_path, tiny_model_dir):
    """bench/judge_quality.py on the tiny model with demo prompts: pi_0, cached samples and scores, a table per
    (judge, N); a second call reuses every piece (no new samples)."""

    rec = demo_recipe(tmp_path, tiny_model_dir, reward={"epochs": 1, "batch_size": 2, "grad_accum": 1, "lr": 5e-3})
    out = tmp_path / "jq.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPA_LITE_QUIET": "1"}

    def jq(*extra: str) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, str(BENCH / "judge_quality.py"), "--recipe", str(rec), "--gold", "8",
                              "--seed", "1", "--dev", "6", "--samples", "4", "--ns", "2,4",
                              "--judges", "eq7,eq7_tok,eq7_lc,reward,ensemble,consensus,shorter,reward_eos",
                              "--run-dir", str(tmp_path / "runs"), "--out", str(out), *extra],
                             env=env, capture_output=True, text=True, timeout=900, cwd=BENCH.parent)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    jq()
    res = json.loads(out.read_text())
    g = res["gold"]["8"]
    assert set(g["judges"]) == {f"{j}/N{n}" for j in ("eq7", "eq7_tok", "eq7_lc", "reward", "ensemble", "shorter",
                                                      "reward_eos") for n in (2, 4)} | {"consensus/N4"}
    # reward_eos: the cut samples (the tiny model almost never ends one) rescored with end-of-turn, the rest kept
    sc = json.loads((tmp_path / "runs" / "g8-s1" / "judge_quality" / "scores_4.json").read_text())
    cut = [s["truncated"] for p in sorted((tmp_path / "runs" / "g8-s1" / "judge_quality").glob("samples_4_[0-9]*.json"))
           for r in json.loads(p.read_text())["rows"] for s in r["samples"]]
    assert len(cut) == len(sc["reward"]) == len(sc["reward_eos"]) and any(cut)
    assert all((a != b) == c for a, b, c in zip(sc["reward"], sc["reward_eos"], cut))
    assert g["sample_seed"] == 2026 and all(math.isfinite(g["judges"][f"eq7_lc/N{n}"]["lc_slope_per_token"]) for n in (2, 4))
    assert g["dev_prompts"] == 6 and g["samples_per_prompt"] == 4
    assert all(v["pairs"] <= 6 and v["decided"] <= v["pairs"] for v in g["judges"].values())
    # log pi_0 of padded batches equals one sequence at a time, up to float32 summation order over <= 8 tokens
    assert g["logp_pi0_check"]["max_abs_dev"] < 1e-3
    again = jq()
    assert "samples " not in again.stderr  # every sample chunk came from the cache
    g2 = json.loads(out.read_text())["gold"]["8"]
    assert g2["judges"] == g["judges"]
    # both calls are kept, oldest first, with the judges each asked for
    assert [len(c["judges"]) for c in g2["calls"]] == [8, 8] and g2["calls"][0] == g["calls"][0]
    assert g["gold_pairs"] == "demo:seed_pairs"
    # the same gold size from the grown pool is another experiment: refused into the same --out, nothing trained
    before = out.read_text()
    other = subprocess.run([sys.executable, str(BENCH / "judge_quality.py"), "--recipe", str(rec), "--gold", "8",
                            "--seed", "1", "--gold-pairs", "demo:gold_pool", "--run-dir", str(tmp_path / "runs"),
                            "--out", str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert other.returncode != 0 and "use another --out" in other.stderr, other.stderr[-2000:]
    assert not (tmp_path / "runs" / "g8-s1-pool").exists()
    assert out.read_text() == before
    # a gold size past the gold file's pairs is refused up front, before the sizes before it are trained
    big = subprocess.run([sys.executable, str(BENCH / "judge_quality.py"), "--recipe", str(rec), "--gold", "4,100000",
                          "--seed", "1", "--dev", "6", "--samples", "4", "--ns", "2,4", "--judges", "eq7,shorter",
                          "--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "big.json")],
                         env=env, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert big.returncode != 0 and "--gold 100000: demo:seed_pairs holds 150 pairs" in big.stderr, big.stderr[-2000:]
    assert not (tmp_path / "big.json").exists() and not (tmp_path / "runs" / "g4-s1").exists()
    bogus = subprocess.run([sys.executable, str(BENCH / "judge_quality.py"), "--judges", "eq7,eq8",
                            "--out", str(tmp_path / "bogus.json")], env=env, capture_output=True, text=True,
                           timeout=120, cwd=BENCH.parent)
    assert bogus.returncode == 2 and "--judges: unknown eq8" in bogus.stderr, bogus.stderr[-2000:]
    # fresh samples of the same prompts (another --sample-seed) are refused into an --out that holds the first
    # samples' figures, and drawn into their own cache beside the first one (which stays as it was)
    cache = tmp_path / "runs" / "g8-s1" / "judge_quality"
    first = {p.name: p.read_bytes() for p in cache.iterdir()}
    mixed = subprocess.run([sys.executable, str(BENCH / "judge_quality.py"), "--recipe", str(rec), "--gold", "8",
                            "--seed", "1", "--sample-seed", "7", "--run-dir", str(tmp_path / "runs"), "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert mixed.returncode != 0 and "--sample-seed 2026, not 7" in mixed.stderr, mixed.stderr[-2000:]
    assert out.read_text() == before
    fresh = tmp_path / "fresh.json"
    jq("--sample-seed", "7", "--out", str(fresh))
    fg = json.loads(fresh.read_text())["gold"]["8"]
    assert fg["sample_seed"] == 7 and len(fg["calls"]) == 1
    # its sampling time is its own chunk's, not the first samples' too
    assert fg["piece_wall_s"]["sampling"] == json.loads((cache / "samples_4_ss7_000.json").read_text())["wall_s"]
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.name in first} == first
    assert sorted(p.name for p in cache.iterdir() if p.name not in first) == ["samples_4_ss7_000.json",
                                                                              "scores_4_ss7.json"]
