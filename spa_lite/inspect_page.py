"""`spa-lite inspect`: one self-contained HTML page for a run's pair file (D_i, or the gold seed pairs D0), with
a blind audit, and a loopback-only server that saves each annotation to the run as it is made.

The page has no network dependency (styles and script inline): it opens from disk, and ``render(...,
fragment=True)`` is a string ``IPython.display.HTML`` shows in a notebook cell. The data travels as JSON in a
``<script type="application/json">`` element with every ``<`` escaped, and the script builds the DOM with text
nodes only: a prompt or response is shown as text whatever it contains.
"""

from __future__ import annotations

import json
import secrets
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from spa_lite.audit import AnnotationError, AuditLog, agreement, blind_sample, latest, load_rows, read_annotations
from spa_lite.io import atomic_write_text, dumps
from spa_lite.layout import audit_path
from spa_lite.metrics import confidence_histogram

__all__ = ["page_payload", "render", "write_page", "make_server", "default_page_path"]

MAX_BODY = 64 * 1024  # one annotation is ~200 bytes


def _template() -> str:
    return resources.files("spa_lite").joinpath("inspect_page.html").read_text(encoding="utf-8")


def page_payload(run_path: str | Path, iteration: int, *, pairs: str | Path | None = None, sample: int = 50,
                 seed: int = 0, mode: str = "file", rows: list[dict] | None = None, info: dict | None = None) -> dict:
    """What the page shows: the pairs, counts, the blind sample and the audit so far.

    Args:
        pairs: a pair file to show instead of the run's D_i (D0 for iteration 0).
        sample, seed: size and seed of the blind-audit sample.
        mode: ``file`` (annotations are downloaded) or ``server`` (each is posted to ``/api/annotate``).
        rows, info: ``load_rows``'s result, when the caller has it (the server reads the pairs once).
    """
    if rows is None or info is None:
        rows, info = load_rows(run_path, iteration, pairs)
    annotations = list(latest(read_annotations(audit_path(run_path, iteration))).values())
    conf = [r["confidence"] for r in rows if isinstance(r.get("confidence"), (int, float))]
    return {
        "run": str(run_path), "run_name": Path(run_path).name, "iteration": iteration, "mode": mode,
        "source": info["source"], "judge": info["judge"], "trained": info["trained"],
        "rows": [{k: v for k, v in r.items() if v is not None} for r in rows],
        "hist": confidence_histogram(conf) if conf else None,
        "sample": blind_sample(len(rows), sample, seed), "sample_seed": seed,
        "annotations": annotations, "agreement": agreement(rows, annotations, info["judge"]) if annotations else None,
        "api": "/api/annotate",
    }


def render(payload: dict, *, fragment: bool = False) -> str:
    """The page as HTML: a whole document, or (``fragment``) a block for a notebook output cell.

    Each render gets its own element ids, so several pages can share one notebook.
    """
    token, nonce = secrets.token_hex(4), secrets.token_urlsafe(16)
    # "<" never appears raw inside the JSON: no "</script>" or "<!--" in the data can end or change the element
    data = dumps({**payload, "standalone": not fragment}, ensure_ascii=False).replace("<", "\\u003c")
    body = _template().replace("__TOKEN__", token).replace("__NONCE__", nonce).replace("/*__PAYLOAD__*/", data)
    if fragment:
        return body
    title = f"spa-lite inspect: {payload['run_name']} D{payload['iteration']}"
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp(nonce)}\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_text(title)}</title></head>\n<body style=\"margin:0;background:#f7f7f5\">\n{body}\n</body></html>\n")


