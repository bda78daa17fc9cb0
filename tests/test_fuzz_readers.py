"""Property-based fuzzing of every reader (issue 23): data files (JSONL, JSON, gzip, Parquet) through
``load_pairs`` and ``load_prompts`` and the `spa-lite split` command, and YAML recipes through ``load_recipe``
and the `spa-lite plan` command.

A valid file is mutated: random truncation, byte flips and insertions, a field replaced by a value of another
type, deep nesting, huge fields, other encodings (UTF-16/32, Latin-1, a byte-order mark, NUL and lone
surrogates). Every case must end in a correct load (records of the normalised shape) or in a DataError /
SpaError, which the CLI prints as one ``error:`` line with exit code 2: no other exception, no traceback, and a
case that runs past ``CASE_SECONDS`` fails (no hang).

The fast suite runs ``SPA_LITE_FUZZ_EXAMPLES`` cases per test (default 150, derandomized: the same cases on
every run); ``pytest -m bench tests/test_fuzz_readers.py`` runs thousands with fresh randomness and writes the
counts to bench/results/fuzz_readers_{data,recipes}.json (bench/RESULTS.md, "Fuzzing the readers").
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from conftest import invoke, write_pairs, write_prompts  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from spa_lite.config import Recipe, load_recipe  # noqa: E402
from spa_lite.data import load_pairs, load_prompts  # noqa: E402
from spa_lite.errors import DataError, SpaError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST_EXAMPLES = int(os.environ.get("SPA_LITE_FUZZ_EXAMPLES", "150"))
BENCH_EXAMPLES = int(os.environ.get("SPA_LITE_FUZZ_BENCH_EXAMPLES", "2000"))
LOAD_AT_IMPORT = os.getloadavg()
CASE_SECONDS = 30  # far above any case's time (the largest, a 4 MB field through Parquet, takes about a second)
FORMATS = ["jsonl", "json", "jsonl.gz", "parquet", "prompts.jsonl"]
KEYS = ["prompt", "chosen", "rejected", "id", "content", "role"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail a case that hangs: SIGALRM raises inside it."""
    def boom(signum, frame):
        raise TimeoutError(f"a case ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _base_rows(fmt: str, tmp: Path) -> list[dict]:
    writer = write_prompts if fmt == "prompts.jsonl" else write_pairs
    path = writer(tmp / f"base.{fmt}", 6)
    return [json.loads(x) for x in path.read_text().splitlines()]


def _serialize(rows: list, fmt: str, raw_value: str | None = None) -> bytes:
    """Rows as the bytes of a ``fmt`` file; ``raw_value`` (JSON text) replaces the placeholder string ``@RAW@``."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = [{k: json.dumps(v) if isinstance(v, (list, dict)) and k != "prompt" else v for k, v in r.items()}
                for r in rows]
        as_text = [{k: json.dumps(v) for k, v in r.items()} for r in rows]
        for table_rows in (flat, as_text):  # mixed or empty types in a column: the mutated values as JSON text
            buf = io.BytesIO()
            try:
                pq.write_table(pa.Table.from_pylist(table_rows), buf)
                break
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                continue
        return buf.getvalue()
    if fmt == "json":
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if raw_value is not None:
        text = text.replace('"@RAW@"', raw_value)
    return text.encode("utf-8", "surrogatepass")


@st.composite
def mutated_data(draw, tmp: Path, big: bool = False):
    """(file name, bytes): a valid pair or prompt file with one or more mutations (``big``: the bench's larger
    fields and deeper nesting)."""
    fmt = draw(st.sampled_from(FORMATS))
    rows = _base_rows(fmt, tmp)
    kind = draw(st.sampled_from(["bytes", "value", "nest", "huge", "encoding", "message"]))
    raw = None
    i = draw(st.integers(0, len(rows) - 1))
    key = draw(st.sampled_from(KEYS[:4]))
    if kind == "value":  # wrong types: any JSON value where a field belongs
        rows[i][key] = draw(json_values)
    elif kind == "message":  # a chat message with another type of role or content, or extra keys
        msgs = rows[i]["prompt"] if isinstance(rows[i].get("prompt"), list) else [{"role": "user", "content": "x"}]
        msgs[0][draw(st.sampled_from(["role", "content", draw(st.text(max_size=5))]))] = draw(json_values)
        rows[i]["prompt"] = msgs
    elif kind == "nest":  # deep nesting, up to far past Python's recursion limit
        depth = draw(st.sampled_from([10, 500, 1_500] + ([5_000, 100_000] if big else [])))
        rows[i][key] = "@RAW@"
        raw = "[" * depth + "]" * depth if draw(st.booleans()) else '{"a":' * depth + "1" + "}" * depth
    elif kind == "huge":  # one huge field: a long string, a long number, many messages
        size = draw(st.sampled_from([10_000, 1_000_000] + ([4_000_000, 16_000_000] if big else [])))
        what = draw(st.sampled_from(["text", "number", "messages"]))
        if what == "text":
            rows[i][key] = "x" * size
        elif what == "number":
            rows[i][key] = "@RAW@"
            raw = "9" * min(size, 100_000)
        else:
            rows[i]["prompt"] = [{"role": "user", "content": "hi"}] * min(size // 100, 20_000)
    data = _serialize(rows, fmt, raw)
    if kind == "encoding" and fmt != "parquet":  # a Parquet file's text is inside its own binary encoding
        enc = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "bom", "nul", "surrogate",
                                    "crlf", "u2028"]))
        text = data.decode("utf-8")
        if enc in {"utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252"}:
            data = text.replace("answer", "ánswer ✓" if enc.startswith("utf") else "ánswer").encode(enc, "replace")
        elif enc == "bom":
            data = b"\xef\xbb\xbf" + data
        elif enc == "nul":
            data = data.replace(b"answer", b"ans\x00wer", 1)
        elif enc == "surrogate":
            data = data.replace(b"answer", b"ans\\ud800wer", 1)
        elif enc == "crlf":
            data = data.replace(b"\n", b"\r\n")
        else:
            data = data.replace(b"answer", "ans\u2028wer".encode(), 1)
    if fmt == "jsonl.gz" and not draw(st.booleans()):
        data = gzip.compress(data, mtime=0)  # mutations below hit the compressed bytes
        gz_done = True
    else:
        gz_done = fmt != "jsonl.gz"
    if kind == "bytes" or draw(st.integers(0, 3)) == 0:
        data = _byte_mutations(draw, data)
    if not gz_done:
        data = gzip.compress(data, mtime=0)
    return f"case.{fmt}", data


def _byte_mutations(draw, data: bytes) -> bytes:
    """Random truncation, byte flips and inserted bytes."""
    buf = bytearray(data)
    for op in draw(st.lists(st.sampled_from(["truncate", "flip", "insert", "delete"]), min_size=1, max_size=4)):
        if not buf:
            break
        pos = draw(st.integers(0, len(buf) - 1))
        if op == "truncate":
            del buf[pos:]
        elif op == "flip":
            buf[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del buf[pos : pos + draw(st.integers(1, 16))]
    return bytes(buf)


def _check_pair(r: dict) -> None:
    assert isinstance(r["prompt"], list) and r["prompt"], r
    assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in r["prompt"]), r
    assert r["prompt"][-1]["content"].strip(), r  # blank prompts are dropped, never loaded
    assert isinstance(r["chosen"], str) and isinstance(r["rejected"], str), r
    assert r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"], r


def _check_prompt(r: dict) -> None:
    assert isinstance(r["prompt"], list) and r["prompt"], r
    assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in r["prompt"]), r
    assert r["prompt"][-1]["content"].strip(), r


def read_data_case(path: Path, counts: Counter, cli: bool) -> None:
    """The property for one data file: each reader loads it correctly or raises DataError/SpaError, and the
    command line prints that as one error line with exit code 2."""
    outcome = {}
    for name, reader, check in (("pairs", load_pairs, _check_pair), ("prompts", load_prompts, _check_prompt)):
        with time_limit(CASE_SECONDS):
            try:
                rows = reader(str(path))
            except (DataError, SpaError) as e:
                assert str(e).strip() and "\n" not in str(e).strip()
                if isinstance(e, DataError):
                    assert str(path) in str(e), str(e)
                outcome[name] = "error"
                counts[f"{name}: error"] += 1
                continue
        for r in rows:
            check(r)
        outcome[name] = "loaded"
        counts[f"{name}: loaded"] += 1
    if cli:
        with time_limit(CASE_SECONDS):
            r = invoke("split", path, "--out", path.parent / "split", "--seed-size", 1, "--iter-sizes", "1")
        _assert_cli_outcome(r, expect_error=outcome["pairs"] == "error")
        counts[f"cli: exit {r.exit_code}"] += 1


def _assert_cli_outcome(r, expect_error: bool) -> None:
    assert r.exit_code in (0, 2), f"exit {r.exit_code}\n{r.output}\n{r.exception!r}"
    assert "Traceback" not in r.output, r.output
    if expect_error or r.exit_code == 2:
        assert r.exit_code == 2, r.output
        assert sum(ln.startswith("error:") for ln in r.output.splitlines()) == 1, r.output


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Parquet goes through `datasets`, which caches every file it reads: keep that cache in the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return tmp_path


def _run_data_fuzz(tmp: Path, examples: int, derandomize: bool, counts: Counter) -> None:
    big = not derandomize
    n = {"case": 0}

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=mutated_data(tmp, big))
    def prop(case):
        name, data = case
        n["case"] += 1
        t = time.perf_counter()
        d = tmp / f"c{n['case']}"
        d.mkdir()
        path = d / name
        path.write_bytes(data)
        read_data_case(path, counts, cli=n["case"] % 3 == 0)  # every third case through the CLI as well
        if os.environ.get("SPA_LITE_FUZZ_PROFILE"):
            print(f"PROFILE {name} {len(data)} {time.perf_counter() - t:.3f}")

    prop()
    counts["cases"] += n["case"]


def test_fuzzed_data_files_load_or_fail_cleanly(datasets_cache):
    counts: Counter = Counter()
    _run_data_fuzz(datasets_cache, FAST_EXAMPLES, True, counts)
    assert counts["cases"] >= FAST_EXAMPLES // 2
    assert counts["pairs: error"] and counts["pairs: loaded"], counts  # the mutations reach both outcomes


# ------------------------------------------------------------------------------------ recipes


RECIPE_TEXTS = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.yaml"))}


@st.composite
def mutated_recipe(draw):
    text = RECIPE_TEXTS[draw(st.sampled_from(sorted(RECIPE_TEXTS)))]
    data = yaml.safe_load(text)
    kind = draw(st.sampled_from(["bytes", "value", "nest", "huge", "encoding", "yaml"]))
    if kind in {"value", "nest", "huge"}:
        section = draw(st.sampled_from(sorted(data)))
        target = data[section] if isinstance(data[section], dict) and draw(st.booleans()) else data
        key = draw(st.sampled_from(sorted(target))) if target and draw(st.booleans()) else draw(st.text(max_size=6))
        if kind == "value":
            target[key] = draw(json_values)
        elif kind == "huge":
            # PyYAML reads in pure Python (a 300 KB value took seconds on a loaded machine): the bench keeps CI's sizes
            size = draw(st.sampled_from([10_000, 100_000]))
            target[key] = "x" * size if draw(st.booleans()) else "@BIG@"
        text = yaml.safe_dump(data, sort_keys=False).replace("'@BIG@'", "9" * 5000)  # past int()'s digit limit
        if kind == "nest":
            depth = draw(st.sampled_from([10, 300, 1_500]))
            text += f"\n{key}: " + "[" * depth + "]" * depth + "\n"
    elif kind == "yaml":  # YAML's own features: anchors and aliases, tags, several documents, odd scalars
        text += draw(st.sampled_from([
            "\nx: &a [1, 2]\ny: *a\n", "\nseed: !!python/object:os.system ls\n", "\n---\nname: two\n",
            "\nseed: .nan\n", "\nseed: 0x1F\n", "\nseed: 1_000\n", "\nname: !!binary aGk=\n",
            "\niterations: !!float 2\n", "\n? [a, b]\n: 1\n", "\nmodel: *undefined\n", "\n\t- tab\n",
            "\nlol: &l [&k [1,1,1,1,1,1,1,1], *k, *k, *k, *k, *k, *k, *k]\n",
        ]))
    raw = text.encode("utf-8")
    if kind == "encoding":
        enc = draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "bom", "nul", "crlf"]))
        if enc in {"utf-16", "utf-32"}:
            raw = text.encode(enc)
        elif enc == "latin-1":
            raw = (text + "\n# café\n").encode("latin-1")
        elif enc == "bom":
            raw = b"\xef\xbb\xbf" + raw
        elif enc == "nul":
            raw = raw.replace(b"\n", b"\n\x00", 1)
        else:
            raw = raw.replace(b"\n", b"\r\n")
    if kind == "bytes" or draw(st.integers(0, 3)) == 0:
        raw = _byte_mutations(draw, raw)
    return raw


def read_recipe_case(path: Path, counts: Counter, tiny_model_dir: Path | None) -> None:
    with time_limit(CASE_SECONDS):
        try:
            recipe = load_recipe(path)
        except SpaError as e:
            assert str(e).strip()
            counts["recipe: error"] += 1
            if tiny_model_dir is not None:  # the command line says the same in one line
                r = invoke("plan", "--recipe", path, "--model", tiny_model_dir)
                _assert_cli_outcome(r, expect_error=True)
                counts["cli: exit 2"] += 1
            return
    assert isinstance(recipe, Recipe)
    counts["recipe: loaded"] += 1


def _run_recipe_fuzz(tmp: Path, examples: int, derandomize: bool, counts: Counter, tiny_model_dir) -> None:
    n = {"case": 0}

    @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw=mutated_recipe())
    def prop(raw):
        n["case"] += 1
        path = tmp / f"r{n['case']}.yaml"
        path.write_bytes(raw)
        t = time.perf_counter()
        read_recipe_case(path, counts, tiny_model_dir if n["case"] % 4 == 0 else None)
        if os.environ.get("SPA_LITE_FUZZ_PROFILE"):
            print(f"PROFILE recipe {len(raw)} {time.perf_counter() - t:.3f} {n['case'] % 4 == 0}")

    prop()
    counts["cases"] += n["case"]


def test_fuzzed_recipes_load_or_fail_cleanly(tmp_path, tiny_model_dir):
    counts: Counter = Counter()
    _run_recipe_fuzz(tmp_path, FAST_EXAMPLES, True, counts, tiny_model_dir)
    assert counts["recipe: error"] and counts["recipe: loaded"], counts


@pytest.mark.bench
@pytest.mark.parametrize("family", ["data", "recipes"])
def test_fuzz_readers_bench(datasets_cache, tiny_model_dir, family):
    """Thousands of fresh random cases (``SPA_LITE_FUZZ_BENCH_EXAMPLES``) of one reader family; the counts go to
    bench/results/fuzz_readers_<family>.json."""
    counts: Counter = Counter()
    t0 = time.time()
    if family == "data":
        _run_data_fuzz(datasets_cache, BENCH_EXAMPLES, False, counts)
    else:
        _run_recipe_fuzz(datasets_cache, BENCH_EXAMPLES, False, counts, tiny_model_dir)
    out = {"family": family, "examples": BENCH_EXAMPLES, "wall_s": round(time.time() - t0, 1),
           "counts": dict(sorted(counts.items())),
           "load_before_after": [LOAD_AT_IMPORT, os.getloadavg()]}  # reached only if every case held
    path = ROOT / "bench" / "results" / f"fuzz_readers_{family}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
