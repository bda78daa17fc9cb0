"""Run-directory layout, stage lineage and manifests.

runs/<name>/seed/                 adapter/, metrics.jsonl, manifest.json          (pi_0)
runs/<name>/iter{i}/expand/       shards/, data.jsonl, manifest.json              (D_i)
runs/<name>/iter{i}/train/        adapter/, metrics.jsonl, manifest.json          (pi_i)

Each stage's ``config_hash`` covers its own settings and the hashes of the stages it reads, so a stage made
from another config is refused instead of silently mixed into a run.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import platform
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from spa_lite.config import Recipe
from spa_lite.errors import InputChangedError, StageLockedError, StageOrderError
from spa_lite.io import atomic_write_json, read_json, sha256_file, sha256_obj

LOCK_NAME = "LOCK"  # visible on purpose: `ls` shows a stage being written


@dataclass(frozen=True)
class Stage:
    kind: str  # seed | expand | train
    iteration: int  # 0 for seed

    @property
    def key(self) -> str:
        return "seed" if self.kind == "seed" else f"iter{self.iteration}/{self.kind}"

    @property
    def command(self) -> str:
        return "spa-lite seed-dpo" if self.kind == "seed" else f"spa-lite {self.kind} --iter {self.iteration}"

    def upstream(self) -> Stage | None:
        if self.kind == "seed":
            return None
        if self.kind == "train":
            return Stage("expand", self.iteration)
        return Stage("seed", 0) if self.iteration == 1 else Stage("train", self.iteration - 1)


def stage_dir(recipe: Recipe, stage: Stage) -> Path:
    return recipe.run_path / stage.key


def adapter_dir(recipe: Recipe, iteration: int) -> Path:
    """Adapter of pi_iteration: 0 is the seed adapter."""
    return stage_dir(recipe, Stage("seed", 0) if iteration == 0 else Stage("train", iteration)) / "adapter"


def _model_key(recipe: Recipe) -> dict:
    m = dataclasses.asdict(recipe.model)
    for k in ("device", "gradient_checkpointing", "fsdp"):  # these change speed and memory, not the numbers trained
        m.pop(k)
    return m


def _data_key(spec: str | None) -> dict:
    from spa_lite.data import resolve_data_path

    if not spec:
        return {"spec": None}
    try:
        p = resolve_data_path(spec)
    except FileNotFoundError:
        return {"spec": spec}
    if isinstance(p, Path) and p.is_file():
        return {"spec": spec, "sha256": sha256_file(p)}
    return {"spec": spec}


def _loop_key(section) -> dict:
    d = dataclasses.asdict(section)
    d.pop("diverge_factor", None)  # stops a diverging run; a run that finishes is the same with or without it
    return d


def stage_config(recipe: Recipe, stage: Stage) -> dict:
    """Everything that determines a stage's output, including its upstream stage's hash."""
    if stage.kind == "seed":
        return {"model": _model_key(recipe), "seed_dpo": _loop_key(recipe.seed_dpo), "seed": recipe.seed,
                "data": {"seed_pairs": _data_key(recipe.data.seed_pairs), "format": recipe.data.format,
                         "seed_limit": recipe.data.seed_limit, "shuffle_seed": recipe.data.shuffle_seed}}
    up = stage.upstream()
    base = {"upstream": stage_hash(recipe, up), "seed": recipe.seed}
    if stage.kind == "expand":
        base.update(expand=dataclasses.asdict(recipe.expand),
                    data={"prompts": _data_key(recipe.data.prompts), "format": recipe.data.format,
                          "sizes": recipe.data.iter_prompts[: stage.iteration], "shuffle_seed": recipe.data.shuffle_seed})
    else:
        base.update(train=_loop_key(recipe.train))
    return base


def stage_hash(recipe: Recipe, stage: Stage) -> str:
    return sha256_obj(stage_config(recipe, stage))[:16]


def read_manifest(recipe: Recipe, stage: Stage) -> dict | None:
    path = stage_dir(recipe, stage) / "manifest.json"
    return read_json(path) if path.exists() else None


# ------------------------------------------------------------------------------------ identity of inputs

FULL_HASH_LIMIT = 256 << 20  # base weights up to this size are hashed whole; larger ones are sampled
_SAMPLE = 1 << 20
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, how) -> hash: each file is read once per process


def _file_hash(path: Path, sampled: bool = False) -> str:
    """sha256 of a file, or of its safetensors header plus three 1 MiB samples (start, middle, end of the data)."""
    import hashlib

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, sampled)
    if key in _HASHES:
        return _HASHES[key]
    if not sampled:
        h = sha256_file(path)
    else:
        d = hashlib.sha256(str(st.st_size).encode())
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            d.update(head + f.read(min(n, st.st_size)))  # the header: every tensor's name, dtype, shape and offsets
            start = 8 + n
            for off in (start, start + max(0, (st.st_size - start) // 2 - _SAMPLE // 2), max(start, st.st_size - _SAMPLE)):
                f.seek(off)
                d.update(f.read(_SAMPLE))
        h = d.hexdigest()
    _HASHES[key] = h
    return h


def base_fingerprint(name_or_path: str) -> dict | None:
    """A cheap content identity of the base weights: the safetensors files' sizes and hashes (whole files up
    to FULL_HASH_LIMIT in all, else each header plus three 1 MiB samples), and the index and config.

    None when the weights are not in a local folder (a hub id not yet downloaded): nothing to compare.
    """
    import hashlib

    from spa_lite.models import ALIASES, cache_root

    if name_or_path.lower() in ALIASES:  # the converted cache folder, without converting here
        path = cache_root() / ALIASES[name_or_path.lower()][2]
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            try:
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(name_or_path, local_files_only=True))
            except Exception:  # noqa: BLE001 - not in the local cache (or not a hub id): nothing to compare
                return None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return None
    total = sum(p.stat().st_size for p in weights)
    sampled = total > FULL_HASH_LIMIT
    d = hashlib.sha256()
    for p in weights + sorted(q for q in path.glob("*.json") if q.name in {"config.json", "model.safetensors.index.json"}):
        d.update(f"{p.name}:{p.stat().st_size}:{_file_hash(p, sampled and p.suffix == '.safetensors')}".encode())
    return {"sha256": d.hexdigest()[:32], "files": len(weights), "bytes": total, "method": "sampled" if sampled else "full"}


def adapter_files_hash(adapter: Path) -> dict[str, str]:
    """sha256 of each file that defines a saved adapter (its config and weights)."""
    return {p.name: _file_hash(p) for p in sorted(adapter.iterdir())
            if p.is_file() and p.suffix in {".json", ".safetensors"}}


def stage_identity(recipe: Recipe, stage: Stage) -> dict:
    """What a finished stage records so that later stages can check their inputs are the ones it used."""
    d = stage_dir(recipe, stage)
    out: dict = {"base": base_fingerprint(recipe.model.name_or_path)}
    if stage.kind in ("seed", "train") and (d / "adapter").is_dir():
        out["adapter"] = adapter_files_hash(d / "adapter")
    if stage.kind == "expand" and (d / "data.jsonl").exists():
        out["data"] = _file_hash(d / "data.jsonl")
    return out


def _policy_stage(k: int) -> Stage:
    return Stage("seed", 0) if k == 0 else Stage("train", k)


def verify_inputs(recipe: Recipe, frozen_upto: int, data_of: int | None = None, recipe_arg: str = "RECIPE") -> None:
    """Check the base weights and the adapters pi_0..pi_{frozen_upto} (and D_{data_of}) are the ones their
    stages recorded.

    Raises:
        InputChangedError: naming the file, what is wrong with it, and the stage to rerun.
    """
    base_now = None
    for k in range(frozen_upto + 1):
        st = _policy_stage(k)
        m = read_manifest(recipe, st) or {}
        ident = m.get("identity") or {}
        adir = stage_dir(recipe, st) / "adapter"
        redo = f"rerun `{st.command} --recipe {recipe_arg} --force` (and the stages after it)"
        weights = adir / "adapter_model.safetensors"
        if not weights.is_file():
            raise InputChangedError(f"{weights} is missing: the adapter of {st.key} is gone; {redo}")
        if ident.get("adapter"):
            now = adapter_files_hash(adir)
            for name, h in ident["adapter"].items():
                if now.get(name) != h:
                    state = "is missing" if name not in now else "differs from the one that stage wrote (damaged or replaced)"
                    raise InputChangedError(f"{adir / name} {state}; {redo}")
        else:  # a manifest from before adapter hashes: at least the file must parse
            try:
                from safetensors import safe_open

                with safe_open(str(weights), "pt") as f:
                    f.keys()
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise InputChangedError(f"{weights} is damaged ({e}); {redo}") from None
        if ident.get("base"):
            if base_now is None:
                base_now = base_fingerprint(recipe.model.name_or_path) or {}
            if base_now and base_now.get("sha256") != ident["base"].get("sha256"):
                raise InputChangedError(
                    f"the base model weights at {recipe.model.name_or_path} changed since {st.key} was made "
                    f"(fingerprint {ident['base'].get('sha256', '?')[:12]}, now {base_now.get('sha256', '?')[:12]}); "
                    f"point model.name_or_path at the original weights, or rerun "
                    f"`spa-lite seed-dpo --recipe {recipe_arg} --force` and every later stage")
    if data_of is not None:
        st = Stage("expand", data_of)
        want = ((read_manifest(recipe, st) or {}).get("identity") or {}).get("data")
        path = stage_dir(recipe, st) / "data.jsonl"
        redo = f"rerun `{st.command} --recipe {recipe_arg} --force`"
        if not path.is_file():
            raise InputChangedError(f"{path} is missing; {redo}")
        if want and _file_hash(path) != want:
            raise InputChangedError(f"{path} differs from the D_{data_of} that {st.key} wrote; {redo}")


def require_upstream(recipe: Recipe, stage: Stage, recipe_arg: str = "RECIPE") -> None:
    """Refuse to run ``stage`` before the stage it reads, on one made from another config, or on inputs
    (base weights, adapters, D_i) that changed since they were made.

    Raises:
        StageOrderError: naming the missing stage and the command that makes it.
        InputChangedError: naming the changed file and the stage to rerun.
    """
    up = stage.upstream()
    if up is None:
        return
    m = read_manifest(recipe, up)
    where = stage_dir(recipe, up)
    if m is None or m.get("status") != "complete":
        raise StageOrderError(
            f"{stage.command} needs {where} (not complete); run `{up.command} --recipe {recipe_arg}` first"
        )
    expected = stage_hash(recipe, up)
    if m.get("config_hash") != expected:
        raise StageOrderError(
            f"{where} was made from another config (hash {m.get('config_hash')}, this recipe gives {expected}); "
            f"rerun `{up.command} --recipe {recipe_arg} --force` or give the run a new name"
        )
    verify_inputs(recipe, stage.iteration - 1, stage.iteration if stage.kind == "train" else None, recipe_arg)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("spa-lite", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class StageLock:
    """The exclusive lock of one stage directory: ``<stage>/LOCK`` holds the holder's pid, host and command.

    The file is made with a hard link of a complete temporary file, so it exists only with its content and
    only one process can create it. A lock whose holder is on this host and no longer alive (a crash, kill -9)
    is stale and taken over; a lock held from another host cannot be checked and is refused. The process that
    holds a lock may take it again (a stage rerun in the same process after a failure).
    """

    def __init__(self, directory: str | os.PathLike, pid: int | None = None):
        self.dir = Path(directory)
        self.path = self.dir / LOCK_NAME
        self.pid = pid or os.getpid()
        self.host = socket.gethostname()

    def _holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict) -> StageLockedError:
        who = f"pid {holder.get('pid')} on host {holder.get('host')}" if holder else "an unreadable lock"
        since = f" since {holder['since']}" if holder.get("since") else ""
        cmd = f" ({holder['command']})" if holder.get("command") else ""
        return StageLockedError(
            f"{self.dir} is in use by {who}{since}{cmd}: one process writes a stage at a time; wait for it to "
            f"finish, or if no such process is running delete {self.path}")

    def acquire(self) -> StageLock:
        """Take the lock. Raises StageLockedError when another live process holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        info = {"pid": self.pid, "host": self.host, "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))}
        for _ in range(3):
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".lock.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(info, f)
                try:
                    os.link(tmp, self.path)
                    return self
                except FileExistsError:
                    pass
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            holder = self._holder()
            if holder is None:  # released meanwhile
                continue
            mine = holder.get("host") == self.host and isinstance(holder.get("pid"), int)
            if mine and holder["pid"] == self.pid:
                return self
            if not (mine and not _pid_alive(holder["pid"])):
                raise self._refuse(holder)
            # stale: move it aside, and delete it only if it is still the dead holder's (not a new one)
            aside = self.dir / f".lock.stale.{self.pid}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.path, aside)
                if json.loads(aside.read_text(encoding="utf-8")).get("pid") != holder["pid"]:
                    with contextlib.suppress(FileExistsError):
                        os.link(aside, self.path)
                aside.unlink()
        raise self._refuse(self._holder() or {})

    def release(self) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == self.pid and holder.get("host") == self.host:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> StageLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


_HELD: dict[Path, StageLock] = {}


def release_stage_locks() -> None:
    """Release every stage lock this process holds (the CLI calls it when a command ends, however it ends)."""
    while _HELD:
        _, lock = _HELD.popitem()
        with contextlib.suppress(OSError):
            lock.release()


atexit.register(release_stage_locks)


def _lock(d: Path, dist) -> None:
    """Take ``d``'s lock on the main process; every process raises if it is refused."""
    err = None
    if dist.main:
        try:
            _HELD[d] = StageLock(d).acquire()
        except StageLockedError as e:
            err = str(e)
    err = dist.broadcast_object(err)
    if err:
        raise StageLockedError(err)


def _unlock(d: Path, dist) -> None:
    lock = _HELD.pop(d, None)
    if lock is not None and dist.main:
        lock.release()


def _has_work(d: Path) -> bool:
    """Whether a partial stage holds anything worth protecting (a shard, a checkpoint, metrics)."""
    return d.is_dir() and any(p.name not in {"started.json", LOCK_NAME} and not p.name.startswith(".lock.")
                              for p in d.iterdir())


def _clear(d: Path) -> None:
    import shutil

    for p in d.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def begin_stage(recipe: Recipe, stage: Stage, force: bool) -> tuple[Path, dict | None]:
    """Prepare a stage directory, holding its lock until ``finish_stage`` (or the end of the command).

    Returns (dir, manifest if already complete with this config). A partial stage made with the same
    config is resumed; one made with another config is refused unless ``force``, which clears it. A partial
    stage with no work in it (it failed on its input data, say) is started over without ``force``.

    Raises:
        StageLockedError: another process is writing this stage.
        StageOrderError: the stage was made from another config.
    """
    from spa_lite.distributed import get_dist

    from spa_lite.tracking import require

    require(recipe)  # a tracker in report_to that is not installed fails here, before any work
    dist = get_dist()
    d = stage_dir(recipe, stage)
    _lock(d, dist)
    h = stage_hash(recipe, stage)
    m = read_manifest(recipe, stage)
    started = d / "started.json"
    if m is not None and m.get("status") == "complete":
        if m.get("config_hash") == h and not force:
            _unlock(d, dist)
            return d, m
        if not force:
            _unlock(d, dist)
            raise StageOrderError(
                f"{d} is complete but was made from another config (hash {m.get('config_hash')} vs {h}); "
                f"add --force to redo it (later stages will then need redoing) or use a new run name"
            )
    if started.exists() and not force and _has_work(d):
        prev = read_json(started).get("config_hash")
        if prev != h:
            _unlock(d, dist)
            raise StageOrderError(f"{d} holds a partial run from another config; add --force to start it over")
    from spa_lite.memory import StagePeak

    _STAGE_PEAKS[stage.key] = StagePeak()  # this stage's peak resident memory, for its manifest
    dist.barrier()  # every process has read the old state before the main one changes it
    if dist.main:
        if (force or not _has_work(d)) and d.exists():
            _clear(d)
        d.mkdir(parents=True, exist_ok=True)
        if not started.exists():
            atomic_write_json(started, {"config_hash": h, "time": time.time()})
    dist.barrier()
    return d, None


_STAGE_PEAKS: dict = {}


def finish_stage(recipe: Recipe, stage: Stage, summary: dict, inputs: dict, t_start: float) -> dict:
    from spa_lite.distributed import get_dist

    main = get_dist().main
    from spa_lite.memory import peak_rss_gb

    peak = _STAGE_PEAKS.pop(stage.key, None)
    manifest = {
        "stage": stage.key,
        "status": "complete",
        "config_hash": stage_hash(recipe, stage),
        "config": stage_config(recipe, stage),
        "recipe": recipe.to_dict(),
        "inputs": inputs,
        "identity": stage_identity(recipe, stage) if main else None,
        "versions": versions(),
        "timings": {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(time.time() - t_start, 2)},
        "summary": summary,
        # this process's peak resident memory during the stage (GB); peak_is_stage False: the process's peak so far
        "memory": peak.read() if peak else {"peak_rss_gb": peak_rss_gb(), "peak_is_stage": False},
    }
    from spa_lite.distributed import get_dist

    dist = get_dist()
    if dist.main:
        atomic_write_json(stage_dir(recipe, stage) / "manifest.json", manifest)
        from spa_lite.tracking import log_stage_summary

        log_stage_summary(recipe, stage, summary)
    dist.barrier()
    _unlock(stage_dir(recipe, stage), dist)
    return manifest


def dump_recipe(recipe: Recipe) -> None:
    import yaml

    from spa_lite.distributed import get_dist

    if not get_dist().main:
        return
    from spa_lite.io import atomic_write_text

    atomic_write_text(recipe.run_path / "recipe.yaml", yaml.safe_dump(json.loads(json.dumps(recipe.to_dict())), sort_keys=False))
