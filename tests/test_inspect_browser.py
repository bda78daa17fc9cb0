"""The label page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium; nothing is
downloaded): responses that carry script stay text, filters, the blind audit by keyboard in server mode and by
download in file mode, then the eval report. Without a browser these tests skip, saying why.

The page's screenshot in README (docs/inspect.png) is taken by ``test_browse_filters_and_sort``, and written there
with ``SPA_LITE_DOCS_SCREENSHOT=1 pytest tests/test_inspect_browser.py -k browse_filters``."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import invoke, ok
from fake_run import write_fake_run

from spa_lite.audit import blind_sample, load_rows, read_annotations
from spa_lite.inspect_page import make_server, page_payload, render, write_page
from spa_lite.layout import audit_path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'spa-lite[test]')"
    if not CHROMIUM or not DRIVER:
        return "no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--window-size=1280,900"):
        opts.add_argument(a)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    drv.downloads = downloads
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture
def run(tmp_path) -> Path:
    return write_fake_run(tmp_path / "runs" / "demo", n=40)


def _wait(cond, what: str, timeout: float = 15.0):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# the page's stored picks for this run and sample, read back from localStorage
STORED = ("var k = Object.keys(window.localStorage).filter(function (k) { return k.indexOf('spa-lite-audit:') === 0; });"
          " return k.length ? JSON.parse(window.localStorage.getItem(k[0])) : [];")


def _cards(drv) -> list[int]:
    return drv.execute_script("return Array.from(document.querySelectorAll('article.pair')).map("
                              "a => +a.getAttribute('data-row'))")


def _keys(drv, keys: str) -> None:
    from selenium.webdriver.common.by import By

    drv.find_element(By.TAG_NAME, "body").send_keys(keys)


def _text(drv, css: str) -> str | None:
    """textContent of the first match, read in one script call (the page re-renders: element handles go stale)."""
    return drv.execute_script("var e = document.querySelector(arguments[0]); return e && e.textContent", css)


def _xss_fired(drv):
    return drv.execute_script("return window.__xss === undefined ? null : String(window.__xss)")


def test_script_in_responses_is_shown_as_text(browser, run):
    browser.get(write_page(run, 1).as_uri())
    _wait(lambda: _cards(browser), "the pairs")
    time.sleep(0.3)  # an <img onerror> would fire once the (missing) image fails to load
    assert _xss_fired(browser) is None
    shown = browser.execute_script("return Array.from(document.querySelectorAll('.resp pre')).map(p => p.textContent)")
    assert any("<script>window.__xss = 'script'</script>" in t for t in shown)
    assert any("onerror=" in t for t in shown)


def _broken_page(run: Path, tmp_path: Path, break_page: str, keep_csp: bool) -> Path:
    """The page with one of its two defences removed: text through innerHTML, or the JSON embedded with "<" raw;
    without its Content-Security-Policy unless ``keep_csp``."""
    html = render(page_payload(run, 1))
    if break_page == "innerHTML":
        text_node = "document.createTextNode(String(k))"
        assert text_node in html
        html = html.replace(text_node, "(function (s) { var x = document.createElement('span'); x.innerHTML = s; "
                                       "return x; })(String(k))")
    else:
        html = html.replace("\\u003c", "<")
    if not keep_csp:
        html, n = re.subn(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", html)
        assert n == 1
    bad = tmp_path / f"bad-{break_page}-{keep_csp}.html"
    bad.write_text(html, encoding="utf-8")
    return bad


@pytest.mark.parametrize("break_page", ["innerHTML", "raw_json"])
def test_the_xss_check_fails_on_a_page_that_renders_html(browser, run, tmp_path, break_page):
    """The check above is not vacuous: a page that puts text through innerHTML (the <img onerror> runs), or
    embeds the JSON without escaping "<" (the "</script><script>" breaks out), sets the flag. (The payloads quote
    with ' so that JSON's escaping of " does not make the breakout a syntax error.) The page's CSP is taken out
    here: the next test shows that it alone also stops both."""
    browser.get(_broken_page(run, tmp_path, break_page, keep_csp=False).as_uri())
    assert _wait(lambda: _xss_fired(browser), "the injected script", timeout=5)


@pytest.mark.parametrize("break_page", ["innerHTML", "raw_json"])
def test_content_security_policy_is_a_second_defence(browser, run, tmp_path, break_page):
    browser.get(_broken_page(run, tmp_path, break_page, keep_csp=True).as_uri())
    if break_page == "innerHTML":  # the page's own (nonced) script still runs and draws the pairs
        _wait(lambda: _cards(browser), "the pairs")
    time.sleep(0.5)
    assert _xss_fired(browser) is None


def test_browse_filters_and_sort(browser, run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    rows, _ = load_rows(run, 1)
    browser.get(write_page(run, 1).as_uri())
    _wait(lambda: _cards(browser), "the pairs")
    assert _cards(browser) == list(range(20))  # first page of 20 in file order
    browser.find_element(By.CSS_SELECTOR, "[data-filter=flagged]").click()
    assert _cards(browser) == [r["row"] for r in rows if r["flagged"]]
    browser.find_element(By.CSS_SELECTOR, "[data-filter=vdis]").click()  # filters combine
    assert _cards(browser) == [r["row"] for r in rows if r["flagged"] and r["verifier"] == "disagrees"]
    browser.find_element(By.CSS_SELECTOR, "[data-filter=flagged]").click()
    browser.find_element(By.CSS_SELECTOR, "[data-filter=vdis]").click()
    browser.find_element(By.CSS_SELECTOR, "[data-filter=low]").click()
    assert _cards(browser) == [r["row"] for r in rows if r["confidence"] < 0.6]
    browser.find_element(By.CSS_SELECTOR, "[data-filter=low]").click()
    Select(browser.find_element(By.CSS_SELECTOR, "select[id^=sort-]")).select_by_value("conf_asc")
    want = sorted(rows, key=lambda r: (r["confidence"], r["row"]))
    assert _cards(browser) == [r["row"] for r in want[:20]]
    _keys(browser, "n")  # next page by key
    assert _cards(browser) == [r["row"] for r in want[20:40]]
    _keys(browser, "jj")  # the third pair of the page is the current one
    assert browser.execute_script("return +document.querySelector('.pair.cur').getAttribute('data-row')") == want[22]["row"]
    # the README screenshot: a run without script-carrying responses, first page
    clean = write_fake_run(tmp_path / "runs" / "clean", n=40, seed=1, xss=False)
    browser.get(write_page(clean, 1).as_uri())
    _wait(lambda: _cards(browser), "the pairs")
    shot = tmp_path / "inspect.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SPA_LITE_DOCS_SCREENSHOT") == "1":  # README's picture; not rewritten on every test run
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / "inspect.png")


def _open_audit(browser) -> None:
    """Press "a" until the audit tab shows: a key sent while a loaded machine is still settling the page can be
    lost, and the tab itself is what the tests read."""
    end = time.time() + 15.0
    while True:
        _keys(browser, "a")
        try:
            _wait(lambda: browser.execute_script("return document.querySelector('[data-tab=audit]') !== null"),
                  "audit tab", timeout=3.0)
            return
        except AssertionError:
            if time.time() > end:
                raise


def _audit_five(browser, keys: str, server: bool) -> None:
    _open_audit(browser)
    for k, key in enumerate(keys, start=1):
        _keys(browser, key)
        _wait(lambda k=k: (_text(browser, ".aprog") or "").startswith(f"{k} of "), f"annotation {k}")
        if server:
            status = _text(browser, "[id^=status-]")
            assert status.startswith("saved to"), status


def _expected(rows, sample, keys: str) -> list[tuple[int, str]]:
    """(row, human label) for the first len(keys) pairs of the sample, decoded by hand from the key pressed."""
    out = []
    for s, key in zip(sample, keys):
        other = "rejected" if s["a_is"] == "chosen" else "chosen"
        out.append((s["row"], {"1": s["a_is"], "2": other, "3": "tie", "0": "skip"}[key]))
    return out


def _eval_counts(run: Path, expected: list[tuple[int, str]]) -> None:
    ok(invoke("eval", "--recipe", run / "recipe.yaml", "--run-dir", run.parent, "--audit-only"))
    rep = json.loads((run / "eval" / "audit.json").read_text())["human_audit"]["D_1"]
    decided = [h for _, h in expected if h in ("chosen", "rejected")]
    assert rep["audited"] == 5 and rep["ties"] == sum(h == "tie" for _, h in expected)
    assert rep["skips"] == sum(h == "skip" for _, h in expected)
    assert (rep["judges"]["eq7"]["n"], rep["judges"]["eq7"]["agree"]) == (len(decided), decided.count("chosen"))


def test_server_mode_audit_by_keyboard(browser, run):
    srv = make_server(run, 1, sample=10, seed=7, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        _wait(lambda: _cards(browser), "the pairs")
        keys = "12301"
        _audit_five(browser, keys, server=True)
        rows, _ = load_rows(run, 1)
        expected = _expected(rows, blind_sample(len(rows), 10, 7), keys)
        saved = read_annotations(audit_path(run, 1))  # written by the server, one per key press
        assert [(a["row"], a["human"]) for a in saved] == expected
        browser.refresh()  # reopening the page resumes where the audit stopped
        _wait(lambda: _cards(browser), "the pairs")
        _open_audit(browser)
        _wait(lambda: _text(browser, ".aprog") == "5 of 10 audited", "the restored progress: 5 of 10 audited")
        srv.log.rows = [{**r, "key": "0" * 12} for r in rows]  # as if D_1 changed under the server: refused
        _keys(browser, "1")  # the page shows the server's reason, and does not count the pick
        _wait(lambda: (_text(browser, "[id^=status-]") or "").startswith("NOT SAVED"), "the error")
        assert "another version of the pair file" in _text(browser, "[id^=status-]")
        assert _text(browser, ".aprog") == "5 of 10 audited"
    finally:
        srv.shutdown()
        srv.server_close()
    _eval_counts(run, expected)


def test_file_mode_audit_by_download(browser, run):
    from selenium.webdriver.common.by import By

    browser.get(write_page(run, 1, sample=10, seed=3).as_uri())
    _wait(lambda: _cards(browser), "the pairs")
    keys = "21130"
    _audit_five(browser, keys, server=False)
    assert not audit_path(run, 1).exists()  # the static page writes nothing by itself
    browser.find_element(By.CSS_SELECTOR, "[id^=download-]").click()
    files = _wait(lambda: [p for p in browser.downloads.glob("*.jsonl")], "the download")
    assert files[0].name == "audit-demo-iter1.jsonl"
    ok(invoke("audit", "import", files[0], "--run", run, "--iter", 1))
    rows, _ = load_rows(run, 1)
    expected = _expected(rows, blind_sample(len(rows), 10, 3), keys)
    assert [(a["row"], a["human"]) for a in read_annotations(audit_path(run, 1))] == expected
    _eval_counts(run, expected)
    stored = browser.execute_script(STORED)
    assert sorted(a["row"] for a in stored) == sorted(r for r, _ in expected)  # what the page kept, before the reload
    # the browser kept the picks: a reload resumes the audit. Chromium hands a page's localStorage writes to its
    # browser process and disk asynchronously; CI under load once reloaded into an empty store (stop 34). A user
    # who reloads again later gets the picks back, so up to three reloads are allowed, and more than one warns.
    seen = []
    for _ in range(3):
        browser.refresh()
        _wait(lambda: _cards(browser), "the pairs")
        _open_audit(browser)
        try:
            _wait(lambda: _text(browser, ".aprog") == "5 of 10 audited", "the restored progress", timeout=5.0)
            break
        except AssertionError:
            seen.append((_text(browser, ".aprog"), len(browser.execute_script(STORED))))
    else:
        raise AssertionError(f"no reload restored '5 of 10 audited'; each showed (progress, picks in storage): {seen}")
    if seen:
        warnings.warn(f"the picks came back only on reload {len(seen) + 1}; before: {seen}", stacklevel=1)


def test_notebook_fragment_takes_keys_only_when_focused(browser, run, tmp_path):
    """Inline in a notebook the page must not eat keys typed into code cells (contenteditable editors and
    textareas); clicked on, it takes them."""
    from selenium.webdriver.common.by import By

    frag = render(page_payload(run, 1, sample=5), fragment=True)
    doc = tmp_path / "notebook.html"
    doc.write_text("<!doctype html><meta charset=utf-8><textarea id=cell></textarea>"
                   "<div id=editor contenteditable=true>x</div><div id=out>" + frag + "</div>", encoding="utf-8")
    browser.get(doc.as_uri())
    _wait(lambda: _cards(browser), "the pairs")
    browser.find_element(By.ID, "cell").send_keys("a1n")
    browser.find_element(By.ID, "editor").send_keys("a1")
    _keys(browser, "a")  # the body: not the page either
    assert browser.find_element(By.ID, "cell").get_attribute("value") == "a1n"
    assert browser.execute_script("return document.querySelector('.spa-inspect').getAttribute('data-tab')") == "browse"
    browser.find_element(By.CSS_SELECTOR, ".spa-inspect h1").click()
    browser.switch_to.active_element.send_keys("a")
    _wait(lambda: browser.execute_script("return document.querySelector('[data-tab=audit]') !== null"), "audit tab")
    browser.switch_to.active_element.send_keys("1")
    _wait(lambda: (_text(browser, ".aprog") or "").startswith("1 of 5"), "an annotation by key")
    browser.switch_to.active_element.send_keys("2")  # the focus stayed in the page after it re-rendered
    _wait(lambda: (_text(browser, ".aprog") or "").startswith("2 of 5"), "a second annotation by key")
