"""Faults injected through the callbacks the stages already use, so that no production signature carries a test
hook: the training loops' ``on_step`` (called after a step's row is in metrics.jsonl, before its checkpoint) and
expand's per-shard ``expand_shard`` (each shard is written atomically when it returns)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def crash_at_step(module, loop: str, step: int) -> Iterator[None]:
    """While the ``with`` lasts, ``module.<loop>`` (``run_dpo_loop`` as ``spa_lite.stages.common`` imported it, or
    ``run_reward_loop`` as ``spa_lite.stages.reward`` did) raises KeyboardInterrupt from its ``on_step`` callback
    at optimizer step ``step``: that step's metrics row is written and its checkpoint is not, as with a process
    killed there."""
    real = getattr(module, loop)

    def loop_with_crash(*a, on_step=None, **k):
        def on_step_then_crash(s: int, total: int, row: dict) -> None:
            if on_step is not None:
                on_step(s, total, row)
            if s == step:
                raise KeyboardInterrupt(f"crash at step {step}")

        return real(*a, on_step=on_step_then_crash, **k)

    setattr(module, loop, loop_with_crash)
    try:
        yield
    finally:
        setattr(module, loop, real)


@contextlib.contextmanager
def crash_after_shards(n: int) -> Iterator[None]:
    """While the ``with`` lasts, expand is killed (KeyboardInterrupt) when it starts a shard after ``n`` new ones."""
    from spa_lite.stages import expand

    real = expand.expand_shard
    made = []

    def shard(*a, **k):
        if len(made) == n:
            raise KeyboardInterrupt(f"crash after {n} shards")
        made.append(1)
        return real(*a, **k)

    expand.expand_shard = shard
    try:
        yield
    finally:
        expand.expand_shard = real
