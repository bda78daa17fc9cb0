"""One base model, a stack of LoRA adapters, and every policy SPA needs from them.

pi_init   = the base with all adapters off,
pi_0      = base + ``seed``,
pi_{i-1}  = base + ``seed`` + ``iter1`` + ... + ``iter{i-1}``   (frozen),
pi_theta  = pi_{i-1} + the trainable ``iter{i}`` adapter.

Several active LoRA adapters add their low-rank updates to the same frozen base layer, so switching
policy is a flag flip, not a copy: judging (Eq. 7), extrapolated noise detection (Eq. 11-12) and refined
DPO all run with one copy of the base weights in memory.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from spa_lite.errors import SpaError
from spa_lite.fsdp import full_tensor
from spa_lite.io import atomic_dir, disk_errors
from spa_lite.models import name_base_portably


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # 0 keeps pi_theta == pi_{i-1} exactly at step 0 and makes training reproducible
    target_modules: str | list[str] = "all-linear"

    def to_peft(self):
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )


#: The adapter of a stack with no policy adapter (pi_init only): never active in a policy, never trained.
PLACEHOLDER_ADAPTER = "_unused"


@dataclass
class PolicyStack:
    """A peft model over one base, with the frozen adapters of earlier stages and at most one trainable one."""

    model: object  # peft.PeftModel
    tokenizer: object
    frozen: list[str] = field(default_factory=list)
    trainable: str | None = None
    sharded: bool = False  # the base is sharded with FSDP2 (spa_lite.fsdp.shard_stack)

    @property
    def theta(self) -> list[str]:
        return self.frozen + ([self.trainable] if self.trainable else [])

    @property
    def prev(self) -> list[str]:
        return list(self.frozen)

    def _trainable_named(self) -> list[tuple[str, torch.nn.Parameter]]:
        if not self.trainable:
            return []
        tag = f".{self.trainable}."
        return [(n, p) for n, p in self.model.named_parameters() if "lora_" in n and tag in n]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._trainable_named()]

    @contextlib.contextmanager
    def use(self, names: Sequence[str]) -> Iterator[object]:
        """Activate exactly ``names`` (in any order); an empty list is pi_init, the bare base."""
        names = list(names)
        unknown = [n for n in names if n not in self.model.peft_config]
        if unknown:
            raise SpaError(f"adapters {unknown} are not loaded (loaded: {list(self.model.peft_config)})")
        if not names:
            with self.model.disable_adapter():
                yield self.model
            return
        # inference_mode=True freezes every adapter peft touches; the trainable one is re-enabled below so
        # that the optimizer's parameters keep requires_grad whatever policy was used last.
        self.model.base_model.set_adapter(names, inference_mode=True)
        for p in self.trainable_parameters():
            p.requires_grad_(True)
        yield self.model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Whole (unsharded) CPU copies of the trainable adapter's parameters, by parameter name.

        With a sharded base this all-gathers: every process must call it.
        """
        return {n: full_tensor(p.detach()).cpu().contiguous() for n, p in self._trainable_named()}

    def save_trainable(self, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Save the trainable adapter as an ordinary peft folder (``PeftModel.from_pretrained`` loads it).

        ``state`` (from ``trainable_state``) is required when the base is sharded: gather on every process,
        then save on one.
        """
        if not self.trainable:
            raise SpaError("no trainable adapter to save")
        if self.sharded and state is None:
            raise SpaError("a sharded stack saves from trainable_state(), gathered on every process")
        return save_adapter(self.model, self.trainable, out_dir, state)


def save_adapter(model, name: str, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    out_dir = Path(out_dir)
    with disk_errors(out_dir), atomic_dir(out_dir) as tmp:
        extra = {"state_dict": state} if state is not None else {}
        model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True, **extra)
        sub = tmp / name  # peft nests every adapter but 'default' in a folder of its name
        if sub.is_dir():
            for f in sub.iterdir():
                shutil.move(str(f), tmp / f.name)
            sub.rmdir()
        name_base_portably(tmp)  # the hub id, not this machine's cache path of a bundled model
    return out_dir


def build_stack(
    base,
    tokenizer,
    frozen_adapters: Sequence[tuple[str, str | Path]] = (),
    trainable: str | None = None,
    lora: LoraSettings | None = None,
) -> PolicyStack:
    """Wrap the base with saved adapters (frozen, in order) and optionally a fresh trainable adapter.

    The new adapter's B matrices start at zero, so pi_theta equals pi_{i-1} before the first step. With
    neither, the stack holds only pi_init (plus :data:`PLACEHOLDER_ADAPTER`, which no policy uses).
    """
    model, names = _wrap(base, frozen_adapters, trainable, lora)
    # As TRL does: the base's own dropout would make pi_theta and pi_ref disagree at step 0 and make
    # judging stochastic; only LoRA's dropout (0 by default) stays.
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Dropout) and "lora_dropout" not in mod_name:
            mod.p = 0.0
    stack = PolicyStack(model, tokenizer, names, trainable)
    with stack.use(stack.theta):
        pass  # leaves pi_theta active and only the new adapter trainable
    for _, p in model.named_parameters():
        p.requires_grad_(False)
    for p in stack.trainable_parameters():
        p.requires_grad_(True)
    return stack


def _wrap(base, frozen_adapters: Sequence[tuple[str, str | Path]], trainable: str | None,
          lora: LoraSettings | None) -> tuple[PeftModel, list[str]]:
    """The peft model over ``base`` with the saved adapters loaded in order and the trainable one added;
    returns it and the frozen adapters' names."""
    model = None
    names: list[str] = []
    for name, path in frozen_adapters:
        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise SpaError(f"adapter folder {path} has no adapter_config.json")
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        names.append(name)
    if trainable:
        cfg = (lora or LoraSettings()).to_peft()
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=trainable)
        else:
            model.add_adapter(trainable, cfg)
    if model is None:
        # pi_init alone (judging or sampling from the bare base): peft wraps a base only with an adapter, so
        # the stack carries a zero one that no policy activates and nothing trains
        model = get_peft_model(base, (lora or LoraSettings()).to_peft(), adapter_name=PLACEHOLDER_ADAPTER)
    return model, names
