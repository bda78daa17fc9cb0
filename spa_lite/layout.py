"""The run layout: every path of a run directory, every stage key and every policy name, in one place.

runs/<name>/seed/                 adapter/, metrics.jsonl, manifest.json          (pi_0)
runs/<name>/reward/               adapter/, head.safetensors, metrics.jsonl, manifest.json (reward model)
runs/<name>/iter{i}/expand/       shards/, data.jsonl, manifest.json              (D_i)
runs/<name>/iter{i}/train/        adapter/, metrics.jsonl, manifest.json          (pi_i)
runs/<name>/iter{i}/audit.jsonl   human audit of D_i (d0/audit.jsonl: of D0)       (`spa-lite inspect`)
runs/<name>/eval/                 <tag>.json, cache/, winrate_cache/              (`spa-lite eval`, `winrate`)

Policies: pi_init is the base with every adapter off (k = None); pi_k is the base plus the adapters
``seed``, ``iter1``, ..., ``iter{k}``. Command-line and API policy specs (``init``, ``last``, ``k``) are
parsed here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from spa_lite.config import Recipe
from spa_lite.errors import SpaError
from spa_lite.io import read_json

__all__ = ["Stage", "REWARD_STAGE", "REWARD_HEAD_FILE", "stage_dir",
           "adapter_dir", "data_path", "audit_path", "eval_dir", "read_manifest", "stage_keys",
           "adapter_name", "policy_stage", "policy_names", "policy_label", "complete_policies", "resolve_policy"]


@dataclass(frozen=True)
class Stage:
    kind: str  # seed | reward | expand | train
    iteration: int  # 0 for seed and reward

    @property
    def key(self) -> str:
        return self.kind if self.kind in ("seed", "reward") else f"iter{self.iteration}/{self.kind}"

    @property
    def command(self) -> str:
        if self.kind in ("seed", "reward"):
            return "spa-lite seed-dpo" if self.kind == "seed" else "spa-lite reward"
        return f"spa-lite {self.kind} --iter {self.iteration}"

    def upstream(self) -> Stage | None:
        """The stage this one reads (expand with a reward judge also reads the reward stage: ``runs.require_stage``)."""
        if self.kind in ("seed", "reward"):
            return None
        if self.kind == "train":
            return Stage("expand", self.iteration)
        return Stage("seed", 0) if self.iteration == 1 else Stage("train", self.iteration - 1)


#: the reward model's stage (``spa-lite reward``) and the file of its scalar head
REWARD_STAGE = Stage("reward", 0)
REWARD_HEAD_FILE = "head.safetensors"


def stage_keys(iterations: int) -> list[str]:
    """Every stage key of a run of ``iterations`` iterations, in the order the stages run."""
    return ["seed"] + [f"iter{i}/{k}" for i in range(1, iterations + 1) for k in ("expand", "train")]


def stage_dir(recipe: Recipe, stage: Stage) -> Path:
    return recipe.run_path / stage.key


def data_path(run_path: Path, iteration: int) -> Path:
    """D_i, the judged pairs the expand stage of iteration ``iteration`` writes."""
    return Path(run_path) / Stage("expand", iteration).key / "data.jsonl"


def audit_path(run_path: Path, iteration: int) -> Path:
    """The human audit of D_i, ``iter{i}/audit.jsonl``; of the gold seed pairs D0 (iteration 0), ``d0/audit.jsonl``.

    Never inside a stage directory: ``--force`` clears a stage's directory, and an audit outlives the stage.
    """
    return Path(run_path) / ("d0" if iteration == 0 else f"iter{iteration}") / "audit.jsonl"


def eval_dir(recipe: Recipe) -> Path:
    """Where `spa-lite eval` and `spa-lite winrate` write their results (and caches)."""
    return recipe.run_path / "eval"


def policy_stage(k: int) -> Stage:
    """The stage that trains pi_k's own adapter: seed DPO for k = 0, iteration k's training otherwise."""
    return Stage("seed", 0) if k == 0 else Stage("train", k)


def adapter_dir(recipe: Recipe, iteration: int) -> Path:
    """Adapter of pi_iteration: 0 is the seed adapter."""
    return stage_dir(recipe, policy_stage(iteration)) / "adapter"


def read_manifest(recipe: Recipe, stage: Stage) -> dict | None:
    path = stage_dir(recipe, stage) / "manifest.json"
    return read_json(path) if path.exists() else None


def adapter_name(stage_index: int) -> str:
    """0 -> 'seed', i -> 'iter{i}'."""
    return "seed" if stage_index == 0 else f"iter{stage_index}"


def policy_names(k: int | None) -> list[str]:
    """Adapters of pi_k; None is pi_init."""
    return [] if k is None else [adapter_name(j) for j in range(k + 1)]


def policy_label(k: int | None) -> str:
    """``pi_init`` or ``pi_k``: how results, files and messages name a policy."""
    return "pi_init" if k is None else f"pi_{k}"


def complete_policies(recipe: Recipe) -> list[int]:
    """k for each pi_k whose adapter is complete: 0 (seed), 1, 2, ... in order, stopping at the first gap."""
    ks = []
    for k in range(recipe.iterations + 1):
        m = read_manifest(recipe, policy_stage(k))
        if m is None or m.get("status") != "complete":
            break
        ks.append(k)
    return ks


def resolve_policy(recipe: Recipe, spec: str | int | None) -> int | None:
    """``init``/None -> None (pi_init), ``last`` -> the last complete pi_k (pi_init when none is), ``k`` -> k.

    Raises:
        SpaError: for pi_k that is not complete in the run.
    """
    ks = complete_policies(recipe)
    if spec is None or spec == "init":
        return None
    if spec == "last":
        return ks[-1] if ks else None
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise SpaError(f"policy '{spec}' must be init, last or an integer") from None
    if k not in ks:
        raise SpaError(f"{policy_label(k)} is not complete in {recipe.run_path} (complete: {ks}); run its stages first")
    return k
