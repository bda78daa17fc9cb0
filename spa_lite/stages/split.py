"""`spa-lite split`: the paper's data protocol as files (seed pairs, disjoint iteration prompts, test pairs)."""

from __future__ import annotations

from spa_lite.data import split_protocol, to_trl_conversational
from spa_lite.io import atomic_write_json, atomic_write_jsonl
from spa_lite.options import SplitOptions
from spa_lite.ui import progress


def run(opts: SplitOptions) -> dict:
    """Split ``opts.data`` into the files under ``opts.out`` (``spa_lite.options.SplitOptions``: each field is
    documented there); returns the row count of each file."""
    data, out = opts.data, opts.out
    iter_sizes = opts.iter_sizes
    total = opts.seed_size + 2 * sum(iter_sizes) + opts.test_size  # rows written, the prompt pool included
    with progress() as p:
        t_read = p.add_task(f"split: read {data}", total=1, info="")
        parts = split_protocol(data, opts.seed, opts.seed_size, iter_sizes, opts.test_size, opts.fmt)
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
    atomic_write_json(out / "split.json", {"data": data, "seed": opts.seed, "counts": counts})
    return counts
