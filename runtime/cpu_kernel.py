"""Fused CPU neuron kernel: all steps of a layer's IF/LIF neurons in one pass over memory.

The torch backend runs 3-7 elementwise ops per step, each a full pass over the layer's membranes (a large
share of a spiking call's time: benchmarks/results/cpu_inference.txt). This C kernel keeps a block of membranes
in registers across the steps and reads each input and writes each spike once. It computes the torch
backend's float32 operations in the same order (no FMA contraction, no fast-math), so its spikes and
membranes are bitwise those of `torch_backend.multistep` (signed too) (tests/test_cpu_kernel.py).

Compiled by the system C compiler at first use (-O3 -march=native: it runs where it was built; under
ATEN_CPU_CAPABILITY=avx2, AVX2 only), cached per source, flags and CPU in $SNNCONV_CACHE (default
~/.cache/snnconv). Without a compiler, or with
SNNCONV_CPU_KERNEL=off, neurons run on the torch backend; `why_not()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from snnconv import config
from snnconv.runtime.kernel_source import KERNEL_DIR
from snnconv.runtime.lazy import Lazy


def c_source(name: str) -> tuple[str, dict[str, int]]:
    """A C kernel's source from runtime/kernels/ and its integer #defines (the sizes Python lays data out by)."""
    text = (KERNEL_DIR / name).read_text()
    return text, {k: int(v) for k, v in re.findall(r"^#define (\w+) (\d+)\b", text, re.M)}


SOURCE, _DEFINES = c_source("neuron_cpu.c")
BLOCK = _DEFINES["BLOCK"]  # neurons a kernel block keeps in registers through the steps
FLAGS = ["-O3", "-ffp-contract=off", "-std=c99", "-shared", "-fPIC"]
# the instruction set: this CPU's, or the cap torch's own kernels run under (to time an AVX2 machine on a newer one)
_MARCH = {"avx2": "-march=haswell", "default": "-march=x86-64"}
_lock = threading.Lock()
_pool: dict = {}  # the Python thread pool (SNNCONV_CPU_OPENMP=off), rebuilt when the thread count changes
_PARALLEL_MIN = 1 << 18  # neurons x steps below which one thread does the layer (a task costs ~20 us)


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "unknown")


