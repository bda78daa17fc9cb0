"""Run-directory layout, stage lineage and manifests.

runs/<name>/seed/                 adapter/, metrics.jsonl, manifest.json          (pi_0)
runs/<name>/iter{i}/expand/       shards/, data.jsonl, manifest.json              (D_i)
runs/<name>/iter{i}/train/        adapter/, metrics.jsonl, manifest.json          (pi_i)

Each stage's ``config_hash`` covers its own settings and the hashes of the stages it reads, so a stage made
from another config is refused instead of silently mixed into a run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from spa_lite.config import Recipe
from spa_lite.errors import StageOrderError
from spa_lite.io import atomic_write_json, read_json, sha256_file, sha256_obj


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


def stage_config(recipe: Recipe, stage: Stage) -> dict:
    """Everything that determines a stage's output, including its upstream stage's hash."""
    if stage.kind == "seed":
        return {"model": _model_key(recipe), "seed_dpo": dataclasses.asdict(recipe.seed_dpo), "seed": recipe.seed,
                "data": {"seed_pairs": _data_key(recipe.data.seed_pairs), "format": recipe.data.format,
                         "seed_limit": recipe.data.seed_limit, "shuffle_seed": recipe.data.shuffle_seed}}
    up = stage.upstream()
    base = {"upstream": stage_hash(recipe, up), "seed": recipe.seed}
    if stage.kind == "expand":
        base.update(expand=dataclasses.asdict(recipe.expand),
                    data={"prompts": _data_key(recipe.data.prompts), "format": recipe.data.format,
                          "sizes": recipe.data.iter_prompts[: stage.iteration], "shuffle_seed": recipe.data.shuffle_seed})
    else:
        base.update(train=dataclasses.asdict(recipe.train))
    return base


def stage_hash(recipe: Recipe, stage: Stage) -> str:
    return sha256_obj(stage_config(recipe, stage))[:16]


def read_manifest(recipe: Recipe, stage: Stage) -> dict | None:
    path = stage_dir(recipe, stage) / "manifest.json"
    return read_json(path) if path.exists() else None


def require_upstream(recipe: Recipe, stage: Stage, recipe_arg: str = "RECIPE") -> None:
    """Refuse to run ``stage`` before the stage it reads, or on one made from another config.

    Raises:
        StageOrderError: naming the missing stage and the command that makes it.
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


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("spa-lite", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def begin_stage(recipe: Recipe, stage: Stage, force: bool) -> tuple[Path, dict | None]:
    """Prepare a stage directory. Returns (dir, manifest if already complete with this config).

    A partial stage made with the same config is resumed; one made with another config is refused
    unless ``force``, which clears it.
    """
    import shutil

    from spa_lite.distributed import get_dist

    from spa_lite.tracking import require

    require(recipe)  # a tracker in report_to that is not installed fails here, before any work
    dist = get_dist()
    d = stage_dir(recipe, stage)
    h = stage_hash(recipe, stage)
    m = read_manifest(recipe, stage)
    started = d / "started.json"
    if m is not None and m.get("status") == "complete":
        if m.get("config_hash") == h and not force:
            return d, m
        if not force:
            raise StageOrderError(
                f"{d} is complete but was made from another config (hash {m.get('config_hash')} vs {h}); "
                f"add --force to redo it (later stages will then need redoing) or use a new run name"
            )
    if started.exists() and not force:
        prev = read_json(started).get("config_hash")
        if prev != h:
            raise StageOrderError(f"{d} holds a partial run from another config; add --force to start it over")
    from spa_lite.memory import StagePeak

    _STAGE_PEAKS[stage.key] = StagePeak()  # this stage's peak resident memory, for its manifest
    dist.barrier()  # every process has read the old state before the main one changes it
    if dist.main:
        if force and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        if not started.exists():
            atomic_write_json(started, {"config_hash": h, "time": time.time()})
    dist.barrier()
    return d, None


_STAGE_PEAKS: dict = {}


def finish_stage(recipe: Recipe, stage: Stage, summary: dict, inputs: dict, t_start: float) -> dict:
    from spa_lite.memory import peak_rss_gb

    peak = _STAGE_PEAKS.pop(stage.key, None)
    manifest = {
        "stage": stage.key,
        "status": "complete",
        "config_hash": stage_hash(recipe, stage),
        "config": stage_config(recipe, stage),
        "recipe": recipe.to_dict(),
        "inputs": inputs,
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
    return manifest


def dump_recipe(recipe: Recipe) -> None:
    import yaml

    from spa_lite.distributed import get_dist

    if not get_dist().main:
        return
    from spa_lite.io import atomic_write_text

    atomic_write_text(recipe.run_path / "recipe.yaml", yaml.safe_dump(json.loads(json.dumps(recipe.to_dict())), sort_keys=False))
