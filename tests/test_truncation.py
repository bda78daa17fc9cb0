"""`model.truncation`: pairs over `model.max_length` are cut as TRL cuts them (checked token for token against
TRL's own DPO data path), counted in the manifests and marked in the rows; nothing changes where nothing is
over-long."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides, write_pairs

import spa_lite
from spa_lite.data import load_pairs, shuffled
from spa_lite.logps import collate_pairs, tokenize_pair
from spa_lite.stages.common import tokenize_pairs, truncated_count

MAX_LENGTH, MAX_PROMPT = 96, 40


def _pairs() -> list[dict]:
    """Pairs of every length case: fits; long chosen; long rejected; long prompt that fits; long prompt and
    long responses; a prompt longer than max_length itself."""
    def pair(i, prompt, chosen, rejected):
        return {"id": i, "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}

    long_text = " ".join(f"word{k}" for k in range(60))
    return [
        pair(0, "Hi?", "Hello there.", "Go away."),
        pair(1, "Tell me a story.", "Once upon a time " + long_text, "No."),
        pair(2, "Name a fox.", "Red.", "Well, " + long_text),
        pair(3, "Please " + " ".join(["do this"] * 6) + "?", "Ok.", "No."),
        pair(4, "Please " + " ".join(["explain it"] * 8) + "?", "Sure: " + long_text, "Nope " + long_text[:40]),
        pair(5, "Read: " + long_text, "It counts words.", "Dunno."),
    ]


def _trl_tokenized(tiny_model_dir, rows, tmp_path):
    """TRL's DPOTrainer tokenization of ``rows`` and its collator (max_length, keep_start)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=MAX_LENGTH, truncation_mode="keep_start",
                     report_to=[], use_cpu=True, dataloader_num_workers=0, dataset_num_proc=None)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    return tok, list(trainer.train_dataset), trainer.data_collator


