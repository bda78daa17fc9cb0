"""Data formats normalise to one shape; bad data names file, line and field; the paper's split protocol;
a smoke test on real HH-RLHF data; shipped recipes load and bad recipes list every problem at once."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from spa_lite.config import load_recipe
from spa_lite.data import detect_format, iteration_prompts, load_pairs, load_prompts, split_protocol
from spa_lite.errors import DataError, SpaError

ROOT = Path(__file__).resolve().parent.parent
HH_REAL = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def core(pair: dict) -> dict:
    return {k: pair[k] for k in ("prompt", "chosen", "rejected")}


# One single-turn and one multi-turn exchange, written in every schema.
SINGLE = {"prompt": [{"role": "user", "content": "How do I boil an egg?"}],
          "chosen": "Put it in boiling water for 8 minutes.", "rejected": "Eggs are not food."}
MULTI = {"prompt": [{"role": "user", "content": "Name a fast animal."},
                    {"role": "assistant", "content": "The cheetah."},
                    {"role": "user", "content": "How fast does it run?"}],
         "chosen": "Up to about 110 km/h in short bursts.", "rejected": "Slowly."}


def as_conversational(ex: dict) -> dict:
    return {"prompt": ex["prompt"], "chosen": [{"role": "assistant", "content": ex["chosen"]}],
            "rejected": [{"role": "assistant", "content": ex["rejected"]}]}


def as_conversational_implicit(ex: dict) -> dict:
    """TRL's implicit prompt: chosen/rejected are whole conversations, no prompt field."""
    return {"chosen": ex["prompt"] + [{"role": "assistant", "content": ex["chosen"]}],
            "rejected": ex["prompt"] + [{"role": "assistant", "content": ex["rejected"]}]}


def as_standard(ex: dict) -> dict:
    assert len(ex["prompt"]) == 1
    return {"prompt": ex["prompt"][0]["content"], "chosen": ex["chosen"], "rejected": ex["rejected"]}


def as_ultrafeedback(ex: dict) -> dict:
    """argilla / HuggingFaceH4 binarized: prompt string (the first user turn), chosen/rejected full conversations."""
    return {"prompt": ex["prompt"][0]["content"], "prompt_id": "abc",
            "chosen": ex["prompt"] + [{"role": "assistant", "content": ex["chosen"]}],
            "rejected": ex["prompt"] + [{"role": "assistant", "content": ex["rejected"]}],
            "score_chosen": 8.0, "score_rejected": 3.0,
            "messages": ex["prompt"] + [{"role": "assistant", "content": ex["chosen"]}]}


def as_hh(ex: dict) -> dict:
    def dialogue(reply):
        turns = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in ex["prompt"])
        return turns + f"\n\nAssistant: {reply}"

    return {"chosen": dialogue(ex["chosen"]), "rejected": dialogue(ex["rejected"])}


WRITERS = {"conversational": as_conversational, "conversational-implicit": as_conversational_implicit,
           "standard": as_standard, "ultrafeedback": as_ultrafeedback, "hh": as_hh}
EXPECTED_FORMAT = {"conversational": "conversational", "conversational-implicit": "conversational",
                   "standard": "standard", "ultrafeedback": "ultrafeedback", "hh": "hh"}


@pytest.mark.parametrize("writer", list(WRITERS))
@pytest.mark.parametrize("example", ["single", "multi"])
def test_formats_normalise_to_one_shape(tmp_path, writer, example):
    ex = SINGLE if example == "single" else MULTI
    if writer == "standard" and example == "multi":
        pytest.skip("standard prompts are single strings")
    rec = WRITERS[writer](ex)
    assert detect_format(rec) == EXPECTED_FORMAT[writer]
    path = write_jsonl(tmp_path / "d.jsonl", [rec, rec])
    for fmt in ("auto", EXPECTED_FORMAT[writer]):
        pairs = load_pairs(str(path), fmt)
        assert len(pairs) == 2
        assert core(pairs[0]) == ex, (writer, fmt)
        assert pairs[1]["source"] == f"{path}:2"
    # extra fields ride along; schema fields do not
    if writer == "ultrafeedback":
        assert pairs[0]["score_chosen"] == 8.0 and pairs[0]["prompt_id"] == "abc" and "messages" not in pairs[0]
    # prompts from preference data: the same prompt, without the responses
    prompts = load_prompts(str(path))
    assert [p["prompt"] for p in prompts] == [ex["prompt"]] * 2
    assert all("chosen" not in p and "rejected" not in p for p in prompts)


