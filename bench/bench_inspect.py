"""The label page at scale: build time and file size of `spa-lite inspect` for a D_i of N pairs, and (with
Debian's chromium + chromium-driver and selenium) how long headless Chromium takes to open it, filter and sort.

    .venv/bin/python bench/bench_inspect.py [--pairs 10000] [--repeats 3] [--out bench/results/inspect_page.json]

The pairs are a fake run's (tests/fake_run.py: demo-task prompts, responses of 40-2,100 characters); nothing is
trained. Writes one JSON file (not a bench_* ratio file: bench/summarize.py skips it; RESULTS.md has a section).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fake_run import write_fake_run  # noqa: E402

from spa_lite.inspect_page import page_payload, render  # noqa: E402


def build_times(run: Path, repeats: int) -> dict:
    """Seconds to read D_i and build the payload, to render the HTML, and the file's size."""
    load, rend, html = [], [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        payload = page_payload(run, 1)
        t1 = time.perf_counter()
        html = render(payload)
        t2 = time.perf_counter()
        load.append(t1 - t0)
        rend.append(t2 - t1)
    out = run / "iter1" / "inspect.html"
    out.write_text(html, encoding="utf-8")
    return {"payload_s": load, "render_s": rend, "total_s_median": statistics.median(a + b for a, b in zip(load, rend)),
            "html_bytes": len(html.encode("utf-8")), "data_jsonl_bytes": (run / "iter1/expand/data.jsonl").stat().st_size,
            "page": out}


def browser_times(page: Path, repeats: int) -> dict | None:
    """Milliseconds in headless Chromium: navigation to the first page of cards, then one filter and one sort
    (each handler re-filters and re-sorts all pairs and draws 20 cards)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not chromium or not driver:
        return None
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tempfile.mkdtemp()}", "--window-size=1280,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    res: dict = {"open_ms": [], "filter_ms": [], "sort_ms": [], "js_heap_mb": []}
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            drv.get(page.as_uri())
            while not drv.execute_script("return document.querySelectorAll('article.pair').length"):
                time.sleep(0.01)
            res["open_ms"].append(1000 * (time.perf_counter() - t0))
            res["filter_ms"].append(drv.execute_script(
                "var t = performance.now(); document.querySelector('[data-filter=low]').click();"
                "return performance.now() - t"))
            res["sort_ms"].append(drv.execute_script(
                "var s = document.querySelector('select[id^=sort-]'); s.value = 'conf_asc'; var t = performance.now();"
                "s.dispatchEvent(new Event('change')); return performance.now() - t"))
            res["js_heap_mb"].append(drv.execute_script(
                "return performance.memory ? performance.memory.usedJSHeapSize / 1048576 : null"))
        res["chromium"] = drv.capabilities.get("browserVersion")
    finally:
        drv.quit()
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "inspect_page.json"))
    a = ap.parse_args(argv)
    start_load = os.getloadavg()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        run = write_fake_run(Path(tmp) / "runs" / "bench", n=a.pairs, xss=False, filler=30)
        build = build_times(run, a.repeats)
        page = build.pop("page")
        browser = browser_times(page, a.repeats)
    result = {"benchmark": "inspect_page", "command": " ".join([sys.executable] + sys.argv),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "uptime_at_start": uptime,
                          "loadavg_at_start": list(start_load), "loadavg_at_end": list(os.getloadavg())},
              "pairs": a.pairs, "repeats": a.repeats, "build": build, "browser": browser}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
