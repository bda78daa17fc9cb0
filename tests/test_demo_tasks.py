"""Demo task: verifiers, record generation, and the shipped data files (no model needed)."""

from __future__ import annotations

import json

import pytest

from spa_lite.demo import DATA_DIR, demo_path, tasks
from spa_lite.demo.tasks import CONSTRAINT_KINDS, verify


def c(kind, **params):
    return {"kind": kind, "params": params}


# (constraint, passing responses, failing responses) -- at least one of each per kind
CASES = [
    (
        c("max_words", n=5),
        ["Boil it for ten minutes.", "  Salt the water well.  ", "It's well-known: add salt."],
        ["Boil the pasta for about ten minutes.", ""],
    ),
    (
        c("min_words", n=5),
        ["Boil the pasta for ten minutes.", "one two three four five"],
        ["Ten minutes.", "one two three four", "   "],
    ),
    (
        c("include_word", word="basil"),
        ["Keep basil in water.", "BASIL likes sun.", "Fresh basils last longer."],
        ["Keep herbs in water.", "Sweet-basilisk is not a herb."],
    ),
    (
        c("exclude_word", word="pasta"),
        ["Boil it for ten minutes.", "Try pastry instead."],
        ["Boil the pasta well.", "Pasta!", "Two PASTAS please."],
    ),
    (
        c("no_commas"),
        ["Boil it for ten minutes and drain it.", "Line one\nLine two"],
        ["First, boil the water.", "a,b", ""],
    ),
    (
        c("lowercase"),
        ["boil it for ten minutes.", "  salt the water: 2 spoons  "],
        ["Boil it for ten minutes.", "boil it in a pot, not a PAN.", "123 456"],
    ),
    (
        c("uppercase"),
        ["BOIL IT FOR TEN MINUTES.", "ADD 2 SPOONS OF SALT!"],
        ["Boil it for ten minutes.", "BOIL IT for ten minutes.", "123"],
    ),
    (
        c("bullets", n=3),
        [
            "- one\n- two\n- three",
            "Here are tips:\n- one\n* two\n- three\nEnjoy!",
            "  - indented\n  - also\n  - three",
        ],
        ["- one\n- two", "- one\n- two\n- three\n- four", "1. one\n2. two\n3. three", "-one\n-two\n-three",
         "**Bold** one\n**Bold** two\n**Bold** three"],
    ),
    (
        c("json_object", key="answer"),
        [
            '{"answer": "Boil it."}',
            '```json\n{"answer": "Boil it.", "extra": 1}\n```',
            '```\n{"answer": 42}\n```',
            '  {"answer": null}  ',
        ],
        ['{"reply": "Boil it."}', '["answer"]', 'Here: {"answer": "x"}', '{"answer": "unterminated', "answer"],
    ),
    (
        c("end_with", sentence="I hope this helps."),
        ["Boil it. I hope this helps.", "Boil it.\n\nI hope this helps.  ", 'Boil it. "I hope this helps."',
         "Boil it. **I hope this helps.**"],
        ["I hope this helps. Boil it.", "Boil it. I hope this helps", "Boil it."],
    ),
    (
        c("start_with", word="Sure"),
        ["Sure, boil it.", "sure thing.", '"Sure!" Boil it.', "**Sure** - boil it."],
        ["Of course. Sure.", "Surely you can.", "Yes, boil it."],
    ),
    (
        c("max_sentences", n=2),
        ["Boil it. Then drain it.", "Boil it for 3.5 minutes! Drain it.", "Just boil it"],
        ["Boil it. Drain it. Serve it.", "Boil it?\nDrain it.\nServe it.", "- one\n- two\n- three"],
    ),
    (
        c("paragraphs", n=2),
        ["Boil it.\n\nDrain it.", "First part.\n  \nSecond part, longer.\nStill second."],
        ["Boil it. Drain it.", "A.\n\nB.\n\nC.", "Boil it.\nDrain it."],
    ),
    (
        c("word_frequency", word="salt", n=3),
        ["Salt, salt and more salt.", "Use salt. Salts help. SALT the water."],
        ["Salt and salt.", "Use saltwater, salty, salted."],
    ),
]


def test_cases_cover_every_kind():
    assert {con["kind"] for con, _, _ in CASES} == set(CONSTRAINT_KINDS)


@pytest.mark.parametrize("constraint,good,bad", CASES, ids=[con["kind"] for con, _, _ in CASES])
def test_verifier_pass_and_fail(constraint, good, bad):
    for text in good:
        assert verify(text, constraint), (constraint, text)
    for text in bad:
        assert not verify(text, constraint), (constraint, text)


def test_empty_response_never_passes():
    records = tasks.make_prompt_records(0)
    for rec in records:
        assert not verify("", rec["constraint"])
        assert not verify("  \n ", rec["constraint"])
        assert not verify(None, rec["constraint"])


