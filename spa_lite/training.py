"""The one training loop: DPO of the stack's trainable adapter against a reference set of adapters.

Seed DPO runs it with pi_ref = pi_init (adapters off) on gold pairs; SPA iterations run it with
pi_ref = pi_{i-1}, self-refinement (Eq. 10) and de-coupled noise detection (Eq. 11-12) on self-labelled pairs.
It checkpoints every ``save_every`` optimizer steps and resumes exactly: the data order is a pure function
of (seed, step), and the checkpoint carries the adapter, optimizer, scheduler and confidence window.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from spa_lite.io import atomic_dir, atomic_write_text
from spa_lite.logps import TokenizedPair, collate_pairs, extrapolated_logps, forward_logits, sequence_logps
from spa_lite.losses import ConfidenceWindow, dpo_logits, refined_dpo_loss
from spa_lite.stack import PolicyStack


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


def pair_loss(stack: PolicyStack, batch: dict, spec: LoopSpec, window: ConfidenceWindow | None, refining: bool) -> StepOutput:
    """Loss of one micro-batch (mean over its pairs) and its diagnostics.

    The reference forward runs without gradient; the policy forward keeps its logits only as long as the
    DND confidence needs them.
    """
    n = batch["input_ids"].shape[0] // 2
    with torch.no_grad(), stack.use(spec.ref) as m:
        m.eval()
        ref_logits = forward_logits(m, batch)
        ref_lp = sequence_logps(ref_logits, batch)
    with stack.use(stack.theta) as m:
        m.train()  # LoRA dropout, if any, and gradient checkpointing act in train mode only
        pol_logits = forward_logits(m, batch)
    pol_lp = sequence_logps(pol_logits, batch)
    logits = dpo_logits(pol_lp[:n], pol_lp[n:], ref_lp[:n], ref_lp[n:], spec.beta)

    # Eq. 9 (policy itself) or Eq. 11-12 (extrapolated logits) confidence that y_w > y_l.
    if spec.dnd:
        mix_lp = extrapolated_logps(pol_logits.detach(), ref_logits, spec.lam, batch)
        conf = torch.sigmoid(dpo_logits(mix_lp[:n], mix_lp[n:], ref_lp[:n], ref_lp[n:], spec.beta))
    else:
        conf = torch.sigmoid(logits.detach())
    del pol_logits, ref_logits
    tau = float("nan")
    flagged = torch.zeros(n, dtype=torch.bool, device=logits.device)
    if spec.refine and window is not None:
        tau = window.push(conf)
        if refining:
            flagged = conf < tau
    smoothing = torch.clamp(spec.alpha * flagged.float(), min=spec.label_smoothing)
    stats: dict[str, float] = {}
    if spec.loss == "dro":
        from spa_lite.dro import dro_dpo_loss

        # Eq. 10 = -log sigma(m) + s * [log sigma(m) - log sigma(-m)]; the first term becomes its
        # worst case over the Wasserstein ball, so epsilon = 0 is exactly the refined loss.
        worst, stats = dro_dpo_loss(logits, spec.dro_epsilon, spec.dro_pieces, spec.dro_xi_min)
        loss = worst + (smoothing * (F.logsigmoid(logits) - F.logsigmoid(-logits))).mean()
    else:
        per = -(1 - smoothing) * F.logsigmoid(logits) - smoothing * F.logsigmoid(-logits)
        loss = per.mean()
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


def _checkpoint_paths(out_dir: Path) -> Path:
    return out_dir / "checkpoint"


def save_checkpoint(out_dir: Path, stack: PolicyStack, opt, sched, step: int, window: ConfidenceWindow | None) -> None:
    params = {n: p.detach().cpu().contiguous() for n, p in stack.model.named_parameters() if p.requires_grad}
    with atomic_dir(_checkpoint_paths(out_dir)) as tmp:
        save_file(params, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "window": window.state_dict() if window else None}))


def load_checkpoint(out_dir: Path, stack: PolicyStack, opt, sched, window: ConfidenceWindow | None) -> int:
    ck = _checkpoint_paths(out_dir)
    if not (ck / "state.json").exists():
        return 0
    params = load_file(str(ck / "trainable.safetensors"))
    named = dict(stack.model.named_parameters())
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t.to(named[n].device))
    st = torch.load(ck / "optim.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    state = json.loads((ck / "state.json").read_text())
    if window is not None and state["window"]:
        window.load_state_dict(state["window"])
    return int(state["step"])


def _trim_metrics(path: Path, upto_step: int) -> None:
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


def run_dpo_loop(
    stack: PolicyStack,
    pairs: Sequence[TokenizedPair],
    spec: LoopSpec,
    out_dir: Path,
    on_step: Callable[[int, int, dict], None] | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train ``stack.trainable`` on ``pairs``; write metrics.jsonl and checkpoints under ``out_dir``.

    Args:
        stop_after: stop (as if killed) after this many optimizer steps; used to test resumption.

    Returns:
        a summary: steps, last-10-step means of the logged statistics, wall time.
    """
    from transformers import get_cosine_schedule_with_warmup

    out_dir.mkdir(parents=True, exist_ok=True)
    params = stack.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = total_steps(len(pairs), spec)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(spec.warmup_ratio * steps), steps)
    window = ConfidenceWindow(spec.window, spec.k_percent) if spec.refine else None
    start = load_checkpoint(out_dir, stack, opt, sched, window)
    metrics_path = out_dir / "metrics.jsonl"
    flags_path = out_dir / "flags.jsonl"  # per-pair confidence and flag, for noise-detection analysis
    _trim_metrics(metrics_path, start)
    _trim_metrics(flags_path, start)
    pad = stack.tokenizer.pad_token_id
    refine_from = math.floor(spec.refine_start * steps)
    t0 = time.time()
    stack.model.train()
    with open(metrics_path, "a", encoding="utf-8") as mf, open(flags_path, "a", encoding="utf-8") as ff:
        for step in range(start, steps):
            acc: dict[str, float] = {}
            total = 0.0
            for a in range(spec.grad_accum):
                idx = micro_batch_indices(len(pairs), spec, step * spec.grad_accum + a)
                batch = collate_pairs([pairs[i] for i in idx], pad)
                out = pair_loss(stack, batch, spec, window, refining=step >= refine_from)
                (out.loss / spec.grad_accum).backward()
                for i, c, f in zip(idx, out.confidences.tolist(), out.flagged.tolist()):
                    ff.write(json.dumps({"step": step + 1, "pair": i, "row": pairs[i].meta.get("row"),
                                         "confidence": c, "flagged": f}) + "\n")
                total += out.loss.item() / spec.grad_accum
                for k, v in out.stats.items():
                    acc[k] = acc.get(k, 0.0) + v / spec.grad_accum
            gnorm = torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm).item()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            row = {"step": step + 1, "loss": total, **acc, "lr": sched.get_last_lr()[0], "grad_norm": gnorm,
                   "refining": step >= refine_from and spec.refine, "elapsed_s": round(time.time() - t0, 3)}
            if window is not None:
                row["tau"] = window.tau
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            ff.flush()
            if on_step:
                on_step(step + 1, steps, row)
            done = step + 1
            if done % spec.save_every == 0 and done < steps:
                save_checkpoint(out_dir, stack, opt, sched, done, window)
            if stop_after is not None and done - start >= stop_after and done < steps:
                save_checkpoint(out_dir, stack, opt, sched, done, window)
                raise KeyboardInterrupt(f"stopped after step {done} (stop_after)")
    stack.model.eval()
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    tail = rows[-10:]
    keys = [k for k in tail[0] if isinstance(tail[0][k], (int, float)) and not isinstance(tail[0][k], bool)] if tail else []
    summary = {"steps": steps, "pairs": len(pairs), "resumed_from": start, "wall_s": round(time.time() - t0, 2)}
    summary["last10"] = {k: sum(r[k] for r in tail if isinstance(r.get(k), (int, float))) / len(tail) for k in keys}
    summary["first_loss"] = rows[0]["loss"] if rows else None
    return summary
