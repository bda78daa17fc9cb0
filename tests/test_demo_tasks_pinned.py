"""Pins the demo task's generated records byte for byte.

The hashes were computed from the code before the questions and constraint kinds moved to a data file
(commit 664dcef); a refactor of spa_lite/demo/tasks.py must not change any record, parameter draw,
instruction text or verdict for the same seed, or the shipped demo data would no longer be reproducible.
"""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from spa_lite.demo import tasks

RESPONSES = [
    "", "Boil it for ten minutes.", "- one\n- two\n- three", "FIRST BOIL WATER.", "sure, first boil it.\n\nthen drain.",
    '{"answer": 1}', '```json\n{"tips": 2}\n```', "Yes I hope this helps.", "Okay. Add salt. Taste. Serve.", "word " * 40,
]

PINNED = {
    "questions": "49277357d3b2dd2283c0d76bc1cffe35be29fb35db69179f641dc099594b58bf",
    "kinds": "86fa4149575011fe2306f9d2f6cf7275adfce83a6aff926daa6f14084b69f0fa",
    "weights": "5948f1decd321c899444b03af087b7a8c0ddd036925a40b5dec5c42abd612201",
    "low": "509d842375d1b42b0bf76ff8ef485078e44e706c792303cc01515b18a38c38dc",
    0: {
        "records": "8be83f0445389bce0e1d239a59127b5a715af86e6a9bc2d4a83efe34c81a0d8e",
        "verify": "23dd02d4eac9eef72b04773ad1668bcf9d16efb4b6263e98ca433a8f0a317a31",
        "describe": "71f1f28aa3135b783a338eef92825ec9d6163fe69432427b7508683face09685",
        "extra": "22862c77d96be4af72d67f1fd62ae1a76f095f9d81eedbe98629a4bc62a08319",
        "weighted": "555bae257fa8670343ad766c6bd92ee2b8f988c290f4d30811051768f37a5d48",
    },
    1: {
        "records": "788f06a88898bcb27bb1c3be37b776e2607306e7c5ae6a9d20ae94bde29c6d03",
        "verify": "5aa3aaaa1305f5ab3754332ec3f4ef42fc562bb454ca77ccf15fdcd6040d4ba5",
        "describe": "504787fd837971afc1a0bcf4b0957d80cfb2b442e6e6c9d013da406442c7b822",
        "extra": "d950ccdb61373dd790e4233a1a2276b44bc74506044171726b285611ea23a099",
        "weighted": "7a6a3d6f22bf80f7d5a74d68b1e6b2d27f4dee71a02aa5952edb783c859347ea",
    },
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def test_tables_are_pinned():
    assert _hash(tasks.QUESTIONS) == PINNED["questions"]
    assert _hash(tasks.CONSTRAINT_KINDS) == PINNED["kinds"]
    assert _hash(tasks.KIND_WEIGHTS) == PINNED["weights"]
    assert _hash(sorted(tasks.LOW_SEPARATION_KINDS)) == PINNED["low"]


@pytest.mark.parametrize("seed", [0, 1])
def test_records_and_verdicts_are_pinned(seed):
    recs = tasks.make_prompt_records(seed)
    verdicts = [[tasks.verify(r, rec["constraint"]) for r in RESPONSES] for rec in recs[:400]]
    flat = [v for row in verdicts for v in row]
    assert any(flat) and not all(flat)  # the pinned verdicts are not constant
    assert _hash(recs) == PINNED[seed]["records"]
    assert _hash(verdicts) == PINNED[seed]["verify"]
    assert _hash([tasks.describe(rec["constraint"]) for rec in recs]) == PINNED[seed]["describe"]
    extra = [
        tasks.records_for_question(qi, tasks.CONSTRAINT_KINDS, seed=seed, salt="seed-extra")
        for qi in range(len(tasks.QUESTIONS))
    ]
    assert _hash(extra) == PINNED[seed]["extra"]
    rng = random.Random(seed)
    weights = {k: (0.1 if k in tasks.LOW_SEPARATION_KINDS else w) for k, w in tasks.KIND_WEIGHTS.items()}
    assert _hash([tasks._weighted_kinds(rng, k % 4, weights) for k in range(200)]) == PINNED[seed]["weighted"]
