"""AlpacaEval 2.0 and MT-Bench (FastChat) answer export: formats, multi-turn prompts, and generation over a stack."""

from __future__ import annotations

import json

import pytest

from spa_lite.errors import DataError
from spa_lite.export import (
    alpaca_eval_outputs,
    export_alpaca_eval,
    export_mt_bench,
    generate_answers,
    mt_bench_answers,
    mt_bench_messages,
    read_alpaca_eval_questions,
    read_mt_bench_questions,
)


class FakeGenerate:
    """Answers 'ANS[<last user message>]' and records every call."""

    def __init__(self):
        self.calls: list[tuple[list, float]] = []

    def __call__(self, prompts, temperature):
        self.calls.append(([list(p) for p in prompts], temperature))
        return [f"ANS[{p[-1]['content']}]" for p in prompts]


def test_alpaca_eval_round_trip(tmp_path):
    qs = [{"instruction": "Name a fruit.", "dataset": "helpful_base", "output": "gold", "generator": "gpt4"},
          {"instruction": "Write a haiku about snow."}]
    qpath = tmp_path / "alpaca_eval.json"
    qpath.write_text(json.dumps(qs))
    gen = FakeGenerate()
    out = tmp_path / "out" / "model_outputs.json"
    rows = export_alpaca_eval(qpath, out, gen, generator="spa-pi_2", temperature=0.0)
    written = json.loads(out.read_text())
    assert written == rows
    assert isinstance(written, list) and len(written) == 2
    assert set(written[0]) == {"instruction", "output", "generator", "dataset"}
    assert set(written[1]) == {"instruction", "output", "generator"}  # no dataset in the question, none invented
    assert written[0] == {"instruction": "Name a fruit.", "output": "ANS[Name a fruit.]", "generator": "spa-pi_2",
                          "dataset": "helpful_base"}
    assert written[1]["output"] == "ANS[Write a haiku about snow.]"
    assert gen.calls == [([[{"role": "user", "content": "Name a fruit."}],
                           [{"role": "user", "content": "Write a haiku about snow."}]], 0.0)]
    assert not list(out.parent.glob(".*.tmp"))  # atomic write leaves no temporary file


def test_alpaca_eval_outputs_checks_lengths_and_questions(tmp_path):
    with pytest.raises(ValueError):
        alpaca_eval_outputs([{"instruction": "a"}], ["x", "y"], "g")
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps([{"prompt": "no instruction"}]))
    with pytest.raises(DataError):
        read_alpaca_eval_questions(bad)
    bad.write_text(json.dumps({"instruction": "not a list"}))
    with pytest.raises(DataError):
        read_alpaca_eval_questions(bad)


def _mt_questions(tmp_path):
    qs = [
        {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "Now double it."]},
        {"question_id": 81, "category": "writing", "turns": ["Write a travel blog post.", "Rewrite it in rhymes."]},
        {"question_id": 90, "category": "stem", "turns": ["What is entropy?"]},
    ]
    p = tmp_path / "question.jsonl"
    p.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return p, qs


def test_mt_bench_format_and_multi_turn(tmp_path):
    qpath, qs = _mt_questions(tmp_path)
    assert read_mt_bench_questions(qpath) == qs
    gen = FakeGenerate()
    out = tmp_path / "model_answer" / "spa.jsonl"
    rows = export_mt_bench(qpath, out, gen, model_id="spa", temperature=0.0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["question_id"] for r in lines] == [81, 82, 90]  # sorted by question_id, as FastChat reorganises
    assert sorted(lines, key=lambda r: r["question_id"]) == sorted(rows, key=lambda r: r["question_id"])
    for r in lines:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == "spa" and isinstance(r["answer_id"], str) and isinstance(r["tstamp"], float)
        assert len(r["choices"]) == 1 and set(r["choices"][0]) == {"index", "turns"} and r["choices"][0]["index"] == 0
    by = {r["question_id"]: r["choices"][0]["turns"] for r in lines}
    assert by == {82: ["ANS[What is 2+2?]", "ANS[Now double it.]"],
                  81: ["ANS[Write a travel blog post.]", "ANS[Rewrite it in rhymes.]"],
                  90: ["ANS[What is entropy?]"]}
    assert len({r["answer_id"] for r in lines}) == 3
    # turn 2 prompts carry turn 1's question and the model's own answer
    second = [p for prompts, _ in gen.calls for p in prompts if len(p) > 1]
    assert {tuple((m["role"], m["content"]) for m in p) for p in second} == {
        (("user", "What is 2+2?"), ("assistant", "ANS[What is 2+2?]"), ("user", "Now double it.")),
        (("user", "Write a travel blog post."), ("assistant", "ANS[Write a travel blog post.]"),
         ("user", "Rewrite it in rhymes.")),
    }
    assert len(gen.calls) == 2  # one batched call per turn at a fixed temperature


def test_mt_bench_category_temperatures(tmp_path):
    _, qs = _mt_questions(tmp_path)
    gen = FakeGenerate()
    rows = mt_bench_answers(qs, gen, "m", temperature=None, tstamp=123.0)
    temps = {}
    for prompts, t in gen.calls:
        for p in prompts:
            temps[p[0]["content"]] = t
    assert temps == {"What is 2+2?": 0.0, "Write a travel blog post.": 0.7, "What is entropy?": 0.1}
    assert all(r["tstamp"] == 123.0 for r in rows)


def test_mt_bench_messages_and_bad_file(tmp_path):
    assert mt_bench_messages(["q1", "q2", "q3"], ["a1", "a2"]) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"}]
    p = tmp_path / "question.jsonl"
    p.write_text(json.dumps({"question_id": 1, "turns": "not a list"}) + "\n")
    with pytest.raises(DataError, match="turns"):
        read_mt_bench_questions(p)


def test_generate_answers_greedy_on_tiny_stack(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from spa_lite.generation import sample_responses
    from spa_lite.models import load_tokenizer
    from spa_lite.stack import LoraSettings, build_stack

    tok = load_tokenizer(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stack = build_stack(base, tok, trainable="iter1", lora=LoraSettings(r=4, alpha=8))
    prompts = [[{"role": "user", "content": "Name a fast animal."}],
               [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Why is the sky blue?"}]]
    a = generate_answers(stack, [], prompts, max_new_tokens=6, temperature=0.0, batch_size=2)
    b = generate_answers(stack, [], prompts, max_new_tokens=6, temperature=0.0, batch_size=2, seed=7)
    assert a == b and len(a) == 2 and all(isinstance(x, str) for x in a)  # greedy: the seed does not matter
    with stack.use([]) as m:
        ref = sample_responses(m, tok, prompts, num_samples=1, max_new_tokens=6, temperature=0.0)
    assert a == [s[0].text for s in ref]
