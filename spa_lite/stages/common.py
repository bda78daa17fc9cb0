"""What the stages share: tokenising pairs and the training loop with a progress bar (``load_stack`` lives in
:mod:`spa_lite.loading`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from spa_lite.distributed import get_dist
from spa_lite.errors import DivergedError
from spa_lite.logps import TokenizedPair, tokenize_pair, truncate_pair
from spa_lite.memory import trim_after_step
from spa_lite.runs import StageRun
from spa_lite.stack import PolicyStack
from spa_lite.training import run_dpo_loop, total_steps
from spa_lite.ui import progress


def tokenize_pairs(tokenizer, rows: Sequence[dict], max_length: int, max_prompt_length: int,
                   truncation: str = "truncate") -> tuple[list[TokenizedPair], int]:
    """Tokenise normalised pairs and apply ``model.truncation`` to those over the length limits.

    ``truncate`` (the default, as TRL and the paper): a pair longer than ``max_length`` is cut by
    :func:`~spa_lite.logps.truncate_pair` and marked ``meta["truncated"]``. ``skip``: a pair longer than
    ``max_length`` or with a prompt over ``max_prompt_length`` is left out. Returns (pairs, skipped count); the
    truncated count is ``truncated_count(pairs)``.
    """
    if truncation not in ("truncate", "skip"):
        raise ValueError(f"truncation must be 'truncate' or 'skip', not {truncation!r}")
    out, skipped = [], 0
    for k, r in enumerate(rows):
        tp = tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"], {"row": k, "source": r.get("source")})
        if truncation == "truncate":
            out.append(truncate_pair(tp, max_length, max_prompt_length))
            continue
        longest = len(tp.prompt_ids) + max(len(tp.chosen_ids), len(tp.rejected_ids))
        if len(tp.prompt_ids) > max_prompt_length or longest > max_length:
            skipped += 1
            continue
        out.append(tp)
    return out, skipped


def truncated_count(pairs: Sequence[TokenizedPair]) -> int:
    """How many of ``pairs`` :func:`~spa_lite.logps.truncate_pair` cut."""
    return sum(bool(p.meta.get("truncated")) for p in pairs)


def progress_info(row: dict, refine: bool) -> str:
    """The progress line's statistics; a value logged as null (NaN) shows as nan."""
    def f(key: str, spec: str) -> str:
        v = row.get(key)
        return "nan" if v is None else format(v, spec)

    info = f"loss {f('loss', '.4f')} margin {f('reward_margin', '+.3f')}"
    if refine:
        info += f" flagged {f('flagged_frac', '.2f')}"
    return info


def _diverged_message(title: str, out_dir, detail: str) -> str:
    ck = Path(out_dir) / "checkpoint" / "state.json"
    kept = ""
    if ck.exists():
        try:
            kept = f", its last checkpoint (step {json.loads(ck.read_text())['step']}) is kept"
        except (ValueError, KeyError):
            pass
    return (f"{title} diverged: {detail}; {out_dir} is not complete{kept}. Lower the learning rate (or raise "
            f"warmup_ratio) and rerun the stage with --force")


def fit_and_save(st: StageRun, stack: PolicyStack, pairs: list[TokenizedPair], spec, title: str) -> dict:
    """Run the training loop of stage run ``st`` with a progress bar, then save the trainable adapter to
    ``st.dir/adapter``. Each step's row goes to the stage's trackers (``st.log_step``)."""
    dist = get_dist()
    out_dir = st.dir
    with progress(enabled=dist.main) as p:
        task = p.add_task(title, total=total_steps(len(pairs), spec), info="")

        def on_step(step: int, total: int, row: dict) -> None:
            trim_after_step()  # memory.malloc tuned: the step's freed activations back to the OS before the next
            p.update(task, completed=step, info=progress_info(row, spec.refine))
            st.log_step(row)  # report_to trackers, live

        try:
            summary = run_dpo_loop(stack, pairs, spec, out_dir, on_step=on_step)
        except DivergedError as e:
            raise DivergedError(e.step, _diverged_message(title, out_dir, str(e))) from None
    state = stack.trainable_state() if stack.sharded else None  # gathered on every process
    weights = state.values() if state is not None else [p.detach() for p in stack.trainable_parameters()]
    if not all(bool(torch.isfinite(w).all()) for w in weights):
        raise DivergedError(summary["steps"], _diverged_message(title, out_dir, "the trained adapter's weights are not finite"))
    if dist.main:
        stack.save_trainable(out_dir / "adapter", state)
    dist.barrier()
    return summary
