"""A stand-in for the `cupy` module that runs CUDA kernels on the host, so CI (no GPU) drives the real
launcher (runtime/cupy_backend.py) with only the CuPy module replaced.

RawModule compiles the code the launcher hands it with g++ through runtime/kernels/host_shim.h and wraps
each name expression in a host function that runs the whole grid, block by block and thread by thread.
Launches are checked the way a GPU checks them: a grid or block of 0 threads is rejected, a block over
1024 threads too, and a misaligned vector access fails ("misaligned address"). Scalar arguments must have
the kernel's parameter types (CuPy passes a numpy scalar by its own size: an int32 where the kernel reads a
long long is garbage on a GPU, not an error). Every launch is recorded (kernel name, grid, block, stream)
for the tests to read. Synchronising the whole device is an error here: the launcher must never need it.

`RawModule.blocks`, when set to [(first, end), ...], runs only those ranges of the grid's blocks (the rest
are left to an imaginary GPU): a test can launch a grid over more than 2^31 elements, in memory that stays
virtual except where those blocks touch it, and check the elements they cover.
"""

from __future__ import annotations

import ctypes
import hashlib
import tempfile
import types
from pathlib import Path
from typing import ClassVar

import numpy as np

from snnconv.runtime import kernel_source


def host_library_source(names: list[str] | None = None) -> str:
    """C++ (to be built beside a copy of neuron.cu) that wraps each kernel in `names` (default: every
    variant) in an extern "C" host launcher `snn_host_<i>(x, out, v, th, count, M, steps, C, inner,
    v_reset, decay, blocks, threads)` running the grid block by block, thread by thread; and
    `snn_host_take_misaligned()`, the number of misaligned vector accesses since the last call."""
    names = names if names is not None else [kernel_source.name(*v) for v in kernel_source.all_variants()]
    out = [
        "#define SNN_HOST 1",
        '#include "neuron.cu"',
        "template <int DT, int VEC, bool STATIC, bool SOFT, bool LEAK, bool COUNT, bool SIGNED>",
        "static void snn_host_run(const void* x, void* out, float* v, const float* th, float* count, long long M,",
        "                         int steps, int C, long long inner, float v_reset, float decay, unsigned blocks,",
        "                         unsigned threads) {",
        "  typedef typename SnnStorage<DT>::type T;",
        "  SNN_HOST_LAUNCH((snn_neuron<DT, VEC, STATIC, SOFT, LEAK, COUNT, SIGNED>), blocks, threads, (const T*)x,",
        "                  (T*)out,",
        "                  v, th, count, M, steps, C, inner, v_reset, decay);",
        "}",
        'extern "C" long long snn_host_take_misaligned() {',
        "  long long n = snn_host_misaligned;",
        "  snn_host_misaligned = 0;",
        "  return n;",
        "}",
    ]
    for i, n in enumerate(names):
        out.append(
            f'extern "C" void snn_host_{i}(const void* x, void* out, float* v, const float* th, float* count, '
            "long long M, int steps, int C, long long inner, float v_reset, float decay, unsigned blocks, "
            f"unsigned threads) {{\n  {n.replace('snn_neuron', 'snn_host_run', 1)}(x, out, v, th, count, M, "
            "steps, C, inner, v_reset, decay, blocks, threads);\n}"
        )
    return "\n".join(out) + "\n"


