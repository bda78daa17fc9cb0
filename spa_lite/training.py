"""The one training loop: DPO of the stack's trainable adapter against a reference set of adapters.

Seed DPO runs it with pi_ref = pi_init (adapters off) on gold pairs; SPA iterations run it with
pi_ref = pi_{i-1}, self-refinement (Eq. 10) and de-coupled noise detection (Eq. 11-12) on self-labelled pairs.
It checkpoints every ``save_every`` optimizer steps and resumes exactly: the data order is a pure function
of (seed, step), and the checkpoint (spa_lite/checkpoint.py) carries the adapter, optimizer, scheduler and
confidence window.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from spa_lite.checkpoint import first_logged_loss, load_checkpoint, save_checkpoint, trim_metrics
from spa_lite.distributed import get_dist
from spa_lite.dro import dro_dpo_loss
from spa_lite.errors import DivergedError
from spa_lite.fsdp import full_tensor
from spa_lite.io import append_text, dumps
from spa_lite.logps import (TokenizedPair, backbone_hidden, collate_pairs, extrapolated_logps, forward_logits, fused_head,
                            hidden_sequence_logps, sequence_logps)
from spa_lite.losses import ConfidenceWindow, dpo_logits, label_smoothing_weights, refined_dpo_loss
from spa_lite.stack import PolicyStack


log = logging.getLogger(__name__)


@dataclass
class LoopSpec:
    lr: float
    epochs: float
    batch_size: int
    grad_accum: int
    beta: float
    seed: int
    ref: list[str] = field(default_factory=list)  # adapters of pi_ref; [] is pi_init
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 20
    refine: bool = False
    alpha: float = 0.1
    k_percent: float = 10.0
    window: int = 50
    refine_start: float = 0.2
    dnd: bool = False
    lam: float = 0.0
    loss: str = "dpo"
    label_smoothing: float = 0.0
    dro_epsilon: float = 0.0
    dro_pieces: int = 8
    dro_xi_min: float = 1e-3
    diverge_factor: float = 0.0  # stop when a step's loss exceeds this many times the first step's (0: off)

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


def _global_confidences(conf: list[float], dist) -> list[float]:
    """Confidences of the whole global micro-batch in its single-process order.

    Process r holds global positions r, r + N, r + 2N, ... (see ``run_dpo_loop``).
    """
    if dist is None or not dist.enabled:
        return conf
    parts = dist.all_gather_object(conf)
    out = []
    for j in range(sum(len(p) for p in parts)):
        out.append(parts[j % dist.world][j // dist.world])
    return out


def pair_loss(stack: PolicyStack, batch: dict | None, spec: LoopSpec, window: ConfidenceWindow | None, refining: bool,
              *, dist=None, global_n: int | None = None, discard: bool = False) -> StepOutput:
    """Loss of one micro-batch and its diagnostics.

    The loss is the sum of per-pair losses divided by ``global_n`` (the pairs of the micro-batch over all
    processes; by default this process's pairs, i.e. the mean). The reference forward runs without
    gradient; the policy's logits live only as long as the DND confidence needs them. ``batch`` is None
    for a process with no pairs in this micro-batch: it still joins the confidence exchange.
    ``discard``: ``batch`` is a stand-in that a sharded process runs so that its collectives match the
    others'; it contributes a zero loss and no confidences.
    """
    if discard:
        out = pair_loss(stack, batch, spec, None, refining=False, dist=None, global_n=global_n)
        all_conf = _global_confidences([], dist)
        if spec.refine and window is not None:
            window.push(all_conf)
        return StepOutput(out.loss * 0.0, {}, torch.empty(0), torch.empty(0, dtype=torch.bool))
    if batch is None:
        all_conf = _global_confidences([], dist)
        if spec.refine and window is not None:
            window.push(all_conf)  # every process keeps the same window
        zero = sum(p.sum() for p in stack.trainable_parameters()) * 0.0
        return StepOutput(zero, {}, torch.empty(0), torch.empty(0, dtype=torch.bool))
    n = batch["input_ids"].shape[0] // 2
    global_n = global_n or n
    # a sharded base all-gathers inside the model's forward only: use the logits path there
    if not stack.sharded and fused_head(stack.model) is not None:
        with torch.no_grad(), stack.use(spec.ref) as m:
            m.eval()
            backbone, head = fused_head(m)
            ref_h = backbone_hidden(backbone, batch)
            ref_lp = hidden_sequence_logps(ref_h, head, batch)
        with stack.use(stack.theta) as m:
            m.train()  # LoRA dropout, if any, and gradient checkpointing act in train mode only
            backbone, head = fused_head(m)
            pol_h = backbone_hidden(backbone, batch)
        pol_lp = hidden_sequence_logps(pol_h, head, batch)
        mix_lp = None
        if spec.dnd:  # Eq. 12 through the affine head: W((1+lam) h_theta - lam h_ref) + b
            with torch.no_grad():
                mix_lp = hidden_sequence_logps((1.0 + spec.lam) * pol_h.detach() - spec.lam * ref_h, head, batch)
        del ref_h
    else:
        with torch.no_grad(), stack.use(spec.ref) as m:
            m.eval()
            ref_logits = forward_logits(m, batch)
            ref_lp = sequence_logps(ref_logits, batch)
        with stack.use(stack.theta) as m:
            m.train()
            pol_logits = forward_logits(m, batch)
        pol_lp = sequence_logps(pol_logits, batch)
        mix_lp = extrapolated_logps(pol_logits.detach(), ref_logits, spec.lam, batch) if spec.dnd else None
        del pol_logits, ref_logits
    logits = dpo_logits(pol_lp[:n], pol_lp[n:], ref_lp[:n], ref_lp[n:], spec.beta)

    # Eq. 9 (policy itself) or Eq. 11-12 (extrapolated logits) confidence that y_w > y_l.
    if mix_lp is not None:
        conf = torch.sigmoid(dpo_logits(mix_lp[:n], mix_lp[n:], ref_lp[:n], ref_lp[n:], spec.beta))
    else:
        conf = torch.sigmoid(logits.detach())
    tau = float("nan")
    flagged = torch.zeros(n, dtype=torch.bool, device=logits.device)
    all_conf = _global_confidences(conf.float().cpu().tolist(), dist)
    if spec.refine and window is not None:
        tau = window.push(all_conf)
        if refining:
            flagged = conf < tau
    stats: dict[str, float] = {}
    if spec.loss == "dro":
        # Eq. 10 = -log sigma(m) + s * [log sigma(m) - log sigma(-m)]; the first term becomes its
        # worst case over the Wasserstein ball, so epsilon = 0 is exactly the refined loss. With several
        # processes each solves the worst case over its own share of the micro-batch.
        worst, stats = dro_dpo_loss(logits, spec.dro_epsilon, spec.dro_pieces, spec.dro_xi_min)
        smoothing = label_smoothing_weights(flagged, spec.alpha, spec.label_smoothing, logits.dtype)
        loss = (worst * n + (smoothing * (F.logsigmoid(logits) - F.logsigmoid(-logits))).sum()) / global_n
    else:
        loss = refined_dpo_loss(logits, flagged, spec.alpha, spec.label_smoothing).sum() / global_n
    chosen_r = (pol_lp[:n] - ref_lp[:n]).detach() * spec.beta
    rejected_r = (pol_lp[n:] - ref_lp[n:]).detach() * spec.beta
    stats.update(
        reward_chosen=chosen_r.mean().item(),
        reward_rejected=rejected_r.mean().item(),
        reward_margin=(chosen_r - rejected_r).mean().item(),
        reward_acc=(chosen_r > rejected_r).float().mean().item(),
        confidence=conf.mean().item(),
        tau=tau,
        flagged_frac=flagged.float().mean().item(),
    )
    return StepOutput(loss, stats, conf, flagged)


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
        batch = collate_pairs([pairs[i] for i in idx], pad) if idx else None
        out = pair_loss(stack, batch, spec, None, refining=False, global_n=len(gidx))
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


def run_dpo_loop(
    stack: PolicyStack,
    pairs: Sequence[TokenizedPair],
    spec: LoopSpec,
    out_dir: Path,
    on_step: Callable[[int, int, dict], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train ``stack.trainable`` on ``pairs``; write metrics.jsonl, flags.jsonl and checkpoints under ``out_dir``.

    Under several processes each global micro-batch of ``batch_size`` pairs is split across them (process
    r takes positions r, r+N, ...), so the optimizer steps equal a single-process run's with the same
    global batch, up to floating-point summation order. Only the main process writes files.

    Args:
        stop_after: stop (as if killed) after this many optimizer steps; used to test resumption.

    Returns:
        a summary: steps, last-10-step means of the logged statistics, wall time.
    """
    dist = get_dist()
    out_dir.mkdir(parents=True, exist_ok=True)
    params = stack.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = total_steps(len(pairs), spec)
    warmup = math.ceil(spec.warmup_ratio * steps)
    sched = get_cosine_schedule_with_warmup(opt, warmup, steps)
    if dist.main and warmup >= steps:
        warn_short_warmup(out_dir, steps, warmup, spec)
    window = ConfidenceWindow(spec.window, spec.k_percent) if spec.refine else None
    start = load_checkpoint(out_dir, stack, opt, sched, window)
    metrics_path = out_dir / "metrics.jsonl"
    flags_path = out_dir / "flags.jsonl"  # per-pair confidence and flag, for noise-detection analysis
    if dist.main:
        trim_metrics(metrics_path, start)
        trim_metrics(flags_path, start)
    first_loss = dist.broadcast_object(first_logged_loss(metrics_path) if dist.main and start else None)
    dist.barrier()
    pad = stack.tokenizer.pad_token_id
    refine_from = math.floor(spec.refine_start * steps)
    t0 = time.time()
    stack.model.train()
    mf = open(metrics_path, "a", encoding="utf-8") if dist.main else None
    ff = open(flags_path, "a", encoding="utf-8") if dist.main else None
    try:
        for step in range(start, steps):
            sums: dict[str, float] = {}
            counted = 0
            total = 0.0
            flag_rows = []
            for a in range(spec.grad_accum):
                gidx = micro_batch_indices(len(pairs), spec, step * spec.grad_accum + a)
                idx = gidx[dist.rank :: dist.world]
                batch = collate_pairs([pairs[i] for i in idx], pad) if idx else None
                if stack.sharded and batch is None:  # every process must run the same forwards (all-gathers)
                    out = pair_loss(stack, collate_pairs([pairs[gidx[0]]], pad), spec, window,
                                    refining=step >= refine_from, dist=dist, global_n=len(gidx), discard=True)
                else:
                    out = pair_loss(stack, batch, spec, window, refining=step >= refine_from, dist=dist,
                                    global_n=len(gidx))
                # FSDP's reduce-scatter averages over processes; the loss is already a share of the global sum
                (out.loss * (dist.world if stack.sharded else 1) / spec.grad_accum).backward()
                shares = dist.all_gather_object((idx, out.confidences.tolist(), out.flagged.tolist(), out.stats,
                                                 out.loss.item()))
                for sidx, conf, flg, stats, loss in shares:
                    total += loss / spec.grad_accum
                    for i, c, f in zip(sidx, conf, flg):
                        flag_rows.append({"step": step + 1, "pair": i, "row": pairs[i].meta.get("row"),
                                          "truncated": bool(pairs[i].meta.get("truncated")),
                                          "confidence": c, "flagged": f})
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * len(sidx)  # pair-weighted means over processes
                    counted += len(sidx)
            if not stack.sharded:
                _all_reduce_grads(params, dist)
            gnorm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
            gnorm = float(full_tensor(gnorm))
            first_loss = total if first_loss is None and step == 0 else first_loss
            # finite or fail: a diverged step is logged (NaN as null) but never applied or checkpointed
            diverged = divergence(total, gnorm, first_loss, spec)
            lr = sched.get_last_lr()[0]  # the rate this step applies (the scheduler moves on after it)
            if diverged is None:
                opt.step()
                sched.step()
            opt.zero_grad(set_to_none=True)
            row = {"step": step + 1, "loss": total, **{k: v / max(counted, 1) for k, v in sums.items()},
                   "lr": lr, "grad_norm": gnorm,
                   "refining": step >= refine_from and spec.refine, "elapsed_s": round(time.time() - t0, 3)}
            if window is not None:
                row["tau"] = window.tau
            # strict JSON: statistics that do not apply (tau without refinement) are null, not NaN
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            if dist.main:
                append_text(ff, "".join(dumps(r) + "\n" for r in flag_rows), flags_path)
                append_text(mf, dumps(row) + "\n", metrics_path)
            if on_step:
                on_step(step + 1, steps, row)
            if diverged is not None:
                raise DivergedError(step + 1, f"step {step + 1}: {diverged}")
            done = step + 1
            stopping = stop_after is not None and done - start >= stop_after and done < steps
            if (done % spec.save_every == 0 and done < steps) or stopping:
                if dist.main or stack.sharded:
                    save_checkpoint(out_dir, stack, opt, sched, done, window, write=dist.main)
                dist.barrier()
            if stopping:
                raise KeyboardInterrupt(f"stopped after step {done} (stop_after)")
        diverged = _final_check(stack, pairs, spec, dist)
        if diverged is not None:
            raise DivergedError(steps, f"after the last step ({steps}): {diverged}")
    finally:
        for f in (mf, ff):
            if f is not None:
                f.close()
    stack.model.eval()
    summary = {"steps": steps, "pairs": len(pairs), "resumed_from": start, "wall_s": round(time.time() - t0, 2),
               "processes": dist.world, "fsdp": stack.sharded}
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if dist.main else []
    rows = dist.broadcast_object(rows)
    tail = rows[-10:]
    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)

    keys = {k for r in tail for k, v in r.items() if num(v)}
    summary["last10"] = {k: sum(r[k] for r in tail if num(r.get(k))) / sum(1 for r in tail if num(r.get(k)))
                         for k in sorted(keys)}
    summary["first_loss"] = rows[0]["loss"] if rows else None
    return summary
