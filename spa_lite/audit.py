"""Human audit of a run's preference labels: the pairs a label page shows, the blind sample, the annotations
saved to ``iter{i}/audit.jsonl`` and how often each judge agrees with the person.

A pair is named by its row (0-based, the order of records in the pair file, the same index training's
flags.jsonl calls ``row``) and a short hash of its prompt and responses, so an annotation made on one file is
refused on a file whose row says something else. An annotation records which stored response was shown as
A, so the human label is stored as ``chosen`` / ``rejected`` / ``tie`` / ``skip`` relative to the file's label.
The audit file is append-only; the last annotation of a row counts (a person may change their mind).
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from pathlib import Path

import yaml

from spa_lite.data import load_pairs, pair_texts, resolve_data_path
from spa_lite.demo.tasks import verify
from spa_lite.errors import DataError, SpaError
from spa_lite.io import atomic_write_jsonl, read_json, read_jsonl
from spa_lite.layout import audit_path, data_path
from spa_lite.metrics import wilson_interval

__all__ = ["AnnotationError", "CHOICES", "AUDIT_FILE", "pairs_path", "load_rows", "blind_sample",
           "make_annotation", "read_annotations", "latest", "AuditLog", "import_annotations", "agreement",
           "run_agreement", "apply_human_labels", "pair_key"]

AUDIT_FILE = "audit.jsonl"  # spa_lite.layout.audit_path names it
CHOICES = ("A", "B", "tie", "skip")
_HUMAN = {"tie": "tie", "skip": "skip"}


class AnnotationError(SpaError):
    """An annotation that does not fit the pair file; ``field`` names the bad field (row, key, choice, a_is)."""

    def __init__(self, where: str, field: str | None, message: str):
        super().__init__(f"{where}: " + (f"field '{field}': " if field else "") + message)
        self.field = field


def pair_key(prompt: list[dict], chosen: str, rejected: str) -> str:
    """12 hex digits naming a pair's content: an annotation is refused on a row whose content differs."""
    blob = json.dumps([prompt, chosen, rejected], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def pairs_path(run_path: str | Path, iteration: int) -> Path | str:
    """D_i's file; for iteration 0 the gold seed pairs D0 the run was made from (its seed manifest or recipe.yaml)."""
    run_path = Path(run_path)
    if iteration > 0:
        return data_path(run_path, iteration)
    manifest = run_path / "seed" / "manifest.json"
    if manifest.exists():
        spec = read_json(manifest).get("inputs", {}).get("seed_pairs")
    elif (run_path / "recipe.yaml").exists():
        spec = (yaml.safe_load((run_path / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("data", {}).get(
            "seed_pairs")
    else:
        spec = None
    if not spec:
        raise SpaError(f"{run_path} names no seed pairs (no seed/manifest.json or recipe.yaml): give the file with "
                       "--pairs")
    return resolve_data_path(spec)


def _flags(run_path: Path, iteration: int) -> set[int] | None:
    """Rows training flagged at least once (Eq. 10-12), or None when iteration ``iteration`` was not trained."""
    path = Path(run_path) / f"iter{iteration}" / "train" / "flags.jsonl"
    if iteration == 0 or not path.exists():
        return None
    return {r["row"] for _, r in read_jsonl(path) if r.get("flagged") and isinstance(r.get("row"), int)}


def _verdict(row: dict) -> str | None:
    """The demo verifier on the stored label: agrees | disagrees | undecided (both or neither pass); None
    without a constraint or for a kind this version does not know."""
    c = row.get("constraint")
    if not isinstance(c, dict):
        return None
    try:
        vc, vr = verify(row["chosen"], c), verify(row["rejected"], c)
    except ValueError:
        return None
    return "agrees" if vc and not vr else "disagrees" if vr and not vc else "undecided"


def load_rows(run_path: str | Path, iteration: int, pairs: str | Path | None = None) -> tuple[list[dict], dict]:
    """The pairs of D_i (iteration 0: D0) as the page shows them, and what is known about their source.

    Each row: ``row``, ``key``, ``prompt`` (messages), ``chosen``, ``rejected``, the judge's fields when the file
    has them (p_y1, confidence, chosen_is_y1, logratio_*, len_*, truncated_*), ``flagged`` (None when the
    iteration was not trained) and ``verifier`` (None without a demo constraint).

    Raises:
        DataError: naming file, line and field for a malformed record.
    """
    run_path = Path(run_path)
    src = pairs if pairs is not None else pairs_path(run_path, iteration)
    if iteration > 0 and pairs is None and not Path(src).exists():
        raise SpaError(f"{src} does not exist: run `spa-lite expand --iter {iteration}` first")
    if iteration == 0 or (pairs is not None and not str(src).endswith((".jsonl", ".jsonl.gz"))):
        recs = load_pairs(str(src))  # any format `split` and seed-dpo read
    else:
        recs = [pair_texts(r, src, line) for line, r in read_jsonl(src)]
    flagged = _flags(run_path, iteration) if pairs is None else None
    rows = []
    for k, r in enumerate(recs):
        prompt = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": str(r["prompt"])}]
        out = {"row": k, "key": pair_key(prompt, r["chosen"], r["rejected"]), "id": r.get("id"), "prompt": prompt,
               "chosen": r["chosen"], "rejected": r["rejected"]}
        for f in ("p_y1", "confidence", "chosen_is_y1", "logratio_chosen", "logratio_rejected", "len_chosen",
                  "len_rejected", "truncated_chosen", "truncated_rejected"):
            if f in r:
                out[f] = r[f]
        out["flagged"] = None if flagged is None else k in flagged
        out["verifier"] = _verdict(r)
        rows.append(out)
    judge = "gold" if iteration == 0 else "eq7"
    manifest = run_path / f"iter{iteration}" / "expand" / "manifest.json"
    if iteration > 0 and manifest.exists():
        name = read_json(manifest).get("recipe", {}).get("expand", {}).get("judge", "logprob")
        judge = "eq7" if name == "logprob" else str(name)  # expand.judge: logprob is Eq. 7
    return rows, {"source": str(src), "judge": judge, "trained": flagged is not None}


def blind_sample(n_rows: int, n: int, seed: int) -> list[dict]:
    """A seeded sample of ``min(n, n_rows)`` rows in random order, each with the side shown as A."""
    rng = random.Random(seed)
    rows = rng.sample(range(n_rows), min(n, n_rows))
    return [{"row": r, "a_is": rng.choice(("chosen", "rejected"))} for r in rows]


def make_annotation(rows: list[dict], rec: object, iteration: int, where: str = "annotation") -> dict:
    """An annotation checked against the pairs: ``{row, key, choice, a_is}`` in, the stored record out.

    Raises:
        SpaError: naming ``where`` and the field, for an unknown row, a row whose content changed, a choice not
            in A/B/tie/skip or a side that is not chosen/rejected.
    """
    if not isinstance(rec, dict):
        raise AnnotationError(where, None, f"expected a JSON object, got {type(rec).__name__}")
    row = rec.get("row")
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(rows):
        raise AnnotationError(where, "row", f"unknown pair {row!r} (the file has rows 0..{len(rows) - 1})")
    if rec.get("key") != rows[row]["key"]:
        raise AnnotationError(where, "key", f"{rec.get('key')!r} is not row {row}'s ({rows[row]['key']}); the "
                              "annotation was made on another version of the pair file")
    choice = rec.get("choice")
    if choice not in CHOICES:
        raise AnnotationError(where, "choice", f"{choice!r} is not one of {', '.join(CHOICES)}")
    a_is = rec.get("a_is")
    if a_is not in ("chosen", "rejected"):
        raise AnnotationError(where, "a_is", f"{a_is!r} is not chosen or rejected")
    b_is = "rejected" if a_is == "chosen" else "chosen"
    human = _HUMAN.get(choice) or (a_is if choice == "A" else b_is)
    t = rec.get("time") if isinstance(rec.get("time"), str) else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"row": row, "key": rows[row]["key"], "iteration": iteration, "choice": choice, "a_is": a_is,
            "human": human, "time": t}


def read_annotations(path: str | Path) -> list[dict]:
    """The records of an audit.jsonl (empty when it does not exist)."""
    path = Path(path)
    return [r for _, r in read_jsonl(path)] if path.exists() else []


def latest(annotations: list[dict]) -> dict[int, dict]:
    """Row -> its last annotation."""
    return {a["row"]: a for a in annotations}


class AuditLog:
    """``iter{i}/audit.jsonl`` of one run, appended one annotation at a time; each write replaces the file
    atomically, so a crash or a closed tab never leaves it half-written. Thread-safe (the server's handler
    threads share one)."""

    def __init__(self, run_path: str | Path, iteration: int, rows: list[dict]):
        self.path, self.iteration, self.rows = audit_path(run_path, iteration), iteration, rows
        self._lock = threading.Lock()

    def add(self, rec: object, where: str = "annotation") -> dict:
        """Check ``rec`` (see ``make_annotation``), append it and return the stored record."""
        ann = make_annotation(self.rows, rec, self.iteration, where)
        with self._lock:
            atomic_write_jsonl(self.path, read_annotations(self.path) + [ann])
        return ann

    def all(self) -> list[dict]:
        with self._lock:
            return read_annotations(self.path)


def _records_of(path: Path) -> list[tuple[str, object]]:
    """(where, record) of a downloaded audit file: a JSON list, ``{"annotations": [...]}`` or JSON Lines."""
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return [(f"{path}:{line}", r) for line, r in read_jsonl(path)]
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), list):
        obj = obj["annotations"]
    if isinstance(obj, dict):
        return [(f"{path}:1", obj)]
    if not isinstance(obj, list):
        raise DataError(path, None, None, "expected annotations: a JSON list, {\"annotations\": [...]} or JSON Lines")
    return [(f"{path}: annotation {k + 1}", r) for k, r in enumerate(obj)]


def import_annotations(path: str | Path, run_path: str | Path, iteration: int,
                       pairs: str | Path | None = None) -> dict:
    """Check every annotation of a downloaded file against D_i, then append the new ones to the run's audit.jsonl.

    All are checked before anything is written, so a bad file changes nothing. Records already in the audit
    (same row, choice, side and time) are not added twice.

    Returns:
        {"read", "added", "duplicates", "path"}.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    rows, _ = load_rows(run_path, iteration, pairs)
    checked = []
    for where, rec in _records_of(path):
        if isinstance(rec, dict) and rec.get("iteration") not in (None, iteration):
            raise AnnotationError(where, "iteration", f"{rec['iteration']!r}, but importing into iteration {iteration}")
        checked.append(make_annotation(rows, rec, iteration, where))
    out = audit_path(run_path, iteration)
    old = read_annotations(out)
    seen = {(a["row"], a["choice"], a["a_is"], a["time"]) for a in old}
    new = [a for a in checked if (a["row"], a["choice"], a["a_is"], a["time"]) not in seen]
    if new:
        atomic_write_jsonl(out, old + new)
    return {"read": len(checked), "added": len(new), "duplicates": len(checked) - len(new), "path": str(out)}


def _rate(hits: list[bool], **extra) -> dict:
    n, k = len(hits), sum(hits)
    lo, hi = wilson_interval(k, n)
    return {"n": n, "agree": k, "rate": k / n if n else None, "ci_low": lo if n else None,
            "ci_high": hi if n else None, **extra}


def agreement(rows: list[dict], annotations: list[dict], judge: str = "eq7") -> dict:
    """How often each judge picks the response the person preferred, on the audited pairs (last annotation per
    row), with a Wilson 95% interval. Ties and skips are excluded from the rates and counted.

    Judges: ``judge`` (the file's label: chosen over rejected), ``verifier`` (on the pairs it decides), and the
    file's label separately on pairs training flagged and did not flag (when the iteration was trained).
    """
    last = [a for a in latest(annotations).values() if a["row"] < len(rows) and rows[a["row"]]["key"] == a["key"]]
    decided = [a for a in last if a["human"] in ("chosen", "rejected")]
    out = {"audited": len(last), "ties": sum(a["human"] == "tie" for a in last),
           "skips": sum(a["human"] == "skip" for a in last), "stale": len(latest(annotations)) - len(last)}
    judges = {judge: _rate([a["human"] == "chosen" for a in decided])}
    ver = [(a, rows[a["row"]]["verifier"]) for a in decided if rows[a["row"]]["verifier"] in ("agrees", "disagrees")]
    if ver:
        judges["verifier"] = _rate([(a["human"] == "chosen") == (v == "agrees") for a, v in ver])
    if any(rows[a["row"]]["flagged"] is not None for a in decided):
        for name, want in ((f"{judge} on flagged pairs", True), (f"{judge} on unflagged pairs", False)):
            judges[name] = _rate([a["human"] == "chosen" for a in decided if rows[a["row"]]["flagged"] is want])
    out["judges"] = judges
    return out


def run_agreement(run_path: str | Path, iterations: int) -> dict:
    """``agreement`` for every pair file of a run that has an audit: {"D_0": ..., "D_1": ...}; the pairs are read
    again, so annotations of rows that changed since are counted as ``stale``, not used."""
    out = {}
    for i in range(iterations + 1):
        anns = read_annotations(audit_path(run_path, i))
        if anns:
            rows, info = load_rows(run_path, i)
            out[f"D_{i}"] = agreement(rows, anns, info["judge"])
    return out


def apply_human_labels(rows: list[dict], annotations: list[dict]) -> tuple[list[dict], dict]:
    """D_i's pairs with each audited pair's human label (``train.audit_labels``): a pair the person preferred
    the other way has chosen and rejected swapped; ties, skips and annotations of rows whose content changed
    leave the self-label. ``rows`` are D_i's records with text responses, in file order.

    Returns:
        (rows, counts): counts has ``gold`` (pairs labelled by the person), ``gold_flipped`` (of those, the
        ones whose self-label was wrong), ``self`` (the rest) and ``audit_ties``/``audit_skips``/``audit_stale``.
    """
    out = [dict(r) for r in rows]
    counts = {"gold": 0, "gold_flipped": 0, "audit_ties": 0, "audit_skips": 0, "audit_stale": 0}
    for a in latest(annotations).values():
        r = out[a["row"]] if 0 <= a["row"] < len(out) else None
        if r is None or pair_key(r["prompt"], r["chosen"], r["rejected"]) != a["key"]:
            counts["audit_stale"] += 1
            continue
        if a["human"] in ("tie", "skip"):
            counts["audit_ties" if a["human"] == "tie" else "audit_skips"] += 1
            continue
        counts["gold"] += 1
        r["label_source"] = "human"
        if a["human"] == "rejected":
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            counts["gold_flipped"] += 1
    counts["self"] = len(out) - counts["gold"]
    return out, counts
