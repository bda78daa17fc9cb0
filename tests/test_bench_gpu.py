"""bench/gpu/run_all.py, the one-command GPU check, dry-run on the CPU (scaled-down model, every code path)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_run_all_dry_run_writes_every_part(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench" / "gpu"))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    rc = run_all.main(["--dry-run", "--threads", "1", "--out-dir", str(tmp_path / "out"),
                       "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "gpu_all_dryrun.json").read_text())
    parts = res["parts"]
    assert list(parts) == ["spa_iteration", "vllm_expand", "planner_check"]
    spa = parts["spa_iteration"]
    assert [(r["seq_len"], r["pairs"], r["grad_ckpt"]) for r in spa["train"]] == [(128, 1, False), (128, 1, True)]
    assert all(r["status"] == "ok" and r["step_s_median"] > 0 for r in spa["train"])
    assert spa["judge"]["pairs_per_s"] > 0 and spa["generation"]["tokens_per_s"] > 0
    if importlib.util.find_spec("vllm") is None:
        assert parts["vllm_expand"]["status"] == "skipped" and "vLLM is not importable" in parts["vllm_expand"]["note"]
    plan = parts["planner_check"]
    assert plan["status"].startswith("not measured") and len(plan["settings"]) == 2
    assert all(s["plan_gib"] > 0 for s in plan["settings"])
    assert res["total_s"] > 0 and res["within_budget"] in (True, False)
