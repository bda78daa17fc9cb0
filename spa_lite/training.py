"""The one training loop: DPO of the stack's trainable adapter against a reference set of adapters.

Seed DPO runs it with pi_ref = pi_init (adapters off) on gold pairs; SPA iterations run it with
pi_ref = pi_{i-1}, self-refinement (Eq. 10) and de-coupled noise detection (Eq. 11-12) on self-labelled pairs.
It checkpoints every ``save_every`` optimizer steps and resumes exactly: the data order is a pure function
of (seed, step), and the checkpoint (spa_lite/checkpoint.py) carries the adapter, optimizer, scheduler and
confidence window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from spa_lite.checkpoint import first_logged_loss, load_checkpoint, save_checkpoint, trim_metrics
from spa_lite.config import TrainConfig
from spa_lite.distributed import Dist, get_dist
from spa_lite.errors import DivergedError
from spa_lite.fsdp import full_tensor
from spa_lite.io import append_text, dumps
from spa_lite.logps import BatchLogps, TokenizedPair, batch_logps, collate_pairs
from spa_lite.losses import ConfidenceWindow, pair_logits, preference_loss
from spa_lite.stack import PolicyStack

log = logging.getLogger(__name__)


def _recipe_default(name: str):
    """The recipe's default of loop setting ``name``: spa_lite/config.py holds each one (``train`` extends
    ``seed_dpo``)."""
    return TrainConfig.__dataclass_fields__[name].default


@dataclass
class LoopSpec:
    """One training loop's settings: a recipe section's (``from_config``) and what the stage decides.

    A recipe setting left out takes the recipe's default; refinement and DND stay off unless the stage turns them
    on (seed DPO never refines).
    """

    lr: float
    epochs: float
    batch_size: int
    grad_accum: int
    beta: float
    seed: int
    ref: list[str] = field(default_factory=list)  # adapters of pi_ref; [] is pi_init
    warmup_ratio: float = _recipe_default("warmup_ratio")
    weight_decay: float = _recipe_default("weight_decay")
    max_grad_norm: float = _recipe_default("max_grad_norm")
    save_every: int = _recipe_default("save_every")
    refine: bool = False
    alpha: float = _recipe_default("alpha")
    k_percent: float = _recipe_default("k_percent")
    window: int = _recipe_default("window")
    refine_start: float = _recipe_default("refine_start")
    dnd: bool = False
    lam: float = 0.0  # Eq. 12's lambda of this iteration (the stage reads it off train.lambdas)
    loss: str = _recipe_default("loss")
    label_smoothing: float = _recipe_default("label_smoothing")
    dro_epsilon: float = _recipe_default("dro_epsilon")
    dro_pieces: int = _recipe_default("dro_pieces")
    dro_xi_min: float = _recipe_default("dro_xi_min")
    diverge_factor: float = _recipe_default("diverge_factor")  # 0: off

    @classmethod
    def from_config(cls, config, **settings) -> LoopSpec:
        """The loop settings of a recipe section (``seed_dpo`` or ``train``): every LoopSpec field the section
        has, by name, then ``settings`` (what the stage decides: seed, ref, lam, ...)."""
        own = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
        return cls(**{**own, **settings})


def total_steps(n_pairs: int, spec: LoopSpec) -> int:
    micro_per_epoch = math.ceil(n_pairs / spec.batch_size)
    return max(1, math.ceil(micro_per_epoch * spec.epochs / spec.grad_accum))


def micro_batch_indices(n_pairs: int, spec: LoopSpec, micro: int) -> list[int]:
    """Pair indices of global micro-batch ``micro``: epoch e uses a permutation seeded by (seed, e)."""
    per_epoch = math.ceil(n_pairs / spec.batch_size)
    epoch, pos = divmod(micro, per_epoch)
    order = list(range(n_pairs))
    random.Random(spec.seed * 1_000_003 + epoch).shuffle(order)
    return order[pos * spec.batch_size : (pos + 1) * spec.batch_size]


@dataclass
class StepOutput:
    loss: torch.Tensor
    stats: dict[str, float]
    confidences: torch.Tensor  # per pair, detached
    flagged: torch.Tensor  # per pair, bool


def pair_loss(stack: PolicyStack, batch: dict, spec: LoopSpec, window: ConfidenceWindow | None, refining: bool,
              *, global_n: int | None = None) -> StepOutput:
    """Loss of one micro-batch and its diagnostics.

    The loss is the sum of per-pair losses (``losses.preference_loss``) divided by ``global_n`` (the pairs of the
    micro-batch over all processes; by default this batch's pairs, i.e. the mean). With ``spec.refine`` the
    batch's confidences enter ``window`` (anything with ``push(confidences) -> tau``: the loop's gathers every
    process's share first) and, while ``refining``, the pairs below tau are flagged.
    """
    n = batch["input_ids"].shape[0] // 2
    lp = batch_logps(stack, batch, stack.theta, spec.ref, (spec.lam,) if spec.dnd else (), train=True)
    logits = pair_logits(lp.policy, lp.ref, spec.beta)
    # Eq. 9 (policy itself) or Eq. 11-12 (extrapolated logits) confidence that y_w > y_l.
    if spec.dnd:
        conf = torch.sigmoid(pair_logits(lp.extrapolated[spec.lam], lp.ref, spec.beta))
    else:
        conf = torch.sigmoid(logits.detach())
    tau = float("nan")
    flagged = torch.zeros(n, dtype=torch.bool, device=logits.device)
    if spec.refine and window is not None:
        tau = window.push(conf.float().cpu().tolist())
        if refining:
            flagged = conf < tau
    loss, stats = preference_loss(logits, flagged, spec)
    stats.update(_reward_stats(lp, spec.beta), confidence=conf.mean().item(), tau=tau,
                 flagged_frac=flagged.float().mean().item())
    return StepOutput(loss / (global_n or n), stats, conf, flagged)


def _reward_stats(lp: BatchLogps, beta: float) -> dict[str, float]:
    """DPO's implicit rewards beta * log pi/pi_ref of the chosen and rejected responses, as TRL logs them."""
    n = lp.policy.shape[0] // 2
    chosen_r = (lp.policy[:n] - lp.ref[:n]).detach() * beta
    rejected_r = (lp.policy[n:] - lp.ref[n:]).detach() * beta
    return {"reward_chosen": chosen_r.mean().item(), "reward_rejected": rejected_r.mean().item(),
            "reward_margin": (chosen_r - rejected_r).mean().item(),
            "reward_acc": (chosen_r > rejected_r).float().mean().item()}


def _no_pairs(params: list[torch.Tensor]) -> StepOutput:
    """A process without pairs in a micro-batch: a zero loss that still reaches every trainable parameter."""
    zero = sum(p.sum() for p in params) * 0.0
    return StepOutput(zero, {}, torch.empty(0), torch.empty(0, dtype=torch.bool))


def divergence(loss: float, grad_norm: float, first_loss: float | None, spec: LoopSpec) -> str | None:
    """Why a step's numbers mean training has diverged, or None.

    Non-finite loss or gradient norm; a gradient norm of exactly 0 at a loss that is not 0 (a saturated,
    dead adapter: with lr 1e10 the weights reach ~1e10 and every logit is flat); or, with
    ``spec.diverge_factor`` k > 0, a loss above k times the first step's.
    """
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite"
    if grad_norm == 0.0 and loss > 1e-6:
        return f"gradient norm 0 at loss {loss:.4g}: the adapter no longer learns"
    if spec.diverge_factor > 0 and first_loss is not None and loss > spec.diverge_factor * first_loss:
        return f"loss {loss:.4g} is above diverge_factor {spec.diverge_factor:g} x the first step's {first_loss:.4g}"
    return None


def _final_check(stack: PolicyStack, pairs: Sequence[TokenizedPair], spec: LoopSpec, dist) -> str | None:
    """One more forward and backward of the first micro-batch with the trained adapter, not applied.

    The last optimizer step's update is otherwise never evaluated: weights of ~1e30 are finite yet give NaN
    logits, and a dead adapter only shows as a zero gradient. Returns ``divergence``'s reason or None.
    """
    params = stack.trainable_parameters()
    pad = stack.tokenizer.pad_token_id
    gidx = micro_batch_indices(len(pairs), spec, 0)
    if stack.sharded:  # every process runs the same forward (its all-gathers must match)
        out = pair_loss(stack, collate_pairs([pairs[i] for i in gidx], pad), spec, None, refining=False)
        out.loss.backward()
        loss = out.loss.item()
    else:
        idx = gidx[dist.rank :: dist.world]
        out = (pair_loss(stack, collate_pairs([pairs[i] for i in idx], pad), spec, None, refining=False,
                         global_n=len(gidx)) if idx else _no_pairs(params))
        out.loss.backward()
        _all_reduce_grads(params, dist)
        loss = sum(dist.all_gather_object(out.loss.item()))
    gnorm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, float("inf"))))
    for p in params:
        p.grad = None
    return divergence(loss, gnorm, None, spec)


