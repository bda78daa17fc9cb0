"""Stage lineage and manifests: what a stage's output depends on, checks of its inputs, and the stage run
(``stage_run``) that holds a stage's lock, peak-memory meter, tracker and manifest while it runs.

The paths of a run (``Stage``, ``stage_dir``, ``adapter_dir``, ``read_manifest``) live in ``spa_lite.layout``, the
stage locks in ``spa_lite.locks``; import them from there.
Each stage's ``config_hash`` covers its own settings and the hashes of the stages it reads, so a stage made
from another config is refused instead of silently mixed into a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata as md
import json
import platform
import shutil
import time
from pathlib import Path

import yaml
from huggingface_hub import snapshot_download
from safetensors import safe_open

from spa_lite.config import REWARD_JUDGES, Recipe
from spa_lite.data import resolve_data_path
from spa_lite.distributed import get_dist
from spa_lite.errors import InputChangedError, StageLockedError, StageOrderError
from spa_lite.io import atomic_write_json, atomic_write_text, read_json, sha256_file, sha256_obj
from spa_lite.layout import (
    REWARD_HEAD_FILE,
    REWARD_STAGE,
    Stage,
    audit_path,
    policy_stage,
    read_manifest,
    stage_dir,
)
from spa_lite.locks import LOCK_NAME, StageLock
from spa_lite.memory import StagePeak, peak_rss_gb
from spa_lite.models import ALIASES, cache_root
from spa_lite.tracking import StageTracker, log_stage_summary, requested, require

__all__ = ["stage_config", "stage_hash", "base_fingerprint", "adapter_files_hash", "stage_identity", "verify_inputs",
           "require_upstream", "require_stage", "versions", "StageRun", "stage_run", "finish_stage", "dump_recipe"]


def _model_key(recipe: Recipe) -> dict:
    m = dataclasses.asdict(recipe.model)
    for k in ("device", "gradient_checkpointing", "fsdp"):  # these change speed and memory, not the numbers trained
        m.pop(k)
    if m["truncation"] == "skip":  # what every run made before the setting existed did: their hashes still hold
        m.pop("truncation")
    return m


def _data_key(spec: str | None) -> dict:
    if not spec:
        return {"spec": None}
    try:
        p = resolve_data_path(spec)
    except FileNotFoundError:
        return {"spec": spec}
    if isinstance(p, Path) and p.is_file():
        return {"spec": spec, "sha256": sha256_file(p)}
    return {"spec": spec}


def _expand_key(recipe: Recipe) -> dict:
    d = dataclasses.asdict(recipe.expand)
    # the precision of decoding is, like the device, how pi_{i-1} is sampled rather than what: left out, so a
    # run keeps its hash across machines and versions; expand's manifest records the dtype used
    d.pop("sample_dtype")
    # settings added after runs were made, left out at their "off" value: such runs keep their hash
    if d["min_confidence"] == 0:
        d.pop("min_confidence")
    if d["judge_norm"] == "sum":
        d.pop("judge_norm")
    if d["verifier_accuracy"] == 1:
        d.pop("verifier_accuracy")
    if d["verifier_flip"] == "random":
        d.pop("verifier_flip")
    if d["verifier_undecided"] == "drop":
        d.pop("verifier_undecided")
    if not d["verifier_decided"]:
        d.pop("verifier_decided")
    if not d["length_balance"]:
        d.pop("length_balance")
    if not d["reward_cut_eos"]:
        d.pop("reward_cut_eos")
    if d["max_length_ratio"] == 0:
        d.pop("max_length_ratio")
    # the reward judge ignored length_penalty before it applied it: a run made then with a penalty set gets a new
    # hash, so its labels are made again rather than mixed with penalised ones
    if d["judge"] == "reward" and d["length_penalty"] != 0:
        d["length_penalty_on_reward"] = True
    return d


def _loop_key(section) -> dict:
    d = dataclasses.asdict(section)
    d.pop("diverge_factor", None)  # stops a diverging run; a run that finishes is the same with or without it
    if not d.get("audit_labels"):  # off: the hash of every run made before the setting existed stays the same
        d.pop("audit_labels", None)
    return d


def stage_config(recipe: Recipe, stage: Stage) -> dict:
    """Everything that determines a stage's output, including its upstream stage's hash."""
    if stage.kind == "seed":
        return {"model": _model_key(recipe), "seed_dpo": _loop_key(recipe.seed_dpo), "seed": recipe.seed,
                "data": {"seed_pairs": _data_key(recipe.data.seed_pairs), "format": recipe.data.format,
                         "seed_limit": recipe.data.seed_limit, "shuffle_seed": recipe.data.shuffle_seed}}
    if stage.kind == "reward":
        reward = dataclasses.asdict(recipe.reward)
        if not reward["length_head"]:  # off: reward stages made before the setting existed keep their hash
            reward.pop("length_head")
        return {"model": _model_key(recipe), "reward": reward, "seed": recipe.seed,
                "data": {"seed_pairs": _data_key(recipe.data.seed_pairs), "format": recipe.data.format,
                         "seed_limit": recipe.data.seed_limit, "shuffle_seed": recipe.data.shuffle_seed,
                         "eval_pairs": _data_key(recipe.data.eval_pairs)}}
    up = stage.upstream()
    base = {"upstream": stage_hash(recipe, up), "seed": recipe.seed}
    if stage.kind == "expand" and recipe.expand.judge in REWARD_JUDGES:  # D_i depends on the reward model too
        base["reward"] = stage_hash(recipe, REWARD_STAGE)
    if stage.kind == "expand":
        base.update(expand=_expand_key(recipe),
                    data={"prompts": _data_key(recipe.data.prompts), "format": recipe.data.format,
                          "sizes": recipe.data.iter_prompts[: stage.iteration], "shuffle_seed": recipe.data.shuffle_seed})
    else:
        base.update(train=_loop_key(recipe.train))
        if recipe.train.audit_labels:  # the human labels are an input: a new annotation makes a new stage
            audit = audit_path(recipe.run_path, stage.iteration)
            base["audit"] = sha256_file(audit) if audit.exists() else None
    return base


def stage_hash(recipe: Recipe, stage: Stage) -> str:
    return sha256_obj(stage_config(recipe, stage))[:16]


# ------------------------------------------------------------------------------------ identity of inputs

FULL_HASH_LIMIT = 256 << 20  # base weights up to this size are hashed whole; larger ones are sampled
_SAMPLE = 1 << 20
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, how) -> hash: each file is read once per process


def _file_hash(path: Path, sampled: bool = False) -> str:
    """sha256 of a file, or of its safetensors header plus three 1 MiB samples (start, middle, end of the data)."""
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
    if name_or_path.lower() in ALIASES:  # the converted cache folder, without converting here
        path = cache_root() / ALIASES[name_or_path.lower()][2]
    else:
        path = Path(name_or_path)
        if not path.is_dir():
            try:
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
    if stage.kind in ("seed", "train", "reward") and (d / "adapter").is_dir():
        out["adapter"] = adapter_files_hash(d / "adapter")
    if stage.kind == "reward" and (d / REWARD_HEAD_FILE).is_file():
        out["head"] = _file_hash(d / REWARD_HEAD_FILE)
    if stage.kind == "expand" and (d / "data.jsonl").exists():
        out["data"] = _file_hash(d / "data.jsonl")
    return out


def rerun_args(recipe: Recipe, recipe_arg: str | None) -> str:
    """The recipe options of a suggested command: ``recipe_arg`` when a caller knows them, else the ones the CLI
    recorded on the recipe (``Recipe.rerun_args``: recipe, --name, --run-dir, --set)."""
    return recipe_arg if recipe_arg not in (None, "RECIPE") else recipe.rerun_args


def verify_inputs(recipe: Recipe, frozen_upto: int, data_of: int | None = None, recipe_arg: str | None = None) -> None:
    """Check the base weights and the adapters pi_0..pi_{frozen_upto} (and D_{data_of}) are the ones their
    stages recorded.

    Raises:
        InputChangedError: naming the file, what is wrong with it, and the stage to rerun.
    """
    recipe_arg = rerun_args(recipe, recipe_arg)
    base_now = None
    for k in range(frozen_upto + 1):
        st = policy_stage(k)
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


def require_upstream(recipe: Recipe, stage: Stage, recipe_arg: str | None = None) -> None:
    """Refuse to run ``stage`` before the stage it reads, on one made from another config, or on inputs
    (base weights, adapters, D_i) that changed since they were made.

    Raises:
        StageOrderError: naming the missing stage and the command that makes it.
        InputChangedError: naming the changed file and the stage to rerun.
    """
    up = stage.upstream()
    if up is None:
        return
    recipe_arg = rerun_args(recipe, recipe_arg)
    require_stage(recipe, up, stage.command, recipe_arg)
    verify_inputs(recipe, stage.iteration - 1, stage.iteration if stage.kind == "train" else None, recipe_arg)


def require_stage(recipe: Recipe, up: Stage, needed_by: str, recipe_arg: str | None = None) -> None:
    """Refuse to go on unless stage ``up`` is complete and made from this recipe's config; for the reward stage
    also that its adapter and head are the files it wrote.

    Raises:
        StageOrderError: naming the missing stage and the command that makes it.
        InputChangedError: naming the changed file and the stage to rerun.
    """
    recipe_arg = rerun_args(recipe, recipe_arg)
    m = read_manifest(recipe, up)
    where = stage_dir(recipe, up)
    if m is None or m.get("status") != "complete":
        raise StageOrderError(f"{needed_by} needs {where} (not complete); run `{up.command} --recipe {recipe_arg}` first")
    expected = stage_hash(recipe, up)
    if m.get("config_hash") != expected:
        raise StageOrderError(
            f"{where} was made from another config (hash {m.get('config_hash')}, this recipe gives {expected}); "
            f"rerun `{up.command} --recipe {recipe_arg} --force` or give the run a new name"
        )
    if up.kind != "reward":
        return
    ident = m.get("identity") or {}
    redo = f"rerun `{up.command} --recipe {recipe_arg} --force`"
    want = {**{f"adapter/{k}": v for k, v in (ident.get("adapter") or {}).items()}, REWARD_HEAD_FILE: ident.get("head")}
    for rel, h in want.items():
        path = where / rel
        if not path.is_file():
            raise InputChangedError(f"{path} is missing: the reward model of {up.key} is gone; {redo}")
        if h and _file_hash(path) != h:
            raise InputChangedError(f"{path} differs from the one {up.key} wrote (damaged or replaced); {redo}")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("spa-lite", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _has_work(d: Path) -> bool:
    """Whether a partial stage holds anything worth protecting (a shard, a checkpoint, metrics)."""
    return d.is_dir() and any(p.name not in {"started.json", LOCK_NAME} and not p.name.startswith(".lock.")
                              for p in d.iterdir())


def _clear(d: Path) -> None:
    for p in d.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _prepare(recipe: Recipe, stage: Stage, force: bool, dist) -> dict | None:
    """Make a locked stage directory ready to write; returns its manifest if already complete with this config.

    A partial stage made with the same config is resumed; one made with another config is refused unless
    ``force``, which clears it. A partial stage with no work in it (it failed on its input data, say) is
    started over without ``force``.
    """
    d = stage_dir(recipe, stage)
    h = stage_hash(recipe, stage)
    m = read_manifest(recipe, stage)
    started = d / "started.json"
    if m is not None and m.get("status") == "complete":
        if m.get("config_hash") == h and not force:
            return m
        if not force:
            raise StageOrderError(
                f"{d} is complete but was made from another config (hash {m.get('config_hash')} vs {h}); "
                f"add --force to redo it (later stages will then need redoing) or use a new run name"
            )
    if started.exists() and not force and _has_work(d):
        prev = read_json(started).get("config_hash")
        if prev != h:
            raise StageOrderError(f"{d} holds a partial run from another config; add --force to start it over")
    dist.barrier()  # every process has read the old state before the main one changes it
    if dist.main:
        if (force or not _has_work(d)) and d.exists():
            _clear(d)
        d.mkdir(parents=True, exist_ok=True)
        if not started.exists():
            atomic_write_json(started, {"config_hash": h, "time": time.time()})
    dist.barrier()
    return None


def finish_stage(recipe: Recipe, stage: Stage, summary: dict, inputs: dict, t_start: float,
                 memory: dict | None = None) -> dict:
    """Write the stage's complete manifest (on the main process) and return it; ``StageRun.finish`` calls it
    while it holds the stage's lock. ``memory``: the stage's peak-memory reading (None: the process's peak)."""
    manifest = {
        "stage": stage.key,
        "status": "complete",
        "config_hash": stage_hash(recipe, stage),
        "config": stage_config(recipe, stage),
        "recipe": recipe.to_dict(),
        "inputs": inputs,
        "identity": stage_identity(recipe, stage) if get_dist().main else None,
        "versions": versions(),
        "timings": {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(time.time() - t_start, 2)},
        "summary": summary,
        # this process's peak resident memory during the stage (GB); peak_is_stage False: the process's peak so far
        "memory": memory or {"peak_rss_gb": peak_rss_gb(), "peak_is_stage": False},
    }
    if get_dist().main:
        atomic_write_json(stage_dir(recipe, stage) / "manifest.json", manifest)
    return manifest


class StageRun:
    """One run of one stage, from its input checks to its manifest: ``with stage_run(recipe, stage, force) as st``.

    It owns what the stage holds while it runs: the lock of its directory (``st.lock``, main process), its
    peak-memory meter (``st.peak``), its tracker run (``st.tracker``, opened on first use) and its manifest
    (``st.finish``). Leaving the ``with``, however (a return, an error, Ctrl-C), closes the tracker and releases
    the lock; a stage that did not call ``finish`` is not complete and keeps its partial work for a rerun.
    Nothing is registered in a module: two stage runs in one process share nothing.

    Attributes:
        dir: the stage directory.
        done: the manifest when the stage is already complete with this config (the body should return it).
        manifest: the manifest ``finish`` wrote.
    """

    def __init__(self, recipe: Recipe, stage: Stage, force: bool = False, recipe_arg: str | None = None):
        self.recipe, self.stage, self.force, self.recipe_arg = recipe, stage, force, recipe_arg
        self.dist = get_dist()
        self.dir = stage_dir(recipe, stage)
        self.t0 = time.time()
        self.done: dict | None = None
        self.manifest: dict | None = None
        self.lock: StageLock | None = None
        self.peak: StagePeak | None = None
        self._tracker: StageTracker | None = None

    def __enter__(self) -> StageRun:
        """Check the inputs, take the lock, and prepare the directory (or find the stage complete: ``done``).

        Raises:
            StageOrderError, InputChangedError: an upstream stage is missing, from another config, or changed
                (``require_upstream``), or this stage is from another config.
            StageLockedError: another process is writing this stage.
            SpaError: a tracker in report_to is not installed (before any work).
        """
        if self.stage.upstream() is not None:
            require_upstream(self.recipe, self.stage, self.recipe_arg)
        if self.stage.kind == "expand" and self.recipe.expand.judge in REWARD_JUDGES:  # D_i is judged by it
            require_stage(self.recipe, REWARD_STAGE, self.stage.command, self.recipe_arg)
        require(self.recipe)
        self._take_lock()
        try:
            self.done = _prepare(self.recipe, self.stage, self.force, self.dist)
            if self.done is None:
                self.peak = StagePeak()  # this stage's peak resident memory, for its manifest
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._tracker is not None:
                self._tracker.close()
                self._tracker = None
        finally:
            self._release()

    def _take_lock(self) -> None:
        """The main process takes the lock; every process raises if it is refused."""
        err = None
        if self.dist.main:
            try:
                self.lock = StageLock(self.dir).acquire()
            except StageLockedError as e:
                err = str(e)
        err = self.dist.broadcast_object(err)
        if err:
            raise StageLockedError(err)

    def _release(self) -> None:
        lock, self.lock = self.lock, None
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.release()

    @property
    def tracker(self) -> StageTracker:
        """This stage's tracker run (report_to), opened on first use; a no-op without trackers or off the main
        process."""
        if self._tracker is None:
            self._tracker = StageTracker(self.recipe, self.stage.key)
        return self._tracker

    def log_step(self, row: dict) -> None:
        """One optimizer step's metrics.jsonl row to the trackers, live (every process may call it)."""
        if self.dist.main and requested(self.recipe):
            self.tracker.log_step(row)

    def finish(self, summary: dict, inputs: dict) -> dict:
        """Mark the stage complete: write its manifest (with its peak memory) and log its summary; returns the
        manifest. The lock is released when the ``with`` ends."""
        self.manifest = finish_stage(self.recipe, self.stage, summary, inputs, self.t0,
                                     self.peak.read() if self.peak else None)
        if self.dist.main and requested(self.recipe):
            log_stage_summary(self.tracker, self.recipe, self.stage, summary)
        self.dist.barrier()
        return self.manifest


def stage_run(recipe: Recipe, stage: Stage, force: bool = False, recipe_arg: str | None = None) -> StageRun:
    """The context of one stage run (see ``StageRun``): ``with stage_run(recipe, stage, force) as st: ...``.

    ``recipe_arg``: the recipe argument the commands in error messages repeat (default: the CLI's).
    """
    return StageRun(recipe, stage, force, recipe_arg)


def dump_recipe(recipe: Recipe) -> None:
    if not get_dist().main:
        return
    atomic_write_text(recipe.run_path / "recipe.yaml", yaml.safe_dump(json.loads(json.dumps(recipe.to_dict())), sort_keys=False))