def test_truncation_matches_trl_dpo_data_path(tiny_model_dir, tmp_path):
    """TRL 1.16 tokenizes prompt, prompt+chosen and prompt+rejected with the chat template and its collator keeps
    each sequence's first max_length tokens (keep_start). The paper's TRL fork first kept the prompt's last
    max_prompt_length tokens (keep_end) when a pair was over-long; TRL's collator in keep_end mode applied to the
    prompt alone does exactly that. spa-lite's truncated pairs, collated, must equal TRL's batch id for id.

    Two documented differences are asserted rather than hidden: TRL keeps the template's text after the
    end-of-turn token (a newline) in each completion while spa-lite ends a response at that token, where
    sampling stops; and TRL drops a pair whose prompt alone fills max_length, which spa-lite keeps with the
    prompt's end (as the paper's fork did)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = _pairs()
    tok, trl_rows, trl_collate = _trl_tokenized(tiny_model_dir, rows, tmp_path)
    by_id = {r["id"]: r for r in trl_rows}
    assert 5 not in by_id  # TRL drops the prompt longer than max_length
    ours, skipped = tokenize_pairs(tok, [_texts(r) for r in rows], MAX_LENGTH, MAX_PROMPT, "truncate")
    assert skipped == 0 and len(ours) == len(rows)
    assert len(ours[5].prompt_ids) == MAX_PROMPT and ours[5].meta["truncated"]

    suffix = None
    keep_prompt_end = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=MAX_PROMPT,
                                                truncation_mode="keep_end")
    oracle, mine = [], []
    for i, t in sorted(by_id.items()):
        ex = {k: list(t[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for k in ("chosen_ids", "rejected_ids"):  # the template's text after the end-of-turn token
            end = len(ex[k]) - ex[k][::-1].index(tok.eos_token_id)
            suffix = suffix or ex[k][end:]
            assert suffix and ex[k][end:] == suffix
            ex[k] = ex[k][:end]
        full = tokenize_pair(tok, rows[i]["prompt"], rows[i]["chosen"][0]["content"], rows[i]["rejected"][0]["content"])
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == \
            (full.prompt_ids, full.chosen_ids, full.rejected_ids)  # the same tokens before any cut
        if len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) > MAX_LENGTH:
            cut = keep_prompt_end([{"prompt_ids": ex["prompt_ids"], "chosen_ids": [], "rejected_ids": []}])
            ex["prompt_ids"] = cut["input_ids"][0][cut["attention_mask"][0].bool()].tolist()
        oracle.append(ex)
        mine.append(ours[i])
    want, got = trl_collate(oracle), collate_pairs(mine, tok.pad_token_id)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["loss_mask"], want["completion_mask"].bool())
    assert [bool(p.meta.get("truncated")) for p in mine] == [False, True, True, False, True]
    assert max(int(m.sum()) for m in got["attention_mask"]) == MAX_LENGTH


def _texts(r: dict) -> dict:
    return {"prompt": r["prompt"], "chosen": r["chosen"][0]["content"], "rejected": r["rejected"][0]["content"]}


def test_skip_mode_leaves_over_long_pairs_out(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [_texts(r) for r in _pairs()]
    kept, skipped = tokenize_pairs(tok, rows, MAX_LENGTH, MAX_PROMPT, "skip")
    assert [p.meta["row"] for p in kept] == [0] and skipped == 5  # pair 3's prompt is over max_prompt_length
    assert truncated_count(kept) == 0
    with pytest.raises(ValueError, match="truncate"):
        tokenize_pairs(tok, rows, MAX_LENGTH, MAX_PROMPT, "cut")


def test_nothing_over_long_trains_the_same_in_both_modes(tiny_model_dir, tiny_data, tmp_path):
    """Where every pair fits, truncate and skip give the same pairs, the same batches and bit-identical adapters;
    a run made with skip keeps its stage hash (runs made before the setting existed stay complete)."""
    from transformers import AutoTokenizer

    from spa_lite.layout import Stage
    from spa_lite.runs import stage_hash

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [_texts(json.loads(x)) for x in tiny_data["pairs"].read_text().splitlines()]
    a, _ = tokenize_pairs(tok, rows, 128, 64, "truncate")
    b, _ = tokenize_pairs(tok, rows, 128, 64, "skip")
    assert len(a) == len(rows) and a == b and truncated_count(a) == 0
    assert all(torch.equal(x, y) for x, y in zip(collate_pairs(a, 0).values(), collate_pairs(b, 0).values()))
    out = {}
    for mode in ("truncate", "skip"):
        r = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / mode,
                                                      **{"model.truncation": mode}))
        m = spa_lite.run_stage(r, "seed-dpo")
        assert m["summary"]["pairs_truncated"] == 0 and m["summary"]["pairs_skipped_length"] == 0
        out[mode] = (r.run_path / "seed" / "adapter" / "adapter_model.safetensors").read_bytes()
        if mode == "skip":
            r2 = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, tiny_data, tmp_path / mode))
            assert stage_hash(r, Stage("seed", 0)) != stage_hash(r2, Stage("seed", 0))
    assert out["truncate"] == out["skip"]


def test_seed_manifest_counts_and_flags_mark_truncated_pairs(tiny_model_dir, tmp_path):
    """Seed pairs with long responses under a small max_length: truncate counts them and marks each row of
    flags.jsonl; skip counts them as skipped and trains on the rest."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    data = {"pairs": pairs, "prompts": pairs}
    rows = shuffled(load_pairs(str(pairs)), 42)  # seed-dpo's order (data.shuffle_seed): flags' "row" indexes it
    lengths = [len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
               for t in (tokenize_pair(tok, r["prompt"], r["chosen"], r["rejected"]) for r in rows)]
    limit = sorted(lengths)[3]  # the four longer pairs are over
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(rows)
    for mode in ("truncate", "skip"):
        r = spa_lite.load_recipe(None, tiny_overrides(tiny_model_dir, data, tmp_path / mode, **{
            "model.truncation": mode, "model.max_length": limit, "model.max_prompt_length": limit - 8,
            "seed_dpo.epochs": 1, "data.shuffle_seed": 42}))
        s = spa_lite.run_stage(r, "seed-dpo")["summary"]
        flags = [json.loads(x) for x in (r.run_path / "seed" / "flags.jsonl").read_text().splitlines()]
        if mode == "truncate":
            assert (s["pairs_used"], s["pairs_truncated"], s["pairs_skipped_length"]) == (len(rows), over, 0)
            assert {f["row"] for f in flags if f["truncated"]} == {k for k, n in enumerate(lengths) if n > limit}
        else:
            assert (s["pairs_used"], s["pairs_truncated"], s["pairs_skipped_length"]) == (len(rows) - over, 0, over)
            assert not any(f["truncated"] for f in flags)
