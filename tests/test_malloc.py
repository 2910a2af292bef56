"""runtime/malloc.py: after the first spiking call on CPU, glibc serves large blocks from its heap (no mmap per
block), and $SNNCONV_CPU_MALLOC=off leaves malloc alone. Each case runs in a fresh interpreter: the setting is
process-wide. glibc's own count of mmapped bytes (mallinfo2) is the reference."""

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc = platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")
pytestmark = pytest.mark.skipif(not glibc, reason="glibc's malloc (with mallinfo2) only")

PROBE = textwrap.dedent(
    """
    import ctypes, torch, torch.nn as nn, snnconv

    class Info(ctypes.Structure):
        _fields_ = [(k, ctypes.c_size_t) for k in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info

    def mmapped_by_new_block():  # bytes glibc maps for one fresh 40 MiB tensor (kept alive while counted)
        before = libc.mallinfo2().hblkhd
        t = torch.empty(10 << 20)
        return libc.mallinfo2().hblkhd - before

    first = mmapped_by_new_block()
    torch.manual_seed(0)
    snn = snnconv.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), T=2, calib=torch.rand(8, 4))
    snn(torch.rand(3, 4))
    print(first, mmapped_by_new_block())
    """
)


def _run(env_extra: dict) -> tuple[int, int]:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    first, after = out.stdout.split()
    return int(first), int(after)


def test_large_blocks_come_from_the_heap_after_a_cpu_call():
    first, after = _run({})
    assert first >= 40 << 20  # glibc's default: a fresh mapping
    assert after == 0


def test_off_leaves_malloc_alone():
    first, after = _run({"SNNCONV_CPU_MALLOC": "off"})
    assert first >= 40 << 20 and after >= 40 << 20
