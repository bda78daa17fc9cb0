"""Several processes (``accelerate launch`` or ``torchrun``): data parallel training and sharded expand.

Launch any stage with e.g. ``accelerate launch --num_processes 2 cli.py train --iter 1 ...`` (add ``--cpu``
for gloo on CPU). Training splits every global micro-batch across processes, sums gradients with one
all-reduce per optimizer step, and pushes the confidences of all processes into every process's window,
so N processes take the same steps as one process with the same global batch. Expand gives shard k to
process k mod N; the main process gathers them into one D_i. Stage bookkeeping (manifests, metrics,
checkpoints, adapters) is written by the main process only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum in place across processes."""
        if self.enabled:
            dev = t.device
            buf = t if self._backend_ok(dev) else t.cpu()
            torch.distributed.all_reduce(buf)
            if buf is not t:
                t.copy_(buf.to(dev))
        return t

    def all_gather_object(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @staticmethod
    def _backend_ok(device: torch.device) -> bool:
        return torch.distributed.get_backend() != "gloo" or device.type == "cpu"


_DIST: Dist | None = None


def get_dist() -> Dist:
    """The process group of this run (initialised once through accelerate when launched with several processes)."""
    global _DIST
    if _DIST is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from accelerate import PartialState

            state = PartialState()  # picks nccl on CUDA, gloo on CPU, from the launcher's environment
            if state.num_processes == world:
                _DIST = Dist(state.process_index, state.num_processes)
            else:  # accelerate leaves some launches single-process (e.g. an FSDP config on CPU): init torch's group
                dist = torch.distributed
                if not dist.is_initialized():
                    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
                _DIST = Dist(dist.get_rank(), dist.get_world_size())
        else:
            _DIST = Dist()
    return _DIST


def local_device() -> str | None:
    """The CUDA device of this process under a launcher, else None (the recipe decides)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None
