"""Atomic artifact writing and line-checked JSONL reading.

Every artifact goes to a temporary file in the same directory and is renamed into place, so a crash
never leaves a half-written file where a later stage (or a resume) would trust it.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from spa_lite.errors import DataError

_BOM = b"\xef\xbb\xbf"


_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries that write through their own C/Rust code report a full disk: safetensors ("No space left on device
# (os error 28)"), torch's zip writer ("file write failed" loses the errno; it is only read as a full disk when
# the free space says so, see ``_space_errno``)
_SPACE_TEXTS = {errno.ENOSPC: ("no space left on device", "os error 28"),
                errno.EDQUOT: ("disk quota exceeded", "os error 122")}


def _space_errno(e: BaseException, path: Path) -> int | None:
    """ENOSPC or EDQUOT when ``e`` (an OSError, or a library's error wrapping one) means the disk is full."""
    if isinstance(e, OSError):
        return e.errno if e.errno in _SPACE_ERRNOS else None
    text = str(e).lower()
    for code, needles in _SPACE_TEXTS.items():
        if any(n in text for n in needles):
            return code
    if "file write failed" in text:  # torch.save's writer drops the errno: a full disk is one likely cause
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path if path.is_dir() else path.parent).free < 1 << 20:
                return errno.ENOSPC
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes} bytes"


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, nbytes: int | None = None) -> Iterator[None]:
    """Name ``path`` (and the bytes being written) in a full-disk or over-quota error raised inside the block,
    whoever raised it (Python's file I/O, safetensors, torch): one ``OSError`` with that errno and the path, which
    the CLI prints as one ``error:`` line."""
    path = Path(path)
    try:
        yield
    except Exception as e:
        code = _space_errno(e, path)
        if code is None or (isinstance(e, OSError) and e.filename):  # already names its file
            raise
        what = f"{os.strerror(code)} (writing {_size(nbytes)})" if nbytes is not None else os.strerror(code)
        raise OSError(code, what, str(path)) from None


def write_new_file(path: str | os.PathLike, data: bytes, dest: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` (in a folder that ``atomic_dir`` renames into place) and flush it to the disk; a
    full disk names ``dest``, the file it becomes."""
    _durable_write(Path(path), data, Path(dest) if dest is not None else None)


def _durable_write(path: Path, data: bytes, dest: Path | None = None) -> None:
    """Write ``data`` to the new file ``path`` and flush it to the disk (an error names ``dest``, the file it
    becomes): every artifact's bytes pass here, so the crash tests count and fail these calls."""
    with disk_errors(dest or path, len(data)), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, renamed into place (0644)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _durable_write(Path(tmp), data, path)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts (and shipped demo data) are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_text(f, text: str, path: str | os.PathLike) -> None:
    """Append ``text`` to the open log ``f`` (metrics.jsonl, flags.jsonl) and flush it; a full disk names ``path``.
    A torn last line is cut when the run resumes (``checkpoint.trim_metrics``)."""
    with disk_errors(path, len(text)):
        f.write(text)
        f.flush()


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
                if lineno == 1 and raw.startswith(_BOM):  # editors on Windows start UTF-8 files with a BOM
                    raw = raw[len(_BOM):]
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
    except zlib.error as e:  # damaged compressed data (the CRC is only checked at the end)
        raise DataError(path, None, None, f"damaged gzip data near line {lineno + 1} ({e}); download or compress "
                                          f"it again") from None


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record); a malformed line raises DataError naming file and line (``.gz`` is read
    decompressed)."""
    path = Path(path)
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        rec = parse_json(line, path, lineno)
        if not isinstance(rec, dict):
            raise DataError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def parse_json(text: str, path: Path, lineno: int | None = None) -> Any:
    """``json.loads``, every way it refuses a text raised as DataError naming the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        line = e.lineno if lineno is None else lineno
        raise DataError(path, line, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(path, lineno, None, "JSON nested too deeply to read") from None
    except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise DataError(path, lineno, None, f"malformed JSON ({e})") from None


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON file (a UTF-8 byte-order mark is allowed); bad bytes or JSON raise DataError naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(path, None, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, None, f"not UTF-8 text (byte offset {e.start})") from None
    return parse_json(text, path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_obj(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
