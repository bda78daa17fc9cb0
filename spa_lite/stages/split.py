"""`spa-lite split`: the paper's data protocol as files (seed pairs, disjoint iteration prompts, test pairs)."""

from __future__ import annotations

from pathlib import Path

from spa_lite.data import split_protocol, to_trl_conversational
from spa_lite.io import atomic_write_json, atomic_write_jsonl
from spa_lite.ui import progress


def run(data: str, out: Path, seed: int = 42, seed_size: int = 2000, iter_sizes: list[int] | None = None,
        test_size: int = 0, fmt: str = "auto") -> dict:
    iter_sizes = iter_sizes or [8000, 20000, 30000]
    total = seed_size + 2 * sum(iter_sizes) + test_size  # rows written, the prompt pool included
    with progress() as p:
        t_read = p.add_task(f"split: read {data}", total=1, info="")
        parts = split_protocol(data, seed, seed_size, iter_sizes, test_size, fmt)
        p.advance(t_read)
        t_write = p.add_task(f"split: write {out}", total=total, info="")
        counts = {}
        for name, rows in parts.items():  # pair files in TRL's conversational format; prompt files as prompt records
            counts[name] = atomic_write_jsonl(out / f"{name}.jsonl", [to_trl_conversational(r) for r in rows])
            p.advance(t_write, len(rows))
        # one pool for recipes: data.iter_prompts slices it into the same disjoint sizes
        pool = [r for i in range(1, len(iter_sizes) + 1) for r in parts[f"iter{i}_prompts"]]
        counts["prompts"] = atomic_write_jsonl(out / "prompts.jsonl", pool)
        p.advance(t_write, len(pool))
    atomic_write_json(out / "split.json", {"data": data, "seed": seed, "counts": counts})
    return counts
