"""`spa-lite plan`: estimated peak memory of each stage and the settings that fit, as a table."""

from __future__ import annotations

from rich.table import Table

from spa_lite.api import plan
from spa_lite.tasks import RecipeArgs
from spa_lite.ui import console


# how each stage's log-probs are computed, by the kernel the plan budgets (spa_lite.logps.logprob_kernel())
_LOGPROBS = {"trl": "from hidden states, TRL's chunked kernel (trl.kernels.ChunkedLogProbFunction)",
             "torch": "from hidden states, spa_lite's chunked torch kernel (the installed trl has no ChunkedLogProbFunction)",
             None: "full logits (the model's LM head is not a plain affine map)"}


def show_plan(args: RecipeArgs, *, model: str | None, gpu_mem: float, quantization: str, fsdp: int) -> dict:
    res = plan(args.load(), model=model, gpu_mem=gpu_mem, quantization=quantization, fsdp=fsdp)
    shards = f", FSDP over {fsdp})" if fsdp > 1 else ")"
    t = Table(title=f"memory plan: {res['source']} on {gpu_mem:g} GB ({quantization}{shards}")
    for c in ("stage", "peak GB", "fits", "largest parts"):
        t.add_column(c)
    for name, st in res["plan"]["stages"].items():
        parts = sorted(st["parts"].items(), key=lambda kv: -kv[1])[:3]
        t.add_row(name, f"{st['peak_gb']:.2f}", "yes" if st["fits"] else "[red]no[/]",
                  ", ".join(f"{k} {v:.2f}" for k, v in parts))
    console.print(t)
    console.print(f"log-probs: {_LOGPROBS[res['plan']['inputs']['logprob_kernel']]}"
                  + ("; FSDP training scores full logits" if fsdp > 1 else ""))
    verdict = "fits" if res["fits"] else "does NOT fit even with the smallest settings"
    console.print(f"{verdict}: batch_size {res['batch_size']} x grad_accum {res['grad_accum']} "
                  f"(effective {res['effective_batch']}), gradient_checkpointing {res['gradient_checkpointing']}, "
                  f"max_length {res['seq_len']}, expand batch {res['gen_batch_size']}, judge batch {res['judge_batch_size']}"
                  + (f"; changed: {', '.join(res['changed'])}" if res["changed"] else ""))
    return res
