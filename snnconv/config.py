"""Every environment variable snnconv reads, declared once: its name, default and meaning (the README's table
lists them all; tests/test_config.py checks that it does).

A setting is read when it is used, so a changed environment applies to what is built after it. `Context`
overrides settings for a block of code without touching the environment (a `contextvars` value: the thread or
task that entered it sees the override, others do not), as tinygrad's `Context(...)` does:

    with config.Context(SNNCONV_INT8="off"):
        snn = snnconv.convert(model, T=8, calib=x)
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

_overrides: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("snnconv_config", default=None)


@dataclass(frozen=True)
class Env:
    name: str
    default: str
    doc: str

    def get(self) -> str:
        """The override in force, else the environment's value (stripped), else the default."""
        value = (_overrides.get() or {}).get(self.name)
        if value is None:
            value = os.environ.get(self.name, "").strip()
        return value or self.default

    def off(self) -> bool:
        return self.get().lower() == "off"


INT8 = Env(
    "SNNCONV_INT8",
    "auto",
    "int8 layers over spikes on CPU: auto, off, vnni, binary, sparse, vnni-emulated, binary-emulated",
)
CPU_KERNEL = Env("SNNCONV_CPU_KERNEL", "on", "off: CPU neurons run on torch ops instead of the fused C kernel")
CPU_OPENMP = Env(
    "SNNCONV_CPU_OPENMP", "on", "off: the C kernels split rows over a Python thread pool, not torch's OpenMP threads"
)
CPU_MALLOC = Env("SNNCONV_CPU_MALLOC", "on", "off: leave glibc's malloc settings alone (no kept freed memory)")
CACHE = Env("SNNCONV_CACHE", os.path.join("~", ".cache", "snnconv"), "folder of the compiled C kernels")
CC = Env("CC", "", "the C compiler for the CPU kernels (default: cc, gcc or clang on PATH)")
CPU_CAPABILITY = Env(
    "ATEN_CPU_CAPABILITY", "", "torch's own instruction-set cap; avx2 also builds the C kernels for AVX2 (Haswell)"
)
ALL = (INT8, CPU_KERNEL, CPU_OPENMP, CPU_MALLOC, CACHE, CC, CPU_CAPABILITY)


@contextlib.contextmanager
def Context(**settings: str):
    """Override settings by name for the code inside the block (this thread or task only)."""
    known = {e.name for e in ALL}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise KeyError(f"unknown setting(s) {unknown}; known: {sorted(known)}")
    token = _overrides.set({**(_overrides.get() or {}), **{k: str(v) for k, v in settings.items()}})
    try:
        yield
    finally:
        _overrides.reset(token)
