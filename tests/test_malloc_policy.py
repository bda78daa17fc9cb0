"""``memory.malloc``: the glibc heap tuning is the recipe's explicit choice (or SPA_LITE_MALLOC), never applied on
CUDA, shown by `spa-lite doctor`; the per-step heap trim runs only under the tuned policy."""

from __future__ import annotations

import pytest

from spa_lite import memory
from spa_lite.config import Recipe


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in ("SPA_LITE_MALLOC", "SPA_LITE_GLIBC_MALLOC", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(memory, "_policy", dict(memory._policy))  # the process's own policy is left as it was


def test_resolution():
    assert Recipe().memory.malloc == "auto"
    assert memory.resolve_malloc("auto", "cpu")[0] == "tuned"
    assert memory.resolve_malloc("glibc", "cpu")[0] == "glibc"
    for setting in ("auto", "tuned"):  # never on CUDA, whatever was asked
        mode, why = memory.resolve_malloc(setting, "cuda")
        assert mode == "glibc" and "CUDA" in why


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("SPA_LITE_MALLOC", "glibc")
    assert memory.resolve_malloc("tuned", "cpu") == ("glibc", "SPA_LITE_MALLOC=glibc")
    monkeypatch.setenv("SPA_LITE_MALLOC", "sometimes")
    with pytest.raises(ValueError, match="SPA_LITE_MALLOC"):
        memory.resolve_malloc("auto", "cpu")
    monkeypatch.delenv("SPA_LITE_MALLOC")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # the user's own glibc setting wins
    assert memory.resolve_malloc("tuned", "cpu")[0] == "glibc"


def test_trim_only_under_the_tuned_policy(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "trim_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(memory, "fix_mmap_threshold", lambda threshold: calls.append(threshold) or True)
    applied = memory.apply_malloc("glibc", 64, "cpu")
    assert applied["mode"] == "glibc" and memory.trim_after_step() is False and calls == []
    applied = memory.apply_malloc("tuned", 1024, "cpu")
    assert applied == memory.malloc_policy() and applied["mmap_threshold_kib"] == 1024
    assert calls == [1024 << 10]
    assert memory.trim_after_step() is True and calls == [1024 << 10, 1]
    assert memory.apply_malloc("tuned", 64, "cuda")["mode"] == "glibc" and memory.trim_after_step() is False


def test_recipe_rejects_an_unknown_policy(tiny_recipe):
    from spa_lite.errors import SpaError

    with pytest.raises(SpaError, match="memory.malloc"):
        tiny_recipe(**{"memory.malloc": "sometimes"})
    assert tiny_recipe(**{"memory.malloc": "glibc"}).memory.malloc == "glibc"


def test_doctor_reports_the_policy(monkeypatch):
    from spa_lite.doctor import checks

    monkeypatch.setenv("SPA_LITE_MALLOC", "glibc")
    row = next(r for r in checks() if r[0] == "malloc")
    assert row[1] == "ok" and row[2].startswith("glibc (SPA_LITE_MALLOC=glibc)")


def test_stage_peak_names_the_policy_it_was_measured_under():
    memory.apply_malloc("glibc", 64, "cpu")
    assert memory.StagePeak().read()["malloc"] == "glibc"
