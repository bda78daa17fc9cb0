"""The label page (`spa-lite inspect`), the audit file, its import, the loopback server and the eval report's
human agreement, on a fake run (tests/fake_run.py; nothing trained). The page in a real browser:
tests/test_inspect_browser.py."""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import invoke, ok
from fake_run import XSS, write_fake_run

from spa_lite.audit import (
    AnnotationError,
    AuditLog,
    agreement,
    apply_human_labels,
    blind_sample,
    import_annotations,
    load_rows,
    make_annotation,
    read_annotations,
)
from spa_lite.demo.tasks import verify
from spa_lite.inspect_page import make_server, page_payload, render
from spa_lite.layout import audit_path


@pytest.fixture
def run(tmp_path) -> Path:
    return write_fake_run(tmp_path / "runs" / "demo", n=40)


def _ann(rows, row, choice, a_is, t="2026-12-04T00:00:00Z"):
    return {"row": row, "key": rows[row]["key"], "choice": choice, "a_is": a_is, "time": t}


def test_rows_carry_fields_flags_and_verifier(run):
    rows, info = load_rows(run, 1)
    raw = [json.loads(x) for x in (run / "iter1/expand/data.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and info["judge"] == "eq7" and info["trained"]
    assert [r["flagged"] for r in rows] == [k % 7 == 3 for k in range(40)]  # flags.jsonl's rows
    for r, x in zip(rows, raw):
        assert r["prompt"] == x["prompt"] and r["chosen"] == x["chosen"][0]["content"]
        assert r["confidence"] == x["confidence"] and r["len_rejected"] == x["len_rejected"]
        vc, vr = verify(r["chosen"], x["constraint"]), verify(r["rejected"], x["constraint"])
        assert r["verifier"] == ("agrees" if vc and not vr else "disagrees" if vr and not vc else "undecided")
    assert {r["verifier"] for r in rows} >= {"agrees", "disagrees"}  # both cases are exercised
    assert len({r["key"] for r in rows}) == 40


def test_seed_pairs_page_and_untrained_iteration(run):
    rows, info = load_rows(run, 0)
    assert info["judge"] == "gold" and len(rows) == 6 and rows[0]["chosen"] == "A careful gold answer 0."
    assert audit_path(run, 0) == run / "d0" / "audit.jsonl"  # not in seed/, which `seed-dpo --force` clears
    (run / "iter1/train/flags.jsonl").unlink()
    rows, info = load_rows(run, 1)
    assert not info["trained"] and all(r["flagged"] is None for r in rows)


def _embedded(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="spa-data-[0-9a-f]+">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_page_embeds_data_as_inert_json(run):
    payload = page_payload(run, 1, sample=10)
    html = render(payload)
    data = _embedded(html)
    assert data["rows"][0]["rejected"].startswith(XSS[0])  # the payload survives, byte for byte
    assert {**json.loads(json.dumps(payload)), "standalone": True} == data
    start = html.index('type="application/json"')
    body = html[html.index(">", start) + 1: html.index("</script>", start)]
    assert "<" not in body  # no "</script>" or "<!--" from the data can end or change the element
    template = (Path(__file__).parent.parent / "spa_lite" / "inspect_page.html").read_text()
    assert html.count("<script") == template.count("<script")


def test_page_builds_text_only_and_fetches_nothing():
    template = (Path(__file__).parent.parent / "spa_lite" / "inspect_page.html").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in template
    urls = set(re.findall(r"https?://[^\s\"')]+", template))
    assert urls == {"http://www.w3.org/2000/svg"}  # an XML namespace name, never fetched
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", template)


def test_fragment_for_notebooks_has_unique_ids(run):
    a, b = (render(page_payload(run, 1), fragment=True) for _ in range(2))
    assert not a.lstrip().lower().startswith("<!doctype") and "<div class=\"spa-inspect\"" in a
    ids = lambda h: set(re.findall(r'id="(spa-(?:data|inspect)-[0-9a-f]+)"', h))  # noqa: E731
    assert len(ids(a)) == 2 and not ids(a) & ids(b)


def test_blind_sample_is_seeded_and_balanced():
    s = blind_sample(1000, 50, seed=3)
    assert s == blind_sample(1000, 50, seed=3) and s != blind_sample(1000, 50, seed=4)
    assert len({x["row"] for x in s}) == 50 and {x["a_is"] for x in s} == {"chosen", "rejected"}
    assert [x["row"] for x in blind_sample(5, 50, seed=0)] and len(blind_sample(5, 50, seed=0)) == 5


def test_annotation_maps_the_shown_side_to_the_label(run):
    rows, _ = load_rows(run, 1)
    assert make_annotation(rows, _ann(rows, 2, "A", "chosen"), 1)["human"] == "chosen"
    assert make_annotation(rows, _ann(rows, 2, "A", "rejected"), 1)["human"] == "rejected"
    assert make_annotation(rows, _ann(rows, 2, "B", "rejected"), 1)["human"] == "chosen"
    assert make_annotation(rows, _ann(rows, 2, "tie", "chosen"), 1)["human"] == "tie"
    for bad, field in ((_ann(rows, 2, "C", "chosen"), "choice"), ({**_ann(rows, 2, "A", "chosen"), "row": 40}, "row"),
                       ({**_ann(rows, 2, "A", "chosen"), "key": rows[3]["key"]}, "key"),
                       (_ann(rows, 2, "A", "y1"), "a_is"), ({**_ann(rows, 2, "A", "chosen"), "row": True}, "row")):
        with pytest.raises(AnnotationError) as e:
            make_annotation(rows, bad, 1, "here")
        assert e.value.field == field and str(e.value).startswith(f"here: field '{field}'")


def test_agreement_counts_by_hand(run):
    """8 of 10 decided pairs keep the judge's label: Wilson 95% (0.490157, 0.943319), the worked example of
    spa_lite.metrics.wilson_interval; 2 ties and 1 skip are counted apart; a later annotation replaces one."""
    rows, _ = load_rows(run, 1)
    anns = [_ann(rows, k, "A", "chosen") for k in range(8)] + [_ann(rows, 8, "B", "chosen"), _ann(rows, 9, "A", "rejected")]
    anns += [_ann(rows, 10, "tie", "chosen"), _ann(rows, 11, "tie", "rejected"), _ann(rows, 12, "skip", "chosen")]
    anns = [_ann(rows, 0, "B", "chosen")] + anns  # changed mind on row 0: the later "A" counts
    rec = [make_annotation(rows, a, 1) for a in anns]
    res = agreement(rows, rec, "eq7")
    eq7 = res["judges"]["eq7"]
    assert (res["audited"], res["ties"], res["skips"], eq7["n"], eq7["agree"]) == (13, 2, 1, 10, 8)
    assert eq7["ci_low"] == pytest.approx(0.490157, abs=1e-6) and eq7["ci_high"] == pytest.approx(0.943319, abs=1e-6)
    decided = [a for a in rec[1:] if a["human"] in ("chosen", "rejected")]
    ver = [a for a in decided if rows[a["row"]]["verifier"] in ("agrees", "disagrees")]
    hits = sum((a["human"] == "chosen") == (rows[a["row"]]["verifier"] == "agrees") for a in ver)
    assert res["judges"]["verifier"]["n"] == len(ver) and res["judges"]["verifier"]["agree"] == hits
    flagged = [a for a in decided if rows[a["row"]]["flagged"]]
    assert res["judges"]["eq7 on flagged pairs"]["n"] == len(flagged) == 1  # rows 3 and 10 flagged; 10 is a tie


def test_import_checks_everything_before_writing(run, tmp_path):
    rows, _ = load_rows(run, 1)
    good = [{**_ann(rows, k, "A", "chosen", f"t{k}"), "iteration": 1} for k in range(3)]
    f = tmp_path / "download.jsonl"
    f.write_text("".join(json.dumps(a) + "\n" for a in good))
    assert import_annotations(f, run, 1) == {"read": 3, "added": 3, "duplicates": 0, "path": str(audit_path(run, 1))}
    assert import_annotations(f, run, 1)["added"] == 0  # a second import adds nothing
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_ann(rows, 5, "A", "chosen")) + "\n" + json.dumps(_ann(rows, 6, "maybe", "chosen")) + "\n")
    before = audit_path(run, 1).read_bytes()
    with pytest.raises(AnnotationError, match=rf"{re.escape(str(bad))}:2: field 'choice'"):
        import_annotations(bad, run, 1)
    assert audit_path(run, 1).read_bytes() == before
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"annotations": [{**good[0], "iteration": 2}]}))
    with pytest.raises(AnnotationError, match="field 'iteration'"):
        import_annotations(other, run, 1)