def _all_reduce_grads(params: list[torch.Tensor], dist) -> None:
    """Sum gradients over processes with one flat all-reduce (each loss is already divided by the global count)."""
    if not dist.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce_(flat)
    offset = 0
    for p, g in zip(params, grads):
        k = g.numel()
        p.grad = flat[offset : offset + k].view_as(p).to(p.dtype)
        offset += k


def warn_short_warmup(out_dir: Path, steps: int, warmup: int, spec: LoopSpec) -> None:
    """Say so when a stage ends before its warmup does: the learning rate never reaches ``lr`` (and a one-step
    stage applies lr 0: its adapter does not move)."""
    log.warning("%s: %d optimizer step%s but warmup_ratio %g needs %d to reach lr %g: the peak rate is never "
                "applied (step 1 applies 0); lower warmup_ratio or train on more pairs or epochs", out_dir, steps,
                "" if steps == 1 else "s", spec.warmup_ratio, warmup, spec.lr)


class _SharedWindow:
    """The confidence window as every process keeps it: ``push`` first gathers the confidences of all processes'
    shares of the micro-batch, in single-process order (process r holds global positions r, r + N, r + 2N, ...)."""

    def __init__(self, window: ConfidenceWindow, dist: Dist):
        self.window, self.dist = window, dist

    def push(self, conf: list[float]) -> float:
        if self.dist.enabled:
            parts = self.dist.all_gather_object(list(conf))
            conf = [parts[j % self.dist.world][j // self.dist.world] for j in range(sum(len(p) for p in parts))]
        return self.window.push(conf)


@dataclass
class _Run:
    """What the steps of one ``run_dpo_loop`` share."""

    stack: PolicyStack
    pairs: Sequence[TokenizedPair]
    spec: LoopSpec
    out_dir: Path
    dist: Dist
    params: list[torch.Tensor]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    window: ConfidenceWindow | None  # checkpointed; None without refinement
    steps: int
    t0: float

    @property
    def refine_from(self) -> int:
        return math.floor(self.spec.refine_start * self.steps)


def run_dpo_loop(
    stack: PolicyStack,
    pairs: Sequence[TokenizedPair],
    spec: LoopSpec,
    out_dir: Path,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Train ``stack.trainable`` on ``pairs``; write metrics.jsonl, flags.jsonl and checkpoints under ``out_dir``.

    Under several processes each global micro-batch of ``batch_size`` pairs is split across them (process
    r takes positions r, r+N, ...), so the optimizer steps equal a single-process run's with the same
    global batch, up to floating-point summation order. Only the main process writes files.

    Args:
        on_step: called after each optimizer step with (step, steps, its metrics row); an exception raised there
            stops the run before that step's checkpoint, as a kill would.

    Returns:
        a summary: steps, last-10-step means of the logged statistics, wall time.
    """
    dist = get_dist()
    out_dir.mkdir(parents=True, exist_ok=True)
    params = stack.trainable_parameters()
    opt, sched, steps = _optimizer(params, len(pairs), spec, out_dir, dist)
    window = ConfidenceWindow(spec.window, spec.k_percent) if spec.refine else None
    start = load_checkpoint(out_dir, stack, opt, sched, window)
    first_loss = _resume_logs(out_dir, start, dist)
    run = _Run(stack, pairs, spec, out_dir, dist, params, opt, sched, window, steps, time.time())
    stack.model.train()
    with _step_logs(out_dir, dist.main) as write:
        for step in range(start, steps):
            first_loss = _optimizer_step(run, step, first_loss, write, on_step)
            _save_checkpoint(run, step + 1)
        diverged = _final_check(stack, pairs, spec, dist)
        if diverged is not None:
            raise DivergedError(steps, f"after the last step ({steps}): {diverged}")
    stack.model.eval()
    return _summary(run, start)


def _optimizer(params: list[torch.Tensor], n_pairs: int, spec: LoopSpec, out_dir: Path, dist: Dist) -> tuple:
    """AdamW, its cosine schedule with linear warmup, and the number of optimizer steps."""
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = total_steps(n_pairs, spec)
    warmup = math.ceil(spec.warmup_ratio * steps)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    if dist.main and warmup >= steps:
        warn_short_warmup(out_dir, steps, warmup, spec)
    return opt, sched, steps


def _resume_logs(out_dir: Path, start: int, dist: Dist) -> float | None:
    """Cut the step logs back to the checkpoint's ``start`` steps; the first step's loss when it is logged."""
    metrics_path = out_dir / "metrics.jsonl"
    if dist.main:
        trim_metrics(metrics_path, start)
        trim_metrics(out_dir / "flags.jsonl", start)
    first_loss = dist.broadcast_object(first_logged_loss(metrics_path) if dist.main and start else None)
    dist.barrier()
    return first_loss


@contextlib.contextmanager
def _step_logs(out_dir: Path, main: bool) -> Iterator[Callable[[list[dict], dict], None]]:
    """``write(flag_rows, row)`` appends one step's rows to flags.jsonl and metrics.jsonl (main process only)."""
    if not main:
        yield lambda flag_rows, row: None
        return
    metrics_path = out_dir / "metrics.jsonl"
    flags_path = out_dir / "flags.jsonl"  # per-pair confidence and flag, for noise-detection analysis
    with open(metrics_path, "a", encoding="utf-8") as mf, open(flags_path, "a", encoding="utf-8") as ff:
        def write(flag_rows: list[dict], row: dict) -> None:
            append_text(ff, "".join(dumps(r) + "\n" for r in flag_rows), flags_path)
            append_text(mf, dumps(row) + "\n", metrics_path)

        yield write


def _optimizer_step(run: _Run, step: int, first_loss: float | None, write, on_step) -> float | None:
    """Step ``step`` (0-based): its micro-batches, clipping, the divergence check, the update and its log rows.

    Returns the first step's loss (this step's at step 0). Raises DivergedError after logging a diverged step.
    """
    total, means, flag_rows = _accumulate(run, step)
    if not run.stack.sharded:
        _all_reduce_grads(run.params, run.dist)
    gnorm = float(full_tensor(torch.nn.utils.clip_grad_norm_(run.params, run.spec.max_grad_norm)))
    first_loss = total if first_loss is None and step == 0 else first_loss
    # finite or fail: a diverged step is logged (NaN as null) but never applied or checkpointed
    diverged = divergence(total, gnorm, first_loss, run.spec)
    lr = run.sched.get_last_lr()[0]  # the rate this step applies (the scheduler moves on after it)
    if diverged is None:
        run.opt.step()
        run.sched.step()
    run.opt.zero_grad(set_to_none=True)
    row = {"step": step + 1, "loss": total, **means, "lr": lr, "grad_norm": gnorm,
           "refining": step >= run.refine_from and run.spec.refine, "elapsed_s": round(time.time() - run.t0, 3)}
    if run.window is not None:
        row["tau"] = run.window.tau
    # strict JSON: statistics that do not apply (tau without refinement) are null, not NaN
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    write(flag_rows, row)
    if on_step:
        on_step(step + 1, run.steps, row)
    if diverged is not None:
        raise DivergedError(step + 1, f"step {step + 1}: {diverged}")
    return first_loss


def _accumulate(run: _Run, step: int) -> tuple[float, dict[str, float], list[dict]]:
    """Forward and backward of step ``step``'s micro-batches: the step's loss, its statistics (pair-weighted means
    over processes) and a flag row per pair."""
    spec, dist = run.spec, run.dist
    sums: dict[str, float] = {}
    counted, total, flag_rows = 0, 0.0, []
    for a in range(spec.grad_accum):
        gidx = micro_batch_indices(len(run.pairs), spec, step * spec.grad_accum + a)
        idx, out = _micro_step(run, gidx, refining=step >= run.refine_from)
        # FSDP's reduce-scatter averages over processes; the loss is already a share of the global sum
        (out.loss * (dist.world if run.stack.sharded else 1) / spec.grad_accum).backward()
        shares = dist.all_gather_object((idx, out.confidences.tolist(), out.flagged.tolist(), out.stats,
                                         out.loss.item()))
        for sidx, conf, flg, stats, loss in shares:
            total += loss / spec.grad_accum
            for i, c, f in zip(sidx, conf, flg):
                meta = run.pairs[i].meta
                flag_rows.append({"step": step + 1, "pair": i, "row": meta.get("row"),
                                  "truncated": bool(meta.get("truncated")), "confidence": c, "flagged": f})
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * len(sidx)  # pair-weighted means over processes
            counted += len(sidx)
    return total, {k: v / max(counted, 1) for k, v in sums.items()}, flag_rows


def _micro_step(run: _Run, gidx: list[int], refining: bool) -> tuple[list[int], StepOutput]:
    """This process's share of the global micro-batch ``gidx`` (positions rank, rank + N, ...) and its output.

    A process with no pair in it contributes a zero loss and still joins the confidence exchange; under FSDP it
    also runs a stand-in pair, since its all-gathers must match the other processes'.
    """
    pad = run.stack.tokenizer.pad_token_id
    window = _SharedWindow(run.window, run.dist) if run.window is not None else None
    idx = gidx[run.dist.rank :: run.dist.world]
    if idx:
        batch = collate_pairs([run.pairs[i] for i in idx], pad)
        return idx, pair_loss(run.stack, batch, run.spec, window, refining=refining, global_n=len(gidx))
    if run.stack.sharded:
        out = pair_loss(run.stack, collate_pairs([run.pairs[gidx[0]]], pad), run.spec, None, refining=False,
                        global_n=len(gidx))
        out = StepOutput(out.loss * 0.0, {}, torch.empty(0), torch.empty(0, dtype=torch.bool))
    else:
        out = _no_pairs(run.params)
    if window is not None:
        window.push([])  # every process keeps the same window
    return idx, out


def _save_checkpoint(run: _Run, done: int) -> None:
    """Checkpoint every ``save_every`` steps but the last (tests kill a run through ``on_step``, tests/inject.py)."""
    if done % run.spec.save_every == 0 and done < run.steps:
        if run.dist.main or run.stack.sharded:
            save_checkpoint(run.out_dir, run.stack, run.opt, run.sched, done, run.window, write=run.dist.main)
        run.dist.barrier()


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _summary(run: _Run, start: int) -> dict:
    """Steps, pairs, wall time and the means of the last 10 logged steps (read back from metrics.jsonl)."""
    summary = {"steps": run.steps, "pairs": len(run.pairs), "resumed_from": start,
               "wall_s": round(time.time() - run.t0, 2), "processes": run.dist.world, "fsdp": run.stack.sharded}
    metrics_path = run.out_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if run.dist.main else []
    rows = run.dist.broadcast_object(rows)
    tail = rows[-10:]
    keys = {k for r in tail for k, v in r.items() if _number(v)}
    summary["last10"] = {k: sum(r[k] for r in tail if _number(r.get(k))) / sum(1 for r in tail if _number(r.get(k)))
                         for k in sorted(keys)}
    summary["first_loss"] = rows[0]["loss"] if rows else None
    return summary
