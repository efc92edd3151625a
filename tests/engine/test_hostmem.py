"""keep_freed_memory: after it, a large tensor freed and allocated again reuses heap memory instead of a fresh
mmap; the environment switch and a C library without glibc's mallopt leave malloc as it is.

mallopt's settings are process-wide, so every call that can take effect runs in a child process. The child
reads glibc's `mallinfo2()`: `hblkhd`, its 5th field, is the bytes held in mmap'd blocks.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

from engine import hostmem
from engine.hostmem import SWITCH, keep_freed_memory
from tests.engine.runs import REPO_ROOT

SIZE = 64 << 20  # above glibc's largest default mmap threshold (32 MiB)

CHILD = f"""
import ctypes, json, torch
from engine.hostmem import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = Mallinfo2
took = keep_freed_memory()
x = torch.ones({SIZE} // 4)
del x
before = mallinfo2().hblkhd
x = torch.ones({SIZE} // 4)
print(json.dumps({{"took": took, "mmapped_growth": mallinfo2().hblkhd - before}}))
"""


def _has_mallinfo2() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION")) and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except (AttributeError, ValueError, OSError):
        return False


def _child(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs Linux with glibc >= 2.33 (mallinfo2)")
def test_a_freed_large_tensor_is_allocated_again_from_the_heap_not_a_fresh_mmap():
    tuned, untuned = _child(**{SWITCH: "1"}), _child(**{SWITCH: "0"})
    assert tuned["took"] is True and tuned["mmapped_growth"] < SIZE
    # the control: glibc's defaults map the second tensor afresh
    assert untuned["took"] is False and untuned["mmapped_growth"] >= SIZE


@pytest.mark.parametrize("value", ["0", "false", "Off", "no"])
def test_the_environment_switch_turns_it_off_before_malloc_is_touched(monkeypatch, value):
    monkeypatch.setenv(SWITCH, value)
    monkeypatch.setattr(hostmem, "glibc_mallopt", lambda: pytest.fail("mallopt looked up"))
    assert keep_freed_memory() is False


class _Libc:
    """A C library whose mallopt records its calls and answers `result`."""

    def __init__(self, result: int):
        self.calls = []
        self.mallopt = lambda param, value: self.calls.append((param, value)) or result  # takes ctypes' attributes


def test_without_glibcs_mallopt_it_is_a_no_op(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(hostmem.ctypes, "CDLL", missing)  # no libc.so.6: musl
    assert keep_freed_memory() is False
    monkeypatch.setattr(hostmem.ctypes, "CDLL", lambda name: object())  # a libc.so.6 without mallopt
    assert keep_freed_memory() is False
    monkeypatch.setattr(hostmem.os, "confstr", lambda name: None)  # not glibc
    monkeypatch.setattr(hostmem.ctypes, "CDLL", lambda name: pytest.fail("not glibc, yet its library was loaded"))
    assert keep_freed_memory() is False


def test_a_refused_setting_returns_false_and_changes_nothing_else(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    for result, expected in ((0, False), (1, True)):
        libc = _Libc(result)
        monkeypatch.setattr(hostmem.ctypes, "CDLL", lambda name, libc=libc: libc)
        assert keep_freed_memory(64 << 20) is expected
        # glibc refuses the mmap threshold when it is too high; the trim threshold is then left alone
        assert libc.calls == [(hostmem.M_MMAP_THRESHOLD, 64 << 20)] + [(hostmem.M_TRIM_THRESHOLD, 128 << 20)] * result
    with pytest.raises(ValueError, match="threshold_bytes"):
        keep_freed_memory(1 << 30)
