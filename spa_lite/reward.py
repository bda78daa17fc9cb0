"""An explicit Bradley-Terry reward model on the gold pairs D0: one more LoRA adapter (``reward``) on the same
base as the policies, plus a scalar head on the final hidden state of each sequence's last token.

r(x, y) = w . h_L(x, y)[last token], as transformers' ``*ForSequenceClassification`` (num_labels = 1) and TRL's
RewardTrainer score a sequence. The last token is the last one the attention mask covers (batches are
right-padded): the response's end-of-turn token. transformers finds it by token id instead, which is the same
token unless the pad token is the end-of-turn token (SmolLM2), where it would take the token before.

The loss is TRL's: -log sigmoid(r_chosen - r_rejected), plus ``center_rewards_coefficient * mean((r_chosen +
r_rejected)^2)`` when that is on. A judged pair's p(y1 > y2) = sigmoid(r(y1) - r(y2)): the Bradley-Terry model's
own probability, so no beta scales it (Eq. 7's beta turns log-ratios into rewards; this reward is trained to be
a logit already).

With ``reward.length_head`` (ODIN, Chen et al., "ODIN: Disentangled Reward Mitigates Hacking in RLHF", ICML
2024) the head has two rows on the same features: r_Q (quality, row 0) and r_L (length, row 1). Training puts the
Bradley-Terry loss on r_Q + r_L and adds |Pearson(r_Q, |y|)| - Pearson(r_L, |y|) over the micro-batch's responses
(|y| in tokens) and |cos(w_Q, w_L)|, each with weight 1; every score read from the model (judging, the held-out
accuracy) is r_Q alone, the paper's discarding of the length head.

The loop here mirrors ``spa_lite.training.run_dpo_loop`` (the data order is a pure function of (seed, step);
checkpoints every ``save_every`` steps resume exactly) for a single process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import get_cosine_schedule_with_warmup

from spa_lite.checkpoint import first_logged_loss, trim_metrics
from spa_lite.config import Recipe
from spa_lite.errors import DivergedError, SpaError
from spa_lite.io import append_text, atomic_dir, dumps, finite_or_null
from spa_lite.layout import REWARD_HEAD_FILE, REWARD_STAGE, stage_dir
from spa_lite.logps import TokenizedPair, collate_pairs, collate_sequences
from spa_lite.runs import require_stage
from spa_lite.stack import PolicyStack
from spa_lite.training import divergence, micro_batch_indices, total_steps

#: the reward model's adapter in a stack (never part of a policy)
REWARD_ADAPTER = "reward"


@dataclass
class RewardModel:
    """The reward adapter of ``stack`` plus its head (a bias-free ``Linear(hidden, 1)``, float32; ``Linear(hidden,
    2)`` with ``reward.length_head``: quality, then length)."""

    stack: PolicyStack
    head: torch.nn.Linear
    adapter: str = REWARD_ADAPTER

    def parameters(self) -> list[torch.nn.Parameter]:
        """What training updates: the reward adapter's LoRA weights, then the head."""
        return self.stack.trainable_parameters() + [self.head.weight]


def new_head(hidden_size: int, seed: int, device: torch.device | str = "cpu", std: float = 0.02,
             heads: int = 1) -> torch.nn.Linear:
    """A fresh head of ``heads`` rows (2: ODIN's quality and length), N(0, std) as transformers initialises a
    classification head, seeded by ``seed`` (row 0 is the same draw whatever ``heads`` is)."""
    head = torch.nn.Linear(hidden_size, heads, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * std)
    return head.to(device)