def test_ultrafeedback_with_system_message_keeps_it(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    rec = {"prompt": "Hi?", "chosen": conv + [{"role": "assistant", "content": "Hello."}],
           "rejected": conv + [{"role": "assistant", "content": "Go away."}]}
    p = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [rec])))[0]
    assert p["prompt"] == conv and p["chosen"] == "Hello." and p["rejected"] == "Go away."


def test_hh_dialogue_with_leading_whitespace_and_trailing_spaces(tmp_path):
    rec = {"chosen": "Human: Hi there\n\nAssistant: Hello! ", "rejected": "\n\nHuman: Hi there\n\nAssistant: Meh"}
    p = load_pairs(str(write_jsonl(tmp_path / "d.jsonl", [rec])), "hh")[0]
    assert p["prompt"] == [{"role": "user", "content": "Hi there"}]
    assert (p["chosen"], p["rejected"]) == ("Hello!", "Meh")


def test_detect_format():
    assert detect_format({"prompt": "x"}) == "prompts"
    assert detect_format({"prompt": [{"role": "user", "content": "x"}]}) == "prompts"
    assert detect_format({"prompt": "x", "chosen": "a", "rejected": "b"}) == "standard"
    assert detect_format(as_hh(SINGLE)) == "hh"
    assert detect_format(as_conversational(SINGLE)) == "conversational"
    assert detect_format(as_ultrafeedback(SINGLE)) == "ultrafeedback"


# ---------------------------------------------------------------------------------------------- errors


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "file.jsonl", [as_standard(SINGLE), as_standard(SINGLE), '{"prompt": "x", "chosen": ',
                                                 as_standard(SINGLE)])
    with pytest.raises(DataError, match="malformed JSON") as e:
        load_pairs(str(path))
    assert "file.jsonl:3" in str(e.value)
    assert e.value.line == 3


def test_malformed_json_in_gzip_names_line(tmp_path):
    path = tmp_path / "file.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(as_standard(SINGLE)) + "\n" + "not json\n")
    with pytest.raises(DataError) as e:
        load_pairs(str(path))
    assert "file.jsonl.gz:2" in str(e.value)


@pytest.mark.parametrize("missing", ["chosen", "rejected"])
def test_missing_field_names_field_and_line(tmp_path, missing):
    bad = {k: v for k, v in as_standard(SINGLE).items() if k != missing}
    path = write_jsonl(tmp_path / "pairs.jsonl", [as_standard(SINGLE), bad])
    with pytest.raises(DataError) as e:
        load_pairs(str(path), "standard")
    msg = str(e.value)
    assert "pairs.jsonl:2" in msg and f"'{missing}'" in msg and "missing" in msg
    assert e.value.field == missing and e.value.line == 2


def test_missing_prompt_names_field(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'prompt'"):
        load_pairs(str(path))


@pytest.mark.parametrize("rec,field", [
    ({"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": "b"}, "chosen"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "rejected"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "prompt"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "rejected"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}, "prompt"),  # no Assistant turn: not hh
])
def test_bad_records_name_their_field(tmp_path, rec, field):
    path = write_jsonl(tmp_path / "p.jsonl", [rec])
    with pytest.raises(DataError) as e:
        load_pairs(str(path))
    assert e.value.field == field and "p.jsonl:1" in str(e.value)