def compile_library(source: str, stem: str, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """`source` built into a shared library by the system C compiler (FLAGS + extra, this CPU's instruction set),
    cached per source, compiler, flags and CPU in $SNNCONV_CACHE (default ~/.cache/snnconv). Raises where
    there is no compiler or it fails."""
    cc = config.CC.get() or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = [*FLAGS, *extra, _MARCH.get(config.CPU_CAPABILITY.get().lower(), "-march=native")]
    flags += ["-fopenmp"] if openmp() else []
    key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(config.CACHE.get()).expanduser()
    lib = cache / f"{stem}_{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, built = Path(tmp) / f"{stem}.c", Path(tmp) / f"{stem}.so"
            src.write_text(source)
            done = subprocess.run([cc, *flags, str(src), "-o", str(built)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:300]}")
            os.replace(built, lib)  # atomic: processes compiling at once each install a whole file
    return ctypes.CDLL(str(lib))


def openmp() -> bool:
    """Build the kernels with OpenMP where torch's own OpenMP runtime (libgomp) is loaded in this process: our
    -fopenmp library binds to that same runtime, so the kernels' parallel loops run on torch's threads. A
    second pool's threads compete with torch's idle workers, which spin for a while after each torch op, and
    lose most of the second thread's gain."""
    if config.CPU_OPENMP.off():
        return False
    try:
        return "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


class Kernels(NamedTuple):
    """The compiled library's entry points, each (function over rows [row0, row1), its OpenMP driver or None)."""

    neuron: tuple
    pool: tuple


def _compile() -> Kernels:
    # GCC would turn the loops loading and storing a block of membranes into memcpy calls, slow on 64-float
    # blocks
    lib = compile_library(SOURCE, "neuron_cpu", ("-fno-tree-loop-distribute-patterns",))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    c_int = ctypes.c_int
    for fn in (lib.neuron_steps, lib.neuron_steps_par):
        fn.argtypes = (
            [ptr] * 6
            + [i64] * 5
            + [c_int, c_int, f32, c_int, f32, c_int, ptr, i64, c_int, c_int, ptr, c_int, ptr, i64]
            + [ptr, i64, c_int, ptr, c_int]
        )
        fn.restype = None
    for fn in (lib.pool_steps, lib.pool_steps_par):
        fn.argtypes = [ptr] * 4 + [i64] * 9
        fn.restype = None
    omp = openmp()
    return Kernels(
        (lib.neuron_steps, lib.neuron_steps_par if omp else None), (lib.pool_steps, lib.pool_steps_par if omp else None)
    )


def _compile_or_off() -> str | None:
    return f"{config.CPU_KERNEL.name}=off" if config.CPU_KERNEL.off() else None


KERNELS = Lazy(_compile, _compile_or_off)  # the compiled Kernels, or None (then why_not() says why)


def why_not() -> str | None:
    """Why the kernel does not run here, or None if it does."""
    return KERNELS.why_not()


def thread_pool() -> ThreadPoolExecutor | None:
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    pool = _pool.get("pool")
    if pool is None or pool._max_workers != threads:
        with _lock:
            pool = _pool.get("pool")
            if pool is None or pool._max_workers != threads:
                _pool["pool"] = pool = ThreadPoolExecutor(threads, thread_name_prefix="snnconv-neurons")
    return pool


def _aligned(t: torch.Tensor, v: torch.Tensor, lead: bool, dtype: torch.dtype = torch.float32) -> bool:
    """t is [steps, *v.shape] (lead) or v's shape, float32 on the CPU, with v's strides after the lead dim
    and steps packed back to back: element i of a step's memory is neuron i of v's memory. Strides of
    size-1 dims are ignored (torch leaves them arbitrary: a batch of 1 has any batch stride)."""
    if t.dtype != dtype or t.device.type != "cpu" or t.shape[int(lead) :] != v.shape:
        return False
    strides, v_strides = t.stride()[int(lead) :], v.stride()
    same = strides == v_strides or all(a == b for a, b, n in zip(strides, v_strides, v.shape) if n > 1)
    return same and (not lead or t.shape[0] == 1 or t.stride(0) == v.numel())


def _is_code(code: tuple, v: torch.Tensor, steps: int) -> bool:
    """Is code[0] a uint8 buffer of `steps` steps of v's neurons in groups of code[1] (code[2]: interleaved)?"""
    buf, group, interleave = code[:3]
    size = steps * v.numel() * (2 if interleave else 1)
    width = v.numel() // v.shape[0]
    return buf.dtype == torch.uint8 and buf.is_contiguous() and buf.numel() == size and width % group == 0


def multistep(
    x,
    v,
    theta,
    *,
    steps,
    static,
    soft_reset,
    v_reset,
    decay,
    out,
    count=None,
    bias=None,
    code=None,
    float_out=True,
    v0=None,
    store=True,
    residual=None,
    residual_code=None,
) -> bool:
    """Run the neurons like torch_backend.multistep (count given: signed=True; float32, or uint8 where the call has at
    most 255 steps), plus `bias` (broadcast like theta) added to every step's input first. `code` = (uint8 tensor,
    group, interleave, base): also write the spikes as an int8 layer's input (see kernels/neuron_cpu.c); with it,
    float_out=False leaves `out` unwritten (nothing reads the float spikes). v0 (broadcast like theta): the
    membranes start from it and the count from zero, v and count unread (a call's first steps: no fill passes).
    store=False: v and count are left unwritten (a call's last steps: nothing reads them again). residual (x's
    layout, not static): added to each step's input before the bias, as the add it replaces did. residual_code =
    (uint8 tensor, group, interleave, theta, shift), with it: the residual is the spikes of a neuron (threshold
    theta, signed: shift 1), their values read from the code it wrote (`code` above), not from `residual`, which may
    be unwritten but gives their layout (the code is in that neuron's memory order). False, having done nothing,
    where the kernel does not apply: not compiled here, not float32 CPU tensors, or layouts it does not walk (then
    use torch)."""
    kernel = KERNELS.get()
    dense = v.is_contiguous() or (v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last))
    if (
        kernel is None
        or v.dim() < 1
        or v.numel() == 0
        or not dense
        or not _aligned(v, v, False)
        or not _aligned(x, v, not static)
        or not _aligned(out, v, True)
        or (
            count is not None
            and (count.dtype not in (torch.float32, torch.uint8) or not _aligned(count, v, False, count.dtype))
        )
        or (residual is not None and (static or not _aligned(residual, v, True)))
        or (residual_code is not None and (residual is None or not _is_code(residual_code, v, steps)))
    ):
        return False
    rows = v.shape[0]
    width = v.numel() // rows
    code_args = (0, 1, 0, 0)
    if code is not None:
        if not _is_code(code, v, steps):
            return False
        buf, group, interleave, base = code
        code_args = (buf.data_ptr(), group, int(interleave), base)
    r_theta = None if residual_code is None else residual_code[3]

    # per-channel values repeat every C neurons of a channels-last row: pass one pixel's (C >= BLOCK: blocks stay
    # whole), else the whole row
    cl = v.dim() == 4 and not v.is_contiguous() and v.shape[1] >= BLOCK
    per_channel = all(t is None or t.numel() in (1, v.shape[1]) for t in (theta, bias, v0, r_theta))
    period = v.shape[1] if cl and per_channel else width

    theta_row = _row(theta, v, period, width)
    bias_row = None if bias is None else _row(bias, v, period, width)
    v0_row = None if v0 is None else _row(v0, v, period, width)
    args = (
        x.data_ptr(),
        v.data_ptr(),
        0 if count is None else count.data_ptr(),
        out.data_ptr() if float_out or code is None else 0,
        theta_row.data_ptr(),
        0 if bias_row is None else bias_row.data_ptr(),
        rows,
        width,
    )
    signed = 0 if count is None else 2 if count.dtype == torch.uint8 else 1
    tail = (steps, int(static), int(decay != 1.0), decay, int(soft_reset), v_reset, signed, *code_args)
    floats = residual is not None and residual_code is None
    tail += (0 if v0_row is None else v0_row.data_ptr(), int(store), residual.data_ptr() if floats else 0)
    tail += (period,)
    if residual_code is None:
        tail += (0, 1, 0, 0, 0)
    else:
        buf, group, interleave, _, shift = residual_code
        r_theta_row = _row(r_theta, v, period, width)
        tail += (buf.data_ptr(), group, int(interleave), r_theta_row.data_ptr(), shift)
    split(*kernel.neuron, args, rows, tail, parallel=v.numel() * steps >= _PARALLEL_MIN)
    return True


