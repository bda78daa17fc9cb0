"""A training run's resumable state: the checkpoint (trainable adapter, optimizer, scheduler, confidence window)
that ``spa_lite.training.run_dpo_loop`` writes every ``save_every`` steps, and its per-step logs cut back to the
step it resumes from."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from spa_lite.errors import SpaError
from spa_lite.fsdp import copy_full_into
from spa_lite.io import atomic_dir, atomic_write_text, write_new_file
from spa_lite.losses import ConfidenceWindow
from spa_lite.stack import PolicyStack


def _checkpoint_paths(out_dir: Path) -> Path:
    return out_dir / "checkpoint"


def _optimizer_state(stack: PolicyStack, opt) -> dict:
    """The optimizer's state; for a sharded stack the whole (unsharded) state, gathered on every process."""
    if not stack.sharded:
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(stack.model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir: Path, stack: PolicyStack, opt, sched, step: int, window: ConfidenceWindow | None,
                    *, write: bool = True) -> None:
    """Write the resumable state. With a sharded stack every process calls it (the state is gathered) and
    only the one with ``write`` writes."""
    params = stack.trainable_state()
    optim = _optimizer_state(stack, opt)
    if not write:
        return
    # serialised in memory (an adapter and its optimizer state: megabytes) and written by spa_lite.io, so a full
    # disk is an OSError naming the file, not torch's "[enforce fail at inline_container.cc]"
    buf = io.BytesIO()
    torch.save({"optimizer": optim, "scheduler": sched.state_dict(), "sharded": stack.sharded}, buf)
    files = {"trainable.safetensors": save(params), "optim.pt": buf.getvalue(),
             "state.json": json.dumps({"step": step, "window": window.state_dict() if window else None}).encode()}
    ck = _checkpoint_paths(out_dir)
    with atomic_dir(ck) as tmp:
        for name, data in files.items():
            write_new_file(tmp / name, data, ck / name)


def load_checkpoint(out_dir: Path, stack: PolicyStack, opt, sched, window: ConfidenceWindow | None) -> int:
    """Restore the state ``save_checkpoint`` wrote into ``stack``, ``opt``, ``sched`` and ``window``; returns the
    optimizer steps done (0 without a checkpoint).

    Raises:
        SpaError: the checkpoint was written with FSDP and the run is without it, or the other way round.
    """
    ck = _checkpoint_paths(out_dir)
    if not (ck / "state.json").exists():
        # killed between atomic_dir's two renames: the previous checkpoint waits under its .old name
        ck = ck.with_name(f".{ck.name}.old")
        if not (ck / "state.json").exists():
            return 0
    st = torch.load(ck / "optim.pt", map_location="cpu", weights_only=True)
    if bool(st.get("sharded", False)) != stack.sharded:
        raise SpaError(f"{ck}: the checkpoint was written {'with' if st.get('sharded') else 'without'} FSDP; "
                       f"resume with the same setting (model.fsdp), or delete {ck} to restart the stage")
    params = load_file(str(ck / "trainable.safetensors"))
    named = dict(stack.model.named_parameters())
    with torch.no_grad():
        for n, t in params.items():
            copy_full_into(named[n], t)
    if stack.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(stack.model, opt, st["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    state = json.loads((ck / "state.json").read_text())
    if window is not None and state["window"]:
        window.load_state_dict(state["window"])
    return int(state["step"])


def trim_metrics(path: Path, upto_step: int) -> None:
    """Keep metric lines of steps a resumed run will not redo (and drop a torn last line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def first_logged_loss(metrics_path: Path) -> float | None:
    """The first step's loss of a run being resumed (for the divergence guard)."""
    if not metrics_path.exists():
        return None
    for line in metrics_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step") == 1 and isinstance(row.get("loss"), (int, float)):
            return float(row["loss"])
    return None
