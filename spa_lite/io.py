"""Atomic artifact writing and line-checked JSONL reading.

Every artifact goes to a temporary file in the same directory and is renamed into place, so a crash
never leaves a half-written file where a later stage (or a resume) would trust it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spa_lite.errors import DataError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts (and shipped demo data) are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: JSON has no NaN (Python's ``NaN`` token is not
    JSON, and other readers refuse it). Readers take a null where a number belongs as NaN (the training summary
    skips it, ``spa_lite.report`` plots it as a gap)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    """Strict JSON: non-finite floats become null (see ``finite_or_null``)."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kw)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    lines = [dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        world_readable(tmp)  # mkdtemp makes 0700 (and some writers 0600): a serving container runs as another uid
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def world_readable(root: str | os.PathLike) -> None:
    """Folders 0755 and files 0644 or more (as ``save_pretrained`` leaves them), under and including ``root``."""
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o7777
        os.chmod(p, mode | (0o755 if p.is_dir() else 0o644))


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (line_number, text) of a UTF-8 text file, gzip-compressed when its name ends in ``.gz``.

    Raises:
        DataError: naming the file and line of bytes that are not UTF-8, or a compressed file that is
            truncated or not gzip.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    lineno = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield lineno, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(path, lineno, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                        f"{len(raw[: e.start].decode('utf-8', 'replace')) + 1})") from None
    except EOFError:
        raise DataError(path, None, None, f"truncated gzip file (it ends inside line {lineno + 1}); "
                                          f"download or compress it again") from None
    except gzip.BadGzipFile as e:
        raise DataError(path, None, None, f"not a gzip file ({e})") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record); a malformed line raises DataError naming file and line (``.gz`` is read
    decompressed)."""
    path = Path(path)
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
