"""``memory.fix_mmap_threshold``: large CPU tensors get their own mappings (returned to the OS when freed)
instead of glibc's heap arenas, whatever the process freed before."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from spa_lite import memory

SCRIPT = textwrap.dedent("""
    import ctypes, json, sys, torch
    from spa_lite import memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = memory._libc()
    libc.mallinfo2.restype = MallInfo2
    fixed = memory.fix_mmap_threshold() if sys.argv[1] == "fix" else False
    # a 16 MiB tensor freed: glibc's dynamic threshold rises to 16 MiB, unless it was fixed
    big = torch.ones(4 << 20); del big
    before = libc.mallinfo2()
    x = torch.ones(1 << 20)  # 4 MiB: an activation-sized block
    after = libc.mallinfo2()
    print(json.dumps({"fixed": fixed, "mmapped": after.hblkhd - before.hblkhd,
                      "arena": after.uordblks - before.uordblks}))
""")


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._libc() is None
                    or not hasattr(memory._libc(), "mallinfo2"), reason="glibc >= 2.33 only")
def test_large_blocks_leave_the_heap_arena():
    fixed = _run("fix")
    assert fixed["fixed"] is True
    assert fixed["mmapped"] >= 4 << 20 and fixed["arena"] < 1 << 20  # its own mapping, freed to the OS on free
    plain = _run("plain")  # glibc's default after a large free: the block comes from the arena, which keeps it
    assert plain["mmapped"] < 1 << 20 and plain["arena"] >= 4 << 20


def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.fix_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("SPA_LITE_GLIBC_MALLOC", "1")
    assert memory.fix_mmap_threshold() is False
