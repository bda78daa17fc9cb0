"""`spa-lite inspect` and `spa-lite audit import`: the label page of a pair file, its server, and annotations
downloaded from the page."""

from __future__ import annotations

from pathlib import Path

from spa_lite.audit import audit_path, import_annotations
from spa_lite.errors import SpaError
from spa_lite.inspect_page import make_server, write_page
from spa_lite.ui import console


def _run_dir(run: Path) -> Path:
    if not run.is_dir():
        raise SpaError(f"{run} is not a run directory (runs/<name>, made by `spa-lite run` or its stages)")
    return run


def inspect(run: Path, iteration: int, *, pairs: str | None, out: Path | None, serve: bool, port: int,
            sample: int, seed: int) -> Path | None:
    """Write the page (or, with ``serve``, serve it on 127.0.0.1 until Ctrl-C)."""
    run = _run_dir(run)
    if not serve:
        path = write_page(run, iteration, out, pairs=pairs, sample=sample, seed=seed)
        console.print(f"written: {path} (open it in a browser; the blind audit's annotations are downloaded from the "
                      f"page, then `spa-lite audit import FILE --run {run} --iter {iteration}`)")
        return path
    if pairs is not None:
        raise SpaError("--serve saves annotations of the run's own pair file; leave out --pairs")
    srv = make_server(run, iteration, sample=sample, seed=seed, port=port)
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    console.print(f"serving {url} (loopback only); each annotation is written to {audit_path(run, iteration)}. "
                  "Ctrl-C stops.")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return None


def audit_import(file: Path, run: Path, iteration: int) -> dict:
    """Check a downloaded annotation file against the run's pairs and append it to the audit."""
    res = import_annotations(file, _run_dir(run), iteration)
    console.print(f"{res['read']} annotations read, {res['added']} added, {res['duplicates']} already there: "
                  f"{res['path']}; `spa-lite eval --audit-only --recipe {run}/recipe.yaml` reports the agreement")
    return res
