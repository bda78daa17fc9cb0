"""Export a policy pi_k of a run for serving: as ONE LoRA adapter, or as a merged full model.

pi_k = base + sum_{j<=k} s_j B_j A_j   (adapters seed, iter1, ..., iter{k}; s_j = lora_alpha_j / r_j per module)

Both exports are exact up to float rounding:

* ``export_single_adapter`` concatenates ranks. For every LoRA layer
      A = [A_0; A_1; ...; A_k]           (rows, rank R = sum r_j)
      B = [s_0 B_0, s_1 B_1, ..., s_k B_k]  (columns)
  so B A = sum_j s_j B_j A_j, and the adapter is saved with lora_alpha = r = R (scaling exactly 1.0, no rsLoRA).
  Adapters of different r / lora_alpha (or rsLoRA, or rank/alpha patterns) are therefore fine: each one's scaling
  is read from the live peft layer and folded into its B block. A module with fewer total ranks than R (rank
  patterns, or a module that only some adapters target) is zero-padded, which adds exactly nothing. The result is
  an ordinary peft folder (``PeftModel.from_pretrained`` loads it) and what a one-LoRA-per-request server such
  as vLLM would serve (it needs ``max_lora_rank >= R``).

  peft 0.21's ``add_weighted_adapter(..., combination_type="cat")`` does the same algebra (it folds
  weight * scaling into A and sets lora_alpha = R), but it injects the new adapter into the live model, and it
  copies the first adapter's config, so with ``use_rslora=True`` its scaling becomes R / sqrt(R) != 1 and the
  result is wrong; with one adapter it silently switches to "linear". The concatenation is done here instead,
  straight into a state dict, without touching the stack.

* ``export_merged`` loads the base in float32 on the CPU (also when the run trained on a 4-bit base: NF4
  weights cannot take a merged update, so the merge goes into the original full-precision weights; the merged
  model is then base + deltas, not NF4(base) + deltas, which differs from the trained policy by the 4-bit
  quantization error of the base), merges the stack with ``merge_and_unload`` and casts to ``dtype`` only at the
  end, so the merge itself adds no half-precision rounding.

Not supported (refused with SpaError): DoRA, ``lora_bias``, ``modules_to_save`` / trainable tokens (not sums
of low-rank updates) and LoRA on non-Linear, non-Embedding layers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from spa_lite.config import Recipe
from spa_lite.errors import SpaError
from spa_lite.io import atomic_dir, disk_errors, read_json
from spa_lite.layout import Stage, adapter_dir, adapter_name, policy_label, policy_names, read_manifest
from spa_lite.loading import check_model_path, load_stack
from spa_lite.models import load_base_model, name_base_portably, portable_base_id
from spa_lite.runs import verify_inputs
from spa_lite.stack import PolicyStack, build_stack

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."  # how peft names a PeftModel's weights in adapter_model.safetensors


def stack_names(k: int) -> list[str]:
    """Adapters of pi_k: seed, iter1, ..., iter{k}."""
    if k < 0:
        raise SpaError(f"policy index k must be >= 0 (0 is pi_0 = base + seed), got {k}")
    return policy_names(k)


def _check_supported(model, names: list[str]) -> None:
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise SpaError(f"adapters {missing} are not loaded in the stack (loaded: {list(model.peft_config)})")
    for n in names:
        cfg = model.peft_config[n]
        if getattr(cfg, "peft_type", None) is not None and str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
            raise SpaError(f"adapter {n} is {cfg.peft_type}, not LoRA")
        for attr, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
            if getattr(cfg, attr, False):
                raise SpaError(f"adapter {n} uses {what}: its update is not a sum of low-rank terms; cannot concatenate")
        if getattr(cfg, "modules_to_save", None) or getattr(cfg, "trainable_token_indices", None):
            raise SpaError(f"adapter {n} has modules_to_save/trainable tokens: not expressible as one LoRA")


@torch.no_grad()
def concatenated_lora_state(model, names: list[str]) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """Rank-concatenated LoRA weights of ``names`` on a peft model, with every scaling folded into B.

    Returns:
        (state dict in peft's saved naming, rank R, sorted leaf names of the targeted modules)
    """
    _check_supported(model, names)
    inner = model.base_model.model
    blocks: dict[str, tuple[str, list[torch.Tensor], list[torch.Tensor]]] = {}
    dtype = torch.float32
    for mod_name, mod in inner.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        As, Bs, kind = [], [], None
        for n in names:
            if n in mod.lora_A:
                a, b = mod.lora_A[n], mod.lora_B[n]
                if not (isinstance(a, torch.nn.Linear) and isinstance(b, torch.nn.Linear)):
                    raise SpaError(f"{mod_name}: LoRA on {type(a).__name__} layers is not supported for export")
                kind = "linear"
                A, B = a.weight, b.weight  # [r, in], [out, r]
            elif n in getattr(mod, "lora_embedding_A", {}):
                kind = "embedding"
                A, B = mod.lora_embedding_A[n], mod.lora_embedding_B[n]  # [r, vocab], [dim, r]
            else:
                continue
            dtype = A.dtype  # saved in the adapters' own dtype; the folding is done in float32
            As.append(A.detach().float().cpu())
            Bs.append(B.detach().float().cpu() * float(mod.scaling[n]))
        if As:
            blocks[mod_name] = (kind, As, Bs)
    if not blocks:
        raise SpaError(f"no LoRA layer carries any of {names}")
    R = max(sum(a.shape[0] for a in As) for _, As, _ in blocks.values())
    state: dict[str, torch.Tensor] = {}
    leaves = set()
    for mod_name, (kind, As, Bs) in blocks.items():
        A = torch.cat(As, dim=0)
        B = torch.cat(Bs, dim=1)
        pad = R - A.shape[0]
        if pad:
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])], dim=0)
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        key = _PREFIX + mod_name
        if kind == "linear":
            state[f"{key}.lora_A.weight"] = A.contiguous().to(dtype)
            state[f"{key}.lora_B.weight"] = B.contiguous().to(dtype)
        else:
            state[f"{key}.lora_embedding_A"] = A.contiguous().to(dtype)
            state[f"{key}.lora_embedding_B"] = B.contiguous().to(dtype)
        leaves.add(mod_name.rsplit(".", 1)[-1])
    return state, R, sorted(leaves)


def _policy_stack_for(source: PolicyStack | Recipe, k: int) -> PolicyStack:
    if isinstance(source, PolicyStack):
        return source
    if isinstance(source, Recipe):
        return load_stack(source, frozen_upto=k)
    raise SpaError(f"export needs a PolicyStack or a Recipe, got {type(source).__name__}")


def export_single_adapter(source: PolicyStack | Recipe, k: int, out_dir: str | Path,
                          base_model_name_or_path: str | None = None) -> Path:
    """Save pi_k's adapters seed..iter{k} as ONE peft LoRA adapter (ranks concatenated, exact).

    Args:
        source: a loaded PolicyStack holding at least seed..iter{k} (left unchanged), or a Recipe, whose run's
            adapters are then loaded over the recipe's base (``load_stack``).
        k: the policy: 0 is pi_0 (seed only), i is pi_i.
        out_dir: written atomically: adapter_config.json + adapter_model.safetensors.
        base_model_name_or_path: recorded in adapter_config.json (default: the seed adapter's).

    Returns:
        out_dir. The adapter's rank R = sum of the stacked ranks, lora_alpha = R (scaling 1).
    """
    stack = _policy_stack_for(source, k)
    names = stack_names(k)
    state, R, leaves = concatenated_lora_state(stack.model, names)
    first = stack.model.peft_config[names[0]]
    cfg = LoraConfig(
        r=R, lora_alpha=R, use_rslora=False, lora_dropout=0.0, bias="none", target_modules=leaves,
        task_type=getattr(first, "task_type", None) or "CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path or getattr(first, "base_model_name_or_path", None),
        fan_in_fan_out=getattr(first, "fan_in_fan_out", False),
    )
    out_dir = Path(out_dir)
    with disk_errors(out_dir), atomic_dir(out_dir) as tmp:
        cfg.save_pretrained(str(tmp))
        name_base_portably(tmp)
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "spa_export.json").write_text(json.dumps({
            "policy": policy_label(k), "adapters": names, "rank": R, "combination": "cat (exact: scalings folded into B)",
            "ranks": {n: stack.model.peft_config[n].r for n in names},
            "lora_alpha": {n: stack.model.peft_config[n].lora_alpha for n in names},
        }, indent=2) + "\n")
    return out_dir


def _eval_results(recipe: Recipe) -> dict[str, dict]:
    d = recipe.run_path / "eval"
    out = {}
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                out[p.stem] = read_json(p)
            except Exception as e:  # a torn or foreign file must not stop an export
                log.warning("skipping eval file %s: %s", p, e)
    return out


def _stage_manifest(recipe: Recipe, k: int) -> dict | None:
    return read_manifest(recipe, Stage("seed", 0) if k == 0 else Stage("train", k))


def model_card(recipe: Recipe, k: int, dtype: torch.dtype) -> str:
    """README.md for a merged pi_k: the SPA configuration of the run and any eval results under runs/<name>/eval."""
    man = _stage_manifest(recipe, k) or {}
    rec = man.get("recipe") or recipe.to_dict()
    base, note = portable_base_id(str(rec.get("model", {}).get("name_or_path")))
    hub_like = base.count("/") == 1 and not base.startswith((".", "/", "~")) and not Path(base).exists()
    lines = [
        "---",  # the hub's model-card metadata: the base this model was fine-tuned from (a hub id only)
        *([f"base_model: {base}"] if hub_like else []),
        "library_name: transformers",
        "tags: [spa-lite, dpo, spa]",
        "---",
        "",
        f"# {recipe.name}: SPA policy {policy_label(k)} (merged)",
        "",
        f"Base model `{base}`" + (f" ({note})" if note else "") + " with the LoRA adapters "
        f"{', '.join(stack_names(k))} merged into its weights (exported {time.strftime('%Y-%m-%d')}, dtype "
        f"{str(dtype).replace('torch.', '')}), made with spa-lite: SPA (Spread Preference Annotation), iterative "
        "DPO on self-labelled preference pairs.",
        "",
        "The merge was done in float32 on the full-precision base; a run trained on a 4-bit (NF4) base differs from "
        "this model by the base's quantization error.",
        "",
        "## SPA configuration",
        "",
        f"Stage manifest: `{'seed' if k == 0 else f'iter{k}/train'}` "
        f"(config hash `{man.get('config_hash', 'n/a')}`, status {man.get('status', 'no manifest found')}).",
        "",
        "```json",
        json.dumps(rec, indent=2, default=str),
        "```",
    ]
    if man.get("summary"):
        lines += ["", "### Training summary of the last stage", "", "```json",
                  json.dumps(man["summary"], indent=2, default=str), "```"]
    evals = _eval_results(recipe)
    lines += ["", "## Evaluation", ""]
    if not evals:
        lines.append("No evaluation results were found under the run's eval/ folder (run `spa-lite eval`).")
    for tag, rep in evals.items():
        lines += [f"### {tag}", ""]
        acc = rep.get("judge_accuracy") if isinstance(rep, dict) else None
        if acc:
            methods = sorted({m for v in acc.values() for m in v})
            lines += ["Judge accuracy (95% CI):", "", "| policy | " + " | ".join(methods) + " |",
                      "|---" * (len(methods) + 1) + "|"]
            for pol, v in acc.items():
                cells = [f"{v[m]['accuracy']:.3f} [{v[m].get('ci_low', float('nan')):.2f}, "
                         f"{v[m].get('ci_high', float('nan')):.2f}]" if m in v else "-" for m in methods]
                lines.append(f"| {pol} | " + " | ".join(cells) + " |")
            lines.append("")
        pr = rep.get("pass_rate") if isinstance(rep, dict) else None
        if pr:
            lines += ["Verifier pass rate:", "", "| policy | n | pass rate |", "|---|---|---|"]
            lines += [f"| {pol} | {v.get('n')} | {v.get('pass_rate', float('nan')):.3f} |" for pol, v in pr.items()]
            lines.append("")
        lines += ["<details><summary>full report</summary>", "", "```json",
                  json.dumps(rep, indent=2, default=str), "```", "", "</details>", ""]
    return "\n".join(lines) + "\n"


def export_merged(recipe: Recipe, k: int, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                  device: str = "cpu") -> Path:
    """Save base + (seed + ... + iter{k}) merged into one full model, with its tokenizer and a model card.

    The base is loaded in float32 without quantization whatever ``recipe.model.quantization`` says (a 4-bit
    base cannot be merged into), the adapters are merged with ``merge_and_unload`` in float32 and the result
    is cast to ``dtype`` and saved as safetensors. Needs ~4 bytes per base parameter of memory on ``device``.

    Returns:
        out_dir (written atomically): config.json, model*.safetensors, tokenizer files, README.md.
    """
    names = stack_names(k)
    frozen = [(adapter_name(j), adapter_dir(recipe, j)) for j in range(k + 1)]
    for n, p in frozen:
        if not (Path(p) / "adapter_config.json").exists():
            raise SpaError(f"{policy_label(k)} needs adapter {n} at {p}; it is missing (finish the run's stages first)")
    # the checks every other command makes before it loads a policy: the base weights and each adapter are the
    # ones their stages recorded (a replaced base or a damaged adapter would be merged without a word)
    check_model_path(recipe.model.name_or_path)
    verify_inputs(recipe, k)
    base, tok = load_base_model(recipe.model.name_or_path, quantization="none", dtype="float32", device=device)
    stack = build_stack(base, tok, frozen)
    _check_supported(stack.model, names)
    merged = stack.model.merge_and_unload(safe_merge=True, adapter_names=names)
    merged = merged.to(dtype)
    merged.config.use_cache = True  # load_base_model turns the KV cache off for training; serving wants it
    out_dir = Path(out_dir)
    with disk_errors(out_dir), atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(recipe, k, dtype), encoding="utf-8")
    return out_dir