def test_unusable_pairs_are_skipped_and_counted(tmp_path, caplog):
    good = as_hh(SINGLE)
    empty = {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: no"}
    diverge = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, empty, good, diverge, good])
    with caplog.at_level("WARNING", logger="spa_lite.data"):
        pairs = load_pairs(str(path))
    assert [p["source"] for p in pairs] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert "hh.jsonl:2" in caplog.text and "skipped 2" in caplog.text
    assert len(load_prompts(str(path))) == 3
    # structural problems still stop the load
    write_jsonl(path, [good, {"chosen": 3, "rejected": "x"}])
    with pytest.raises(DataError, match="hh.jsonl:2"):
        load_pairs(str(path))


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [as_standard(SINGLE), "[1, 2]"])
    with pytest.raises(DataError, match=r"p.jsonl:2: expected a JSON object"):
        load_pairs(str(path))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty") as e:
        load_pairs(str(path))
    assert "empty.jsonl" in str(e.value)
    with pytest.raises(DataError, match="empty"):
        load_prompts(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_pairs(str(tmp_path / "nope.jsonl"))


def test_prompt_file_is_not_preference_data(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello"}])
    with pytest.raises(DataError, match="prompt file"):
        load_pairs(str(path))


# ---------------------------------------------------------------------------------------------- prompts


def test_prompts_from_prompt_file(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "a", "prompt": "Why is the sky blue?"},
        {"id": "b", "prompt": [{"role": "user", "content": "What is a fox?"}], "constraint": {"max_words": 5}},
    ])
    out = load_prompts(str(path))
    assert [o["prompt"] for o in out] == [[{"role": "user", "content": "Why is the sky blue?"}],
                                          [{"role": "user", "content": "What is a fox?"}]]
    assert out[0]["id"] == "a" and out[1]["constraint"] == {"max_words": 5}
    assert out[1]["source"] == f"{path}:2"


def test_prompts_from_each_preference_format(tmp_path):
    for name, writer in WRITERS.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [writer(SINGLE)])
        assert load_prompts(str(path))[0]["prompt"] == SINGLE["prompt"], name


def test_bad_prompt_record(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"prompt": {"x": 1}}])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: field 'prompt'"):
        load_prompts(str(path))


# ---------------------------------------------------------------------------------------------- split protocol