def _backbone(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def sequence_rewards(rm: RewardModel, batch: dict[str, torch.Tensor], all_heads: bool = False) -> torch.Tensor:
    """r(x, y) per row of a right-padded batch, [N] float32: the head on the last attended token's final hidden
    state, with exactly the reward adapter active (ODIN's quality head alone; every head, [N, heads], with
    ``all_heads``). Differentiable in the adapter and the head."""
    with rm.stack.use([rm.adapter]) as m:
        device = rm.head.weight.device
        out = _backbone(m)(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False)
    last = batch["attention_mask"].to(device).sum(-1) - 1  # right padding: the last 1 of the mask
    h = out.last_hidden_state[torch.arange(last.shape[0], device=device), last]
    r = rm.head(h.float())
    return r if all_heads else r[:, 0]


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss, TRL RewardTrainer's: mean(-log sigmoid(r_c - r_r)) + c * mean((r_c + r_r)^2)."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors (0 where either is constant); differentiable in both."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm() + eps)


def odin_terms(r: torch.Tensor, lengths: torch.Tensor, head_weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ODIN's two extra losses from both heads' rewards ``r`` [N, 2] of N responses of ``lengths`` tokens:
    |Pearson(r_Q, L)| - Pearson(r_L, L), and |cos(w_Q, w_L)| of the head weight's two rows. Under three responses
    a correlation is +-1 or 0 whatever the heads do: the length term is then 0 (a short last micro-batch)."""
    lengths = lengths.to(r.dtype)
    if r.shape[0] < 3:
        length_loss = r.new_zeros(())
    else:
        length_loss = pearson(r[:, 0], lengths).abs() - pearson(r[:, 1], lengths)
    orth = F.cosine_similarity(head_weight[0], head_weight[1], dim=0).abs()
    return length_loss, orth


@torch.no_grad()
def reward_scores(rm: RewardModel, prompts: Sequence[list[int]], responses: Sequence[list[int]], batch_size: int = 16,
                  on_batch: Callable[[int], None] | None = None) -> list[float]:
    """r(x, y) of each (prompt, response), in the given order (scored longest first, so batches pad little)."""
    n = len(prompts)
    order = sorted(range(n), key=lambda i: -(len(prompts[i]) + len(responses[i])))
    pad = rm.stack.tokenizer.pad_token_id
    rm.stack.model.eval()
    out = [0.0] * n
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        r = sequence_rewards(rm, collate_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad))
        for i, v in zip(idx, r.tolist()):
            out[i] = v
        if on_batch:
            on_batch(len(idx))
    return out


def gold_accuracy(rm: RewardModel, pairs: Sequence[TokenizedPair], batch_size: int = 16) -> dict:
    """How often r(chosen) > r(rejected) on gold pairs, and the mean margin (None for no pairs)."""
    if not pairs:
        return {"pairs": 0, "accuracy": None, "mean_margin": None}
    x = [p.prompt_ids for p in pairs]
    rc = reward_scores(rm, x, [p.chosen_ids for p in pairs], batch_size)
    rr = reward_scores(rm, x, [p.rejected_ids for p in pairs], batch_size)
    d = [a - b for a, b in zip(rc, rr)]
    return {"pairs": len(pairs), "accuracy": sum(v > 0 for v in d) / len(d), "mean_margin": sum(d) / len(d)}


def save_head(head: torch.nn.Linear, path: str | Path) -> Path:
    """The head as safetensors (``weight``, [heads, hidden])."""
    path = Path(path)
    save_file({"weight": head.weight.detach().float().cpu().contiguous()}, str(path))
    return path


def load_run_reward_model(stack: PolicyStack, recipe: Recipe, needed_by: str = "spa_lite.reward",
                          recipe_arg: str = "RECIPE") -> RewardModel:
    """The run's reward model (stage ``reward``) loaded into ``stack``, after checking the stage is complete, made
    from this recipe's config, and its files are the ones it wrote (``runs.require_stage``)."""
    require_stage(recipe, REWARD_STAGE, needed_by, recipe_arg)
    d = stage_dir(recipe, REWARD_STAGE)
    return load_reward_model(stack, d / "adapter", d / REWARD_HEAD_FILE)


def load_reward_model(stack: PolicyStack, adapter_dir: str | Path, head_path: str | Path) -> RewardModel:
    """Load a saved reward adapter into ``stack`` (frozen, beside its policies: still one base) and its head."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SpaError(f"{adapter_dir} has no adapter_config.json: not a reward adapter folder")
    if REWARD_ADAPTER not in stack.model.peft_config:
        stack.model.load_adapter(str(adapter_dir), adapter_name=REWARD_ADAPTER, is_trainable=False)
    weight = load_file(str(head_path))["weight"]
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    device = next(stack.model.parameters()).device
    head.requires_grad_(False)
    return RewardModel(stack, head.to(device))


# ------------------------------------------------------------------------------------------------ training


@dataclass
class RewardSpec:
    """The reward loop's settings (the ``reward`` recipe section's, by name)."""

    lr: float
    epochs: float
    batch_size: int
    grad_accum: int
    seed: int
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 20
    center_rewards_coefficient: float = 0.0
    length_head: bool = False  # ODIN
    diverge_factor: float = 0.0  # read by training.divergence

    @classmethod
    def from_config(cls, config, **settings) -> RewardSpec:
        own = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**{**own, **settings})


def _micro_loss(rm: RewardModel, pairs: Sequence[TokenizedPair], idx: list[int], spec: RewardSpec,
                extra: dict | None = None) -> tuple:
    """Loss of one micro-batch, and (accuracy, margin) of its pairs (of the summed heads with ODIN, what the
    Bradley-Terry loss fits). With ODIN, ``extra`` (if given) gets the loss's parts and the quality head's
    accuracy, the one judging reads: bt_loss, length_loss, orth, accuracy_quality."""
    batch = collate_pairs([pairs[i] for i in idx], rm.stack.tokenizer.pad_token_id)
    n = len(idx)
    if spec.length_head:  # ODIN: Bradley-Terry on r_Q + r_L, r_Q decorrelated from length, r_L correlated
        both = sequence_rewards(rm, batch, all_heads=True)
        lengths = torch.tensor([len(pairs[i].chosen_ids) for i in idx] + [len(pairs[i].rejected_ids) for i in idx],
                               device=both.device)
        length_loss, orth = odin_terms(both, lengths, rm.head.weight)
        r = both.sum(-1)
        bt = bt_loss(r[:n], r[n:], spec.center_rewards_coefficient)
        loss = bt + length_loss + orth
        if extra is not None:
            extra.update(bt_loss=bt.item(), length_loss=length_loss.item(), orth=orth.item(),
                         accuracy_quality=(both[:n, 0] > both[n:, 0]).float().mean().item())
    else:
        r = sequence_rewards(rm, batch)
        loss = bt_loss(r[:n], r[n:], spec.center_rewards_coefficient)
    d = (r[:n] - r[n:]).detach()
    return loss, (d > 0).float().mean().item(), d.mean().item()


def _save(out_dir: Path, rm: RewardModel, opt, sched, step: int) -> None:
    state = {**rm.stack.trainable_state(), "__head__": rm.head.weight.detach().cpu().contiguous()}
    with atomic_dir(out_dir / "checkpoint") as tmp:
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))


def _load(out_dir: Path, rm: RewardModel, opt, sched) -> int:
    ck = out_dir / "checkpoint"
    if not (ck / "state.json").exists():
        return 0
    state = load_file(str(ck / "trainable.safetensors"))
    named = dict(rm.stack.model.named_parameters())
    with torch.no_grad():
        rm.head.weight.copy_(state.pop("__head__"))
        for n, t in state.items():
            named[n].copy_(t)
    st = torch.load(ck / "optim.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    return int(json.loads((ck / "state.json").read_text())["step"])


def run_reward_loop(rm: RewardModel, pairs: Sequence[TokenizedPair], spec: RewardSpec, out_dir: Path,
                    on_step: Callable[[int, int, dict], None] | None = None) -> dict:
    """Train the reward adapter and head on gold ``pairs``; metrics.jsonl and checkpoints under ``out_dir``.

    ``on_step(step, total, row)`` runs after each step's row is in metrics.jsonl and before its checkpoint (tests
    stop the loop there, as a kill between checkpoints would).

    Returns:
        steps, resumed_from, wall time, first loss and last-10-step means of loss, accuracy and margin.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    params = rm.parameters()
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = total_steps(len(pairs), spec)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(spec.warmup_ratio * steps), steps)
    start = _load(out_dir, rm, opt, sched)
    metrics = out_dir / "metrics.jsonl"
    trim_metrics(metrics, start)
    first = first_logged_loss(metrics) if start else None
    t0 = time.time()
    rm.stack.model.train()
    for step in range(start, steps):
        total, acc, margin, parts = 0.0, 0.0, 0.0, {}
        for a in range(spec.grad_accum):
            extra: dict = {}
            loss, ac, mg = _micro_loss(rm, pairs, micro_batch_indices(len(pairs), spec, step * spec.grad_accum + a), spec,
                                       extra)
            for k, v in extra.items():  # ODIN's parts, averaged over the step's micro-batches as the loss is
                parts[k] = parts.get(k, 0.0) + v / spec.grad_accum
            (loss / spec.grad_accum).backward()
            total, acc, margin = total + loss.item() / spec.grad_accum, acc + ac / spec.grad_accum, margin + mg / spec.grad_accum
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm))
        first = total if first is None else first
        diverged = divergence(total, gnorm, first, spec)
        if diverged is None:  # a diverged step is logged, never applied or checkpointed
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": total, "accuracy": acc, "margin": margin, "lr": sched.get_last_lr()[0],
               "grad_norm": gnorm, "elapsed_s": round(time.time() - t0, 3), **parts}
        row = finite_or_null(row)
        with open(metrics, "a", encoding="utf-8") as f:  # through io: a full disk is one line naming the file
            append_text(f, dumps(row) + "\n", metrics)
        if on_step:
            on_step(step + 1, steps, row)
        if diverged is not None:
            raise DivergedError(step + 1, f"step {step + 1}: {diverged}")
        done = step + 1
        if done % spec.save_every == 0 and done < steps:
            _save(out_dir, rm, opt, sched, done)
    rm.stack.model.eval()
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    tail = [r for r in rows[-10:] if isinstance(r.get("loss"), float)]
    last10 = {k: sum(r[k] for r in tail) / len(tail) for k in ("loss", "accuracy", "margin")} if tail else {}
    return {"steps": steps, "pairs": len(pairs), "resumed_from": start, "wall_s": round(time.time() - t0, 2),
            "first_loss": rows[0]["loss"] if rows else None, "last10": last10}