def test_unknown_kind_raises_naming_it():
    with pytest.raises(ValueError, match="no_such_kind"):
        verify("hello", {"kind": "no_such_kind", "params": {}})
    with pytest.raises(ValueError, match="no_such_kind"):
        tasks.describe({"kind": "no_such_kind", "params": {}})


def test_counting_helpers():
    assert tasks.count_words("It's a well-known fact, 42 times.") == 6
    assert tasks.count_bullets("- a\n* b\n-c\n  - d") == 3
    assert tasks.count_paragraphs("a\n\n\nb\n \nc") == 3
    assert tasks.count_sentences("Hi there. How are you? Fine!") == 3


def test_at_least_twelve_kinds_with_required_names():
    assert len(CONSTRAINT_KINDS) >= 12
    assert len(set(CONSTRAINT_KINDS)) == len(CONSTRAINT_KINDS)
    required = {"max_words", "min_words", "include_word", "exclude_word", "no_commas", "lowercase", "bullets",
                "json_object", "end_with", "start_with", "max_sentences", "paragraphs", "word_frequency",
                "uppercase"}
    assert required <= set(CONSTRAINT_KINDS)
    assert set(tasks.KIND_WEIGHTS) == set(CONSTRAINT_KINDS)


def test_questions_distinct_and_many():
    qs = tasks.QUESTIONS
    assert len(qs) >= 300
    assert len({q.strip().lower() for q in qs}) == len(qs)
    for q in qs:
        assert q == q.strip() and 10 <= len(q) <= 120 and q.endswith("?"), q


def test_make_prompt_records_deterministic_and_complete():
    a = tasks.make_prompt_records(0)
    b = tasks.make_prompt_records(0)
    assert a == b
    assert tasks.make_prompt_records(1) != a
    json.dumps(a)  # JSON-serialisable
    ids = [r["id"] for r in a]
    assert len(ids) == len(set(ids))
    per_q = {}
    for r in a:
        per_q.setdefault(tasks.question_index(r), []).append(r)
    assert len(per_q) == len(tasks.QUESTIONS) >= 300
    assert all(1 <= len(v) <= 2 for v in per_q.values())
    assert {r["constraint"]["kind"] for r in a} == set(CONSTRAINT_KINDS)


def test_record_instruction_matches_constraint():
    for rec in tasks.make_prompt_records(0):
        assert set(rec) == {"id", "prompt", "constraint"}
        qi = tasks.question_index(rec)
        kind = rec["constraint"]["kind"]
        assert rec["id"] == f"q{qi:04d}-c{CONSTRAINT_KINDS.index(kind):02d}"
        assert len(rec["prompt"]) == 1 and rec["prompt"][0]["role"] == "user"
        assert rec["prompt"][0]["content"] == f"{tasks.QUESTIONS[qi]} {tasks.instruction(rec['constraint'])}"
        desc = tasks.describe(rec["constraint"])
        assert desc.startswith(kind + "(") and tasks.instruction(rec["constraint"]) in desc
        params = rec["constraint"]["params"]
        if "word" in params and kind != "start_with":
            # the word to include / avoid / repeat comes from the question itself
            assert params["word"].lower() in tasks.QUESTIONS[qi].lower()
        if kind == "max_words":
            assert 20 <= params["n"] <= 60


def test_demo_path_errors_and_refs():
    with pytest.raises(FileNotFoundError, match="unknown demo file"):
        demo_path("demo:nope")
    assert DATA_DIR.name == "data" and DATA_DIR.parent.name == "demo"


# --------------------------------------------------------------------------
# Shipped data files (skipped until built)
# --------------------------------------------------------------------------

SHIPPED = ["seed_pairs", "prompts", "eval_prompts", "eval_pairs"]


def _load(name):
    try:
        path = demo_path(name)
    except FileNotFoundError:
        pytest.skip(f"demo:{name} not built")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def _check_prompt_row(row):
    assert isinstance(row["id"], str)
    qi = tasks.question_index(row)
    assert 0 <= qi < len(tasks.QUESTIONS)
    msgs = row["prompt"]
    assert isinstance(msgs, list) and msgs and msgs[-1]["role"] == "user"
    assert msgs[-1]["content"] == f"{tasks.QUESTIONS[qi]} {tasks.instruction(row['constraint'])}"
    assert row["constraint"]["kind"] in CONSTRAINT_KINDS


@pytest.mark.parametrize("name", ["prompts", "eval_prompts"])
def test_shipped_prompt_files(name):
    rows = _load(name)
    assert rows
    for row in rows:
        assert set(row) == {"id", "prompt", "constraint"}  # no responses, no labels
        _check_prompt_row(row)
    assert len({r["id"] for r in rows}) == len(rows)