@pytest.fixture
def many_pairs(tmp_path):
    rows = [{"id": i, "prompt": f"question {i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    return str(write_jsonl(tmp_path / "many.jsonl", rows))


def test_split_protocol_disjoint_and_deterministic(many_pairs):
    a = split_protocol(many_pairs, 42, 10, [15, 20], 5)
    b = split_protocol(many_pairs, 42, 10, [15, 20], 5)
    c = split_protocol(many_pairs, 7, 10, [15, 20], 5)
    assert a == b
    assert [r["id"] for r in a["seed_pairs"]] != [r["id"] for r in c["seed_pairs"]]
    sizes = {k: len(v) for k, v in a.items()}
    assert sizes == {"seed_pairs": 10, "iter1_prompts": 15, "iter2_prompts": 20, "test_pairs": 5}
    ids = [{r["id"] for r in a[k]} for k in ("seed_pairs", "iter1_prompts", "iter2_prompts", "test_pairs")]
    assert sum(len(s) for s in ids) == len(set().union(*ids)) == 50
    assert all("chosen" not in r and "rejected" not in r for k in ("iter1_prompts", "iter2_prompts") for r in a[k])
    assert all("chosen" in r for r in a["seed_pairs"] + a["test_pairs"])
    with pytest.raises(SpaError, match="needs 61"):
        split_protocol(many_pairs, 42, 10, [30, 20], 1)


def test_split_command_files_feed_iteration_prompts(many_pairs, tmp_path):
    from spa_lite.options import SplitOptions
    from spa_lite.stages import split

    out = tmp_path / "split"
    counts = split.run(SplitOptions(data=many_pairs, out=out, seed=42, seed_size=10, iter_sizes=[15, 20], test_size=5))
    assert counts["prompts"] == 35
    pool = load_prompts(str(out / "prompts.jsonl"))
    x1 = iteration_prompts(pool, [15, 20], 1, 42)
    x2 = iteration_prompts(pool, [15, 20], 2, 42)
    assert len(x1) == 15 and len(x2) == 20
    assert not {r["id"] for r in x1} & {r["id"] for r in x2}
    assert {r["id"] for r in x1} | {r["id"] for r in x2} == {r["id"] for r in pool}
    seeds = {r["id"] for r in load_pairs(str(out / "seed_pairs.jsonl"))}
    assert not seeds & {r["id"] for r in pool}
    with pytest.raises(SpaError, match="iteration 3"):
        iteration_prompts(pool, [15, 20, 5], 3, 42)


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not HH_REAL.exists(), reason=f"{HH_REAL} not present")
def test_real_hh_rlhf_smoke():
    pairs = load_pairs(str(HH_REAL), "auto", limit=200)
    assert len(pairs) == 200
    multi = 0
    for p in pairs:
        assert p["prompt"] and p["prompt"][-1]["role"] == "user" and p["prompt"][0]["role"] == "user"
        assert all(m["role"] in {"user", "assistant"} and m["content"] is not None for m in p["prompt"])
        assert p["chosen"].strip() and p["rejected"].strip()
        assert "\n\nHuman:" not in p["chosen"] and "\n\nAssistant:" not in p["chosen"]
        multi += len(p["prompt"]) > 1
    assert multi > 0, "HH harmless-base has multi-turn dialogues"
    prompts = load_prompts(str(HH_REAL))[:200]
    assert [p["prompt"] for p in prompts] == [p["prompt"] for p in pairs]
    # the whole file loads; its few unusable pairs (empty replies, diverging dialogues) are skipped
    everything = load_pairs(str(HH_REAL))
    assert 2200 < len(everything) <= 2312


# ---------------------------------------------------------------------------------------------- recipes


RECIPES = sorted((ROOT / "recipes").glob("*.yaml")) if (ROOT / "recipes").is_dir() else []


@pytest.mark.skipif(not RECIPES, reason="no recipes/*.yaml")
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.name and r.iterations >= 0
    assert len(r.data.iter_prompts) >= r.iterations
    assert load_recipe(path.stem).to_dict() == r.to_dict()  # by shipped name too


def test_recipe_problems_reported_together(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: x\nbogus: 1\nmodel:\n  lora_r: abc\n  nonsense: 2\n  quantization: 8bit\n"
        "train:\n  refine: maybe\n  lambdas: [0.5, x]\n  alpha: 0.7\nexpand:\n  judge: vibes\n"
    )
    with pytest.raises(SpaError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg
    for item in ("bogus", "model.lora_r", "model.nonsense", "train.refine", "train.lambdas[1]",
                 "model.quantization", "expand.judge", "train.alpha"):
        assert item in msg, item


def test_recipe_override_problems(tmp_path):
    with pytest.raises(SpaError) as e:
        load_recipe(None, ["model.lora_r=abc", "nope.x=1", "train.k_percent=150"])
    msg = str(e.value)
    assert "model.lora_r" in msg and "nope" in msg and "train.k_percent" in msg


def test_recipe_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel:\n  lora_r: [1, 2\n")
    with pytest.raises(SpaError, match=r"broken.yaml:\d+: invalid YAML"):
        load_recipe(path)


def test_recipe_not_found():
    with pytest.raises(SpaError, match="not found"):
        load_recipe("no-such-recipe-anywhere")


def test_recipe_values_are_coerced(tmp_path):
    r = load_recipe(None, {"train.refine": "false", "data.iter_prompts": "4,4", "train.lr": "1e-3",
                           "expand.judge_ref": "prev"})
    assert r.train.refine is False and r.data.iter_prompts == [4, 4] and r.train.lr == 1e-3
    assert r.expand.judge_ref == "prev"