_rows: dict = {}  # per-channel rows already laid out, by their source's identity and version and the layout


def _row(t: torch.Tensor, v: torch.Tensor, period: int, width: int) -> torch.Tensor:
    """One row's values of t (theta, a bias, a starting membrane: per channel or one value), laid out in memory as
    v's rows are, or its first `period` values where they repeat so. Made once per source, version and layout, not on
    every neuron call; the entry holds its source, so no other tensor takes that memory while it is kept."""
    key = (t.data_ptr(), t._version, t.dtype, t.shape, t.stride(), v.shape[1:], v.stride()[1:], period)
    hit = _rows.get(key)
    if hit is None:
        if period < width:
            row = t.to(torch.float32).reshape(-1).expand(period).contiguous()
        else:
            row = torch.empty_like(v[:1], dtype=torch.float32)
            row.copy_(t.to(torch.float32).expand(row.shape))
        if len(_rows) >= 256:  # many models or shapes: start again rather than keep every row (each <= a sample)
            _rows.clear()
        hit = _rows[key] = (t, row)
    return hit[1]


def pool_steps(x: torch.Tensor, acc: torch.Tensor, last: torch.Tensor, out: torch.Tensor, k: tuple[int, int]) -> bool:
    """SpikeMaxPool's steps in one pass (kernels/neuron_cpu.c): x [steps * N, C, H, W], acc [N, C, H, W], last and
    out pooled by the non-overlapping window k, all float32 channels-last on the CPU; acc and last updated in place.
    False, having done nothing, where the kernel is not compiled or a tensor is not laid out so."""
    kernel = KERNELS.get()
    n, c, h, w = acc.shape
    tensors = (x, acc, last, out)
    if (
        kernel is None
        or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
        or not all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
        or x.shape[0] % n
        or x.shape[1:] != acc.shape[1:]
        or last.shape != (n, c, h // k[0], w // k[1])
        or out.shape != (x.shape[0], *last.shape[1:])
    ):
        return False
    steps, rows = x.shape[0] // n, n * (h // k[0])
    head = (*(t.data_ptr() for t in tensors), n, h, w, c, *k)
    split(*kernel.pool, head, rows, (steps,), parallel=x.numel() >= _PARALLEL_MIN)
    return True


def split(fn, par, head: tuple, rows: int, tail: tuple, parallel: bool = True):
    """fn(*head, row0, row1, *tail) over rows [0, rows), split over torch's thread count where `parallel`:
    as par(*head, rows, parts, *tail), the kernel's own OpenMP loop over the parts, where it was built with OpenMP
    (`openmp()`, par not None; returns what par returns); else over a Python thread pool (ctypes releases
    the GIL during each call; returns None)."""
    parts = max(1, min(torch.get_num_threads() if parallel else 1, rows))
    if par is not None:
        return par(*head, rows, parts, *tail)
    pool = thread_pool() if parts > 1 else None
    if pool is None:
        fn(*head, 0, rows, *tail)
        return None
    cuts = [rows * i // parts for i in range(parts + 1)]
    for f in [pool.submit(fn, *head, a, b, *tail) for a, b in itertools.pairwise(cuts) if b > a]:
        f.result()
    return None