@pytest.mark.parametrize("name", ["seed_pairs", "eval_pairs", "gold_pool"])
def test_shipped_pairs_reverify(name):
    rows = _load(name)
    assert rows
    for row in rows:
        assert set(row) == {"id", "prompt", "chosen", "rejected", "constraint"}
        _check_prompt_row(row)
        for side in ("chosen", "rejected"):
            assert len(row[side]) == 1 and row[side][0]["role"] == "assistant"
            assert isinstance(row[side][0]["content"], str)
        assert verify(row["chosen"][0]["content"], row["constraint"]), row["id"]
        assert not verify(row["rejected"][0]["content"], row["constraint"]), row["id"]
    assert len({r["id"] for r in rows}) == len(rows)


def test_shipped_splits_disjoint_by_question():
    qsets = {}
    for name in SHIPPED:
        qsets[name] = {tasks.question_index(r) for r in _load(name)}
    assert not qsets["seed_pairs"] & qsets["prompts"]
    assert not qsets["seed_pairs"] & qsets["eval_prompts"]
    assert not qsets["prompts"] & qsets["eval_prompts"]
    assert not qsets["eval_pairs"] & (qsets["seed_pairs"] | qsets["prompts"])
    eval_ids = {r["id"] for r in _load("eval_prompts")}
    assert {r["id"] for r in _load("eval_pairs")} <= eval_ids


def test_shipped_gold_pool_extends_the_seed_pairs_on_seed_questions_only():
    """gold_pool.jsonl (gold sizes past 150): seed_pairs.jsonl's rows first, unchanged, then at least 362 more, all
    of seed questions (never a pool, dev or eval question) and of prompts seed_pairs.jsonl does not hold."""
    from spa_lite.demo import build

    gold, seed = _load("gold_pool"), _load("seed_pairs")
    assert gold[: len(seed)] == seed
    assert len(gold) >= 512
    seed_questions = {tasks.question_index(r) for r in build.split_records(tasks.make_prompt_records(0), seed=0)[0]}
    assert {tasks.question_index(r) for r in gold} <= seed_questions
    others = {tasks.question_index(r) for name in ("prompts", "eval_prompts") for r in _load(name)}
    assert not seed_questions & others
    assert not {r["id"] for r in gold[len(seed):]} & {r["id"] for r in seed}


def test_shipped_build_info():
    try:
        path = demo_path("build_info")
    except FileNotFoundError:
        pytest.skip("demo:build_info not built")
    info = json.loads(path.read_text(encoding="utf-8"))
    for key in ("command", "seed", "counts", "per_kind", "wall_time_s"):
        assert key in info
    for name in SHIPPED:
        rows = _load(name)
        assert info["counts"][f"{name}.jsonl"] == len(rows)


def test_gold_candidates_are_unsampled_seed_question_prompts():
    """The gold pool's candidates: the seed candidates left unsampled, in order, then new kinds of the same
    questions; no id repeats, none is a sampled candidate's, and the list is the same on every call."""
    from spa_lite.demo import build

    seed_recs, _, _ = build.split_records(tasks.make_prompt_records(0), seed=0)
    cands = build.expand_seed_candidates(seed_recs, seed=0)
    got = build.gold_candidates(cands, 304, seed=0, kinds_per_question=10)
    assert got == build.gold_candidates(cands, 304, seed=0, kinds_per_question=10)
    assert got[: len(cands) - 304] == cands[304:]
    ids = [r["id"] for r in got]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {r["id"] for r in cands[:304]}
    assert {tasks.question_index(r) for r in got} <= {tasks.question_index(r) for r in cands}
    assert len(got) > 3 * (len(cands) - 304)  # the new kinds add prompts, not only the leftovers


def test_split_helpers_are_disjoint_and_deterministic():
    from spa_lite.demo import build

    records = tasks.make_prompt_records(0)
    s1, p1, e1 = build.split_records(records, seed=0)
    s2, p2, e2 = build.split_records(records, seed=0)
    assert (s1, p1, e1) == (s2, p2, e2)
    assert len(p1) >= 300 and 90 <= len(e1) <= 110
    qs = [{tasks.question_index(r) for r in part} for part in (s1, p1, e1)]
    assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])
    assert len(s1) + len(p1) + len(e1) == len(records)
    cands = build.expand_seed_candidates(s1, seed=0)
    assert {tasks.question_index(r) for r in cands} == qs[0]
    assert len({r["id"] for r in cands}) == len(cands) > len(s1)


