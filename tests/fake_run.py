"""A fake run directory for the label page and the audit (tests and bench/bench_inspect.py): D_1 as expand writes
it, its manifest, training's flags.jsonl and a recipe.yaml naming gold seed pairs. Nothing is trained; the
pairs use the demo task's real constraints, so the verifier's verdicts are real."""

from __future__ import annotations

import json
import random
from pathlib import Path

# A response that would run script if the page parsed it as HTML: each sets window.__xss.
XSS = ["<script>window.__xss = 'script'</script>", "<img src=x onerror=\"window.__xss = 'img'\">",
       "</script><script>window.__xss = 'breakout'</script>", "<!--<script>window.__xss = 'comment'</script>-->"]


FILLER = " The answer goes on with one more sentence of ordinary prose here."


def _pair(i: int, rng: random.Random, xss: bool, filler: int = 0) -> dict:
    word = rng.choice(["river", "garden", "coffee", "music", "winter"])
    good = f"Here is an answer about the {word}, number {i}.\nIt keeps to the point.\n\n  indented line kept"
    bad = f"Something else entirely, number {i}." + (" and more words" * rng.randint(0, 30))
    if filler:  # longer responses, as a real D_i has (bench/bench_inspect.py)
        good, bad = good + FILLER * rng.randint(0, filler), bad + FILLER * rng.randint(0, filler)
    if xss and i < len(XSS):
        bad = XSS[i] + " " + bad
    p = rng.random()
    first = p > 0.5
    truth_good_is_y1 = rng.random() < 0.5
    y1, y2 = (good, bad) if truth_good_is_y1 else (bad, good)
    w, l = (y1, y2) if first else (y2, y1)
    lw, ll = len(w.split()) + 3, len(l.split()) + 3
    return {
        "id": f"q{i:05d}-c01",
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": f"Tell me about the {word}. Include the word \"{word}\" in your answer."}],
        "constraint": {"kind": "include_word", "params": {"word": word}},
        "chosen": [{"role": "assistant", "content": w}], "rejected": [{"role": "assistant", "content": l}],
        "p_y1": p, "confidence": max(p, 1 - p), "chosen_is_y1": first, "len_chosen": lw, "len_rejected": ll,
        "truncated_chosen": lw > 80, "truncated_rejected": ll > 80,
        "logratio_chosen": round(rng.gauss(0.5, 1), 4), "logratio_rejected": round(rng.gauss(-0.5, 1), 4),
    }


def write_fake_run(run: Path, n: int = 40, seed: int = 0, xss: bool = True, trained: bool = True,
                   filler: int = 0) -> Path:
    """``run`` with D_1 of ``n`` pairs (the first ones carrying ``XSS`` payloads when ``xss``), a complete expand
    manifest, flags.jsonl flagging every 7th row (``trained``) and 6 gold seed pairs named by recipe.yaml.
    ``filler``: up to this many more sentences (66 characters each) per response."""
    rng = random.Random(seed)
    d = run / "iter1" / "expand"
    d.mkdir(parents=True, exist_ok=True)
    rows = [_pair(i, rng, xss, filler) for i in range(n)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (d / "manifest.json").write_text(json.dumps({"stage": "iter1/expand", "status": "complete",
                                                 "recipe": {"expand": {"judge": "logprob"}}}))
    if trained:
        t = run / "iter1" / "train"
        t.mkdir(parents=True, exist_ok=True)
        flags = [{"step": 1 + k // 4, "pair": k, "row": k, "confidence": 0.5, "flagged": k % 7 == 3} for k in range(n)]
        (t / "flags.jsonl").write_text("".join(json.dumps(f) + "\n" for f in flags))
    seed_pairs = run.parent / f"{run.name}-seed.jsonl"
    gold = [{"prompt": [{"role": "user", "content": f"Gold question {k}?"}],
             "chosen": [{"role": "assistant", "content": f"A careful gold answer {k}."}],
             "rejected": [{"role": "assistant", "content": f"meh {k}"}]} for k in range(6)]
    seed_pairs.write_text("".join(json.dumps(g) + "\n" for g in gold))
    (run / "recipe.yaml").write_text(f"name: {run.name}\ndata:\n  seed_pairs: {seed_pairs}\n")
    return run