def _post(url, body, ctype="application/json", origin=None):
    req = urllib.request.Request(url, data=body if isinstance(body, bytes) else json.dumps(body).encode(),
                                 headers={"Content-Type": ctype, **({"Origin": origin} if origin else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_says_when_it_cannot_write(run, monkeypatch):
    import spa_lite.audit as audit_mod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit_mod, "atomic_write_jsonl", full)
    srv = make_server(run, 1, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rows, _ = load_rows(run, 1)
        st, res = _post(f"http://127.0.0.1:{srv.server_address[1]}/api/annotate", _ann(rows, 0, "A", "chosen"))
        assert st == 500 and "No space left on device" in res["error"] and "audit.jsonl" in res["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_server_saves_each_annotation_and_refuses_bad_input(run):
    srv = make_server(run, 1, sample=10, port=0)
    host, port = srv.server_address
    assert host == "127.0.0.1"
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        rows, _ = load_rows(run, 1)
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert _embedded(page)["mode"] == "server"
        st, body = _post(base + "/api/annotate", _ann(rows, 4, "B", "chosen"))
        assert st == 200 and body["annotation"]["human"] == "rejected" and body["count"] == 1
        assert read_annotations(audit_path(run, 1))[0]["row"] == 4  # on disk as soon as it is made
        cases = [(_ann(rows, 4, "maybe", "chosen"), 400, "choice"), ({**_ann(rows, 4, "A", "chosen"), "row": 99}, 404, "row"),
                 ({**_ann(rows, 4, "A", "chosen"), "key": "0" * 12}, 409, "key"), (b"{not json", 400, "not JSON"),
                 (b"[1]", 400, "expected a JSON object")]
        for body, code, words in cases:
            st, res = _post(base + "/api/annotate", body)
            assert st == code and words in res["error"]
        assert _post(base + "/api/annotate", _ann(rows, 4, "A", "chosen"), ctype="text/plain")[0] == 415
        assert _post(base + "/api/annotate", _ann(rows, 4, "A", "chosen"), origin="http://evil.example")[0] == 403
        assert _post(base + "/api/elsewhere", _ann(rows, 4, "A", "chosen"))[0] == 404
        rebound = urllib.request.Request(base + "/", headers={"Host": f"evil.example:{port}"})
        with pytest.raises(urllib.error.HTTPError) as e:  # DNS rebinding: another name for 127.0.0.1
            urllib.request.urlopen(rebound, timeout=10)
        assert e.value.code == 403
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # a claimed size over the limit: not read
        conn.request("POST", "/api/annotate", body=b"{}", headers={"Content-Type": "application/json",
                                                                   "Content-Length": str(64 * 1024 + 1)})
        assert conn.getresponse().status == 413
        conn.close()
        assert len(read_annotations(audit_path(run, 1))) == 1  # nothing refused was written
        assert sorted(p.name for p in run.rglob("*") if p.is_file() and "audit" in p.name) == ["audit.jsonl"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_cli_inspect_import_and_eval_audit_only(run, tmp_path):
    res = ok(invoke("inspect", run, "--iter", 1, "--sample", 5))
    assert (run / "iter1" / "inspect.html").exists() and "inspect.html" in res.output
    ok(invoke("inspect", run, "--iter", 0, "--out", tmp_path / "d0.html"))
    assert _embedded((tmp_path / "d0.html").read_text())["judge"] == "gold"
    rows, _ = load_rows(run, 1)
    f = tmp_path / "dl.jsonl"
    f.write_text("".join(json.dumps(_ann(rows, k, "A" if k % 3 else "B", "chosen", f"t{k}")) + "\n" for k in range(6)))
    assert "6 annotations read, 6 added" in ok(invoke("audit", "import", f, "--run", run, "--iter", 1)).output
    res = ok(invoke("eval", "--recipe", run / "recipe.yaml", "--run-dir", run.parent, "--audit-only"))
    rep = json.loads((run / "eval" / "audit.json").read_text())
    eq7 = rep["human_audit"]["D_1"]["judges"]["eq7"]
    assert (eq7["n"], eq7["agree"]) == (6, 4) and "agreement with the human audit" in res.output
    from spa_lite.api import open_run

    assert open_run(run / "recipe.yaml", run_dir=run.parent).audit() == rep["human_audit"]
    bad = invoke("audit", "import", tmp_path / "missing.jsonl", "--run", run)
    assert bad.exit_code == 2 and "file not found" in bad.output
    empty = write_fake_run(tmp_path / "runs" / "fresh", n=3)
    res = invoke("eval", "--recipe", empty / "recipe.yaml", "--run-dir", empty.parent, "--audit-only")
    assert res.exit_code == 2 and "has no audit" in res.output


# ------------------------------------------------------------------------------ train.audit_labels


def test_human_labels_replace_self_labels_by_hand(run):
    rows, _ = load_rows(run, 1)
    texts = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    anns = [make_annotation(rows, a, 1) for a in (_ann(rows, 0, "A", "chosen"), _ann(rows, 1, "A", "rejected"),
                                                  _ann(rows, 2, "tie", "chosen"), _ann(rows, 3, "skip", "rejected"),
                                                  _ann(rows, 1, "B", "chosen"))]  # row 1: changed to rejected again
    stale = {**anns[0], "row": 5, "key": "0" * 12}
    out, counts = apply_human_labels(texts, anns + [stale])
    assert counts == {"gold": 2, "gold_flipped": 1, "audit_ties": 1, "audit_skips": 1, "audit_stale": 1, "self": 38}
    assert (out[1]["chosen"], out[1]["rejected"]) == (texts[1]["rejected"], texts[1]["chosen"])
    assert out[0] == {**texts[0], "label_source": "human"} and out[2] == texts[2] and out[4] == texts[4]
    assert texts[1]["chosen"] == rows[1]["chosen"]  # the input is not modified


def test_audit_labels_keep_old_hashes_and_hash_the_audit(tiny_recipe):
    from spa_lite.layout import Stage
    from spa_lite.runs import _loop_key, stage_hash

    off, on = tiny_recipe(), tiny_recipe(**{"train.audit_labels": True})
    assert "audit_labels" not in _loop_key(off.train)  # runs made before the setting keep their hashes
    st = Stage("train", 1)
    h_on = stage_hash(on, st)
    assert h_on != stage_hash(off, st)
    audit_path(on.run_path, 1).parent.mkdir(parents=True)
    audit_path(on.run_path, 1).write_text('{"row": 0}\n')
    assert stage_hash(on, st) != h_on  # a new annotation makes a new stage, not a "complete" one


def test_train_stage_trains_on_the_human_labels(tiny_recipe, monkeypatch):
    from spa_lite.api import run_stage
    from spa_lite.stages import train as train_mod

    recipe = tiny_recipe(iterations=1, **{"train.audit_labels": True})
    run_stage(recipe, "seed-dpo")
    run_stage(recipe, "expand", 1)
    rows, _ = load_rows(recipe.run_path, 1)
    assert len(rows) >= 3
    log = AuditLog(recipe.run_path, 1, rows)
    for a in (_ann(rows, 0, "A", "rejected"), _ann(rows, 1, "B", "rejected"), _ann(rows, 2, "tie", "chosen")):
        log.add(a)
    seen = {}
    real = train_mod.tokenize_pairs

    def spy(tok, rs, *args):
        seen["rows"] = rs
        return real(tok, rs, *args)

    monkeypatch.setattr(train_mod, "tokenize_pairs", spy)
    m = run_stage(recipe, "train", 1)
    assert m["summary"]["labels"] == {"gold": 2, "gold_flipped": 1, "audit_ties": 1, "audit_skips": 0,
                                      "audit_stale": 0, "self": len(rows) - 2}
    got = seen["rows"]
    assert (got[0]["chosen"], got[0]["rejected"]) == (rows[0]["rejected"], rows[0]["chosen"])  # A was rejected
    assert (got[1]["chosen"], got[1]["rejected"]) == (rows[1]["chosen"], rows[1]["rejected"])  # B was rejected
    assert (got[2]["chosen"], got[2]["rejected"]) == (rows[2]["chosen"], rows[2]["rejected"])  # tie: self-label
    from spa_lite.options import EvalOptions
    from spa_lite.stages import evaluate

    opts = EvalOptions(flip=0, pass_rate=False, tag="full")
    rep = evaluate.run(recipe, opts)  # a full eval carries the audit too
    eq7 = rep["human_audit"]["D_1"]["judges"]["eq7"]
    assert (eq7["n"], eq7["agree"], rep["human_audit"]["D_1"]["ties"]) == (2, 1, 1)


def test_cli_refusals_are_one_line(run, tmp_path):
    res = invoke("inspect", tmp_path / "nope")
    assert res.exit_code == 2 and "is not a run directory" in res.output
    res = invoke("inspect", run, "--iter", 2)
    assert res.exit_code == 2 and "spa-lite expand --iter 2" in res.output
    res = invoke("inspect", run, "--serve", "--pairs", run / "iter1/expand/data.jsonl")
    assert res.exit_code == 2 and "leave out --pairs" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"row": 0, "key": "x", "choice": "A", "a_is": "chosen"}\n')
    res = invoke("audit", "import", bad, "--run", run, "--iter", 1)
    assert res.exit_code == 2 and f"{bad}:1: field 'key'" in "".join(res.output.split("\n"))
    assert not audit_path(run, 1).exists()