def test_grown_prompt_sets_match_the_builder(tmp_path):
    """The shipped pool and eval prompts are what `build --prompts-only` writes (pure, no model): thousands
    of pool prompts and 500+ held-out prompts, the earlier records kept, questions still disjoint."""
    from spa_lite.demo import build

    for name in ("prompts", "eval_prompts", "build_info"):
        suffix = ".json" if name == "build_info" else ".jsonl"
        (tmp_path / f"{name}{suffix}").write_bytes(demo_path(name).read_bytes())
    assert build.main(["--out", str(tmp_path), "--seed", "0", "--prompts-only"]) == 0
    for name in ("prompts", "eval_prompts"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == demo_path(name).read_bytes(), name
    pool, evals = _load("prompts"), _load("eval_prompts")
    assert len(pool) >= 2000 and len(evals) >= 500
    records = tasks.make_prompt_records(0)
    _, p0, e0 = build.split_records(records, seed=0)
    assert {r["id"] for r in p0} <= {r["id"] for r in pool}
    assert {r["id"] for r in e0} <= {r["id"] for r in evals}
    # every question keeps distinct kinds (ids are question x kind)
    assert {tasks.question_index(r) for r in pool} == {tasks.question_index(r) for r in p0}


def test_grow_records_deterministic_and_bounded():
    from spa_lite.demo import build

    base = tasks.make_prompt_records(0)[:30]
    a = build.grow_records(base, 5, seed=0, salt="x")
    assert a == build.grow_records(base, 5, seed=0, salt="x")
    assert a != build.grow_records(base, 5, seed=1, salt="x")
    per_q = {}
    for r in a:
        per_q.setdefault(tasks.question_index(r), []).append(r["constraint"]["kind"])
    assert all(len(k) == max(5, len(set(k))) and len(set(k)) == len(k) for k in per_q.values())
    assert a[: len(base)] != [] and all(r in a for r in base)


def test_each_kind_record_is_consistent():
    """Each kind's template names exactly its parameters, and its verifier accepts or rejects a drawn instance."""
    import random
    import string

    for name, kind in tasks.KINDS.items():
        assert kind.name == name and kind.weight > 0
        placeholders = {f for _, f, _, _ in string.Formatter().parse(kind.template) if f}
        assert placeholders == set(kind.params), name
        constraint = tasks.sample_constraint(name, "How do I boil fresh pasta?", random.Random(0))
        assert set(constraint["params"]) == set(kind.params)
        assert isinstance(verify("Some answer, here.", constraint), bool)
    assert tasks.QUESTIONS_FILE.is_file() and tasks.QUESTIONS_FILE.parent == DATA_DIR


def test_gold_pool_refuses_another_split_before_sampling(tmp_path, monkeypatch):
    """--gold-pool under another --seed / --limit / pool or eval size than build_info.json's, for fewer pairs than
    seed_pairs.jsonl holds, or beside prompts that share a seed question, stops naming the file and field before any model loads,
    and writes nothing."""
    import shutil

    from spa_lite import models
    from spa_lite.demo import build

    for name in ("build_info.json", "seed_pairs.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        shutil.copy(demo_path(name.split(".")[0]), tmp_path / name)
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("sampled despite a bad split"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    with pytest.raises(SystemExit, match=r"build_info.json: field 'seed' is 0 .* --seed 1"):
        build.main(["--out", str(tmp_path), "--seed", "1", "--gold-pool", "512"])
    with pytest.raises(SystemExit, match=r"build_info.json: field 'limit' is None .* --limit 10: .* without --limit"):
        build.main(["--out", str(tmp_path), "--seed", "0", "--limit", "10", "--gold-pool", "512"])
    # another pool or eval size moves questions between the splits: the seed candidates no longer match the build's
    for opt in (["--pool-size", "200"], ["--eval-size", "60"]):
        with pytest.raises(SystemExit, match=r"field 'prompts_sampled.seed_candidates' is 462 but this split has"):
            build.main(["--out", str(tmp_path), "--seed", "0", *opt, "--gold-pool", "512"])
    with pytest.raises(SystemExit, match=r"--gold-pool 100: .* at least 150"):
        build.main(["--out", str(tmp_path), "--seed", "0", "--gold-pool", "100"])
    seed_row = json.loads((tmp_path / "seed_pairs.jsonl").read_text().splitlines()[0])
    prompts = (tmp_path / "eval_prompts.jsonl").read_text().splitlines()
    prompts[2] = json.dumps({"id": seed_row["id"], "prompt": seed_row["prompt"], "constraint": seed_row["constraint"]})
    (tmp_path / "eval_prompts.jsonl").write_text("\n".join(prompts) + "\n")
    before["eval_prompts.jsonl"] = (tmp_path / "eval_prompts.jsonl").read_bytes()
    with pytest.raises(SystemExit, match=r"eval_prompts.jsonl:3: field 'id' is a question of the gold pool"):
        build.main(["--out", str(tmp_path), "--seed", "0", "--gold-pool", "512"])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
