"""Freed activation memory kept for the next call on CPU (glibc).

glibc's malloc serves each block over its mmap threshold (at most 32 MiB) with a fresh mmap and unmaps it on free. A
spiking call's large tensors (a convolution's output over T x N samples: 33.5 MiB for 64 channels of 32 x 32 at 128
samples) then start as untouched pages on every call, a page fault and a zeroed page per 4 KiB
(benchmarks/cpu_malloc.py times both, results/cpu_malloc.txt). Like PyTorch's CUDA caching allocator, the runtime
keeps freed memory for the next call instead: malloc takes large blocks from its heap (M_MMAP_MAX 0) and keeps the
heap's free top (M_TRIM_THRESHOLD 2 GiB). Set process-wide, once, at the first spiking call on CPU; the cost is that
memory freed stays with the process, as with any caching allocator. SNNCONV_CPU_MALLOC=off leaves malloc as it is;
other C libraries are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import platform

from snnconv import config

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (glibc malloc.h)
_TRIM = (1 << 31) - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed large blocks for reuse (once per process); False where it was left alone
    (not glibc, or $SNNCONV_CPU_MALLOC=off)."""
    if config.CPU_MALLOC.off() or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM))