def csp(nonce: str) -> str:
    """The page's Content-Security-Policy, a second line of defence behind the text-only DOM: only the page's own
    script runs (no injected <script>, no inline event handler), nothing is loaded from anywhere, and requests go
    only to the serving origin (the --serve API)."""
    return (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; img-src data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'")


def _text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def default_page_path(run_path: str | Path, iteration: int) -> Path:
    """``RUN/iter{i}/inspect.html`` (``RUN/d0/inspect.html`` for D0), beside the audit file."""
    return audit_path(run_path, iteration).with_name("inspect.html")


def write_page(run_path: str | Path, iteration: int, out: str | Path | None = None, **kwargs) -> Path:
    """Write the page (keyword arguments as in ``page_payload``) to ``out`` (default ``default_page_path``)."""
    out = Path(out) if out is not None else default_page_path(run_path, iteration)
    atomic_write_text(out, render(page_payload(run_path, iteration, **kwargs)))
    return out


class _Handler(BaseHTTPRequestHandler):
    server: "_AuditServer"
    quiet = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: str, ctype: str = "application/json") -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}))

    def _foreign_host(self) -> bool:
        """A Host other than this server's loopback address (DNS rebinding: another site's name resolved to
        127.0.0.1) is refused, so no other site reads the pairs or writes the audit."""
        if self.headers.get("Host") in self.server.hosts:
            return False
        self._error(403, f"host {self.headers.get('Host')!r} refused; open http://127.0.0.1:{self.server.server_address[1]}/")
        return True

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        s = self.server
        if self._foreign_host():
            return
        if path in ("/", "/index.html"):
            self._send(200, render(page_payload(s.run_path, s.iteration, mode="server", rows=s.rows, info=s.info,
                                                sample=s.sample, seed=s.seed)), "text/html")
        elif path == "/api/audit":
            self._send(200, dumps({"annotations": s.log.all()}))
        else:
            self._error(404, f"no such page: {path}")

    def do_POST(self) -> None:  # noqa: N802
        if self._foreign_host():
            return
        if urlsplit(self.path).path != "/api/annotate":
            return self._error(404, f"no such endpoint: {self.path} (POST /api/annotate)")
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc not in self.server.hosts:
            # a page from another site open in the same browser must not write to the run
            return self._error(403, f"requests from {origin} are refused; open the page this server serves")
        if self.headers.get_content_type() != "application/json":
            return self._error(415, "send the annotation as application/json")
        length = self.headers.get("Content-Length") or "0"
        n = int(length) if length.isdigit() else -1
        if n <= 0 or n > MAX_BODY:
            return self._error(413 if n > MAX_BODY else 400,
                               f"Content-Length {length!r} (an annotation is 1 to {MAX_BODY} bytes)")
        try:
            rec = json.loads(self.rfile.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return self._error(400, f"body is not JSON: {e}")
        try:
            ann = self.server.log.add(rec, "annotation")
        except AnnotationError as e:
            status = {"row": HTTPStatus.NOT_FOUND, "key": HTTPStatus.CONFLICT}.get(e.field, HTTPStatus.BAD_REQUEST)
            return self._error(int(status), str(e))
        except OSError as e:  # a full disk, a read-only run: the page shows it and keeps the pick unsaved
            return self._error(500, f"cannot write {self.server.log.path}: {e}")
        self._send(200, dumps({"annotation": ann, "count": len(self.server.log.all()),
                               "path": str(self.server.log.path)}))


class _AuditServer(ThreadingHTTPServer):
    daemon_threads = True


def make_server(run_path: str | Path, iteration: int, *, pairs: str | Path | None = None, sample: int = 50,
                seed: int = 0, port: int = 0) -> _AuditServer:
    """A server for the page in server mode, bound to 127.0.0.1 only; each annotation is written atomically to
    the run's audit file (``spa_lite.layout.audit_path``) when it is posted. ``port`` 0 picks a free one.
    Call ``serve_forever()`` on it; ``server_address`` gives the port.
    """
    rows, info = load_rows(run_path, iteration, pairs)
    srv = _AuditServer(("127.0.0.1", port), _Handler)
    srv.run_path, srv.iteration, srv.rows, srv.info, srv.sample, srv.seed = run_path, iteration, rows, info, sample, seed
    srv.log = AuditLog(run_path, iteration, rows)
    p = srv.server_address[1]
    srv.hosts = {f"127.0.0.1:{p}", f"localhost:{p}"}
    return srv