def build_host_library(directory: Path, code: str | None = None, names: list[str] | None = None) -> Path:
    """Build `code` (default: neuron.cu as it is) with g++ for the host, through host_shim.h, wrapped by
    host_library_source(names); returns the shared library's path. Float arithmetic as on the GPU: no
    contraction into FMA (the kernel asks for none)."""
    import shutil
    import subprocess

    directory = Path(directory)
    (directory / "neuron.cu").write_text(code if code is not None else kernel_source.SOURCE.read_text())
    shutil.copy(kernel_source.KERNEL_DIR / "host_shim.h", directory / "host_shim.h")
    (directory / "lib.cpp").write_text(host_library_source(names))
    lib = directory / "lib.so"
    cmd = ["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-I", str(directory)]
    proc = subprocess.run([*cmd, "-o", str(lib), str(directory / "lib.cpp")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed on the kernel source:\n{proc.stderr[-4000:]}")
    return lib


_built: dict = {}  # (code, names) hash -> loaded library: one build per source per test session
_tmp = tempfile.TemporaryDirectory(prefix="snn_host_cupy_")
# the kernel's scalar parameters after its five pointers: long long M, int steps, int C, long long inner,
# float v_reset, float decay
_SCALARS = (np.int64, np.int32, np.int32, np.int64, np.float32, np.float32)
# appended to the kernel source: host_shim.h's grid loop, over a range of blocks the stand-in sets
_BLOCK_RANGE = r"""
#undef SNN_HOST_LAUNCH
extern "C" {
unsigned int snn_host_first_block = 0, snn_host_end_block = 0;  // end 0: the grid's end
}
#define SNN_HOST_LAUNCH(kernel, blocks, threads, ...)                                               \
  do {                                                                                              \
    gridDim.x = (blocks); blockDim.x = (threads);                                                   \
    unsigned int end_ = snn_host_end_block ? snn_host_end_block : (unsigned int)(blocks);           \
    for (unsigned int b = snn_host_first_block; b < end_; ++b)                                      \
      for (unsigned int t = 0; t < (unsigned int)(threads); ++t) {                                  \
        blockIdx.x = b; threadIdx.x = t; kernel(__VA_ARGS__);                                       \
      }                                                                                             \
  } while (0)
"""


class CUDADriverError(RuntimeError):
    pass


class _Stream:
    def __init__(self, ptr: int):
        self.ptr = ptr

    @classmethod
    def from_external(cls, obj):
        return cls(obj.__cuda_stream__()[1])


class _Device:
    def __init__(self, index=None):
        self.id = 0 if index is None else index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        raise AssertionError("device-wide synchronisation: the launcher must run on the caller's stream only")


class RawKernel:
    def __init__(self, module: RawModule, fn, name: str):
        self.module, self.fn, self.name = module, fn, name

    def __call__(self, grid, block, args, stream=None, shared_mem=0):
        grid, block = tuple(grid), tuple(block)
        if len(grid) != 1 or len(block) != 1 or grid[0] < 1 or block[0] < 1 or block[0] > 1024:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: invalid launch configuration grid={grid} block={block}")
        x, out, v, th, count, M, steps, C, inner, v_reset, decay = args
        for i, (value, want) in enumerate(zip(args[5:], _SCALARS)):
            if type(value) is not want:
                raise TypeError(f"kernel argument {5 + i} is {type(value).__name__}; the kernel reads {want.__name__}")
        ranges = self.module.blocks or [(0, grid[0])]
        if any(not 0 <= first < end <= grid[0] for first, end in ranges):
            raise AssertionError(f"block ranges {ranges} outside the grid {grid}")
        self.module.launches.append(
            dict(name=self.name, grid=grid, block=block, stream=getattr(stream, "ptr", None), x=x, out=out, v=v)
            | dict(M=int(M), steps=int(steps), C=int(C), inner=int(inner))
        )
        for first, end in ranges:
            self.module.lib_range[0].value, self.module.lib_range[1].value = first, end
            self._run(x, out, v, th, count, M, steps, C, inner, v_reset, decay, grid, block)
        if self.module.lib.snn_host_take_misaligned():
            raise CUDADriverError(f"CUDA_ERROR_MISALIGNED_ADDRESS: misaligned address in {self.name}")

    def _run(self, x, out, v, th, count, M, steps, C, inner, v_reset, decay, grid, block):
        self.fn(
            ctypes.c_void_p(x),
            ctypes.c_void_p(out),
            ctypes.c_void_p(v),
            ctypes.c_void_p(th),
            ctypes.c_void_p(count or None),
            ctypes.c_longlong(int(M)),
            ctypes.c_int(int(steps)),
            ctypes.c_int(int(C)),
            ctypes.c_longlong(int(inner)),
            ctypes.c_float(float(v_reset)),
            ctypes.c_float(float(decay)),
            ctypes.c_uint(grid[0]),
            ctypes.c_uint(block[0]),
        )


class RawModule:
    launches: ClassVar[list] = []  # every launch through any stand-in module, oldest first
    blocks: ClassVar[list | None] = None  # [(first, end), ...]: the block ranges each launch runs (None: all)

    def __init__(self, code: str, options=(), name_expressions=()):
        self.names = list(name_expressions)
        code = code + _BLOCK_RANGE
        key = hashlib.sha256((code + "\0" + "\0".join(self.names)).encode()).hexdigest()[:16]
        if key not in _built:
            d = Path(_tmp.name) / key
            d.mkdir()
            lib = ctypes.CDLL(str(build_host_library(d, code, self.names)))
            lib.snn_host_take_misaligned.restype = ctypes.c_longlong
            _built[key] = lib
        self.lib = _built[key]
        self.lib_range = tuple(
            ctypes.c_uint.in_dll(self.lib, n) for n in ("snn_host_first_block", "snn_host_end_block")
        )

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(self, getattr(self.lib, f"snn_host_{self.names.index(name)}"), name)


def _device_sync():
    raise AssertionError("device-wide synchronisation: the launcher must run on the caller's stream only")


def module() -> types.ModuleType:
    """A fresh stand-in `cupy` module (its RawModule.launches cleared)."""
    RawModule.launches, RawModule.blocks = [], None
    cp = types.ModuleType("cupy")
    cp.RawModule, cp.RawKernel = RawModule, RawKernel
    cp.int32, cp.int64, cp.float32 = np.int32, np.int64, np.float32
    runtime = types.SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1, deviceSynchronize=_device_sync)
    cp.cuda = types.SimpleNamespace(Device=_Device, Stream=_Stream, ExternalStream=_Stream, runtime=runtime)
    return cp


class TorchStream:
    """What torch.cuda.current_stream returns, as far as the launcher looks: a CUDA stream handle."""

    def __init__(self, ptr: int):
        self.cuda_stream = ptr

    def __cuda_stream__(self):
        return (0, self.cuda_stream)
