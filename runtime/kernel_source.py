"""The CUDA neuron kernel's source and variants: one place that names them for NVRTC, nvcc and the host build."""

from __future__ import annotations

import itertools
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCE = KERNEL_DIR / "neuron.cu"
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


VECS = (1, 4)


def name(dtype: str, vec: int, static: bool, soft: bool, leak: bool, count: bool, signed: bool = False) -> str:
    b = lambda f: "true" if f else "false"  # noqa: E731
    return f"snn_neuron<{DTYPES[dtype]}, {vec}, {b(static)}, {b(soft)}, {b(leak)}, {b(count)}, {b(signed)}>"


def all_variants() -> list[tuple]:
    """(dtype, vec, static, soft, leak, count, signed) for every compiled kernel: signed spikes only with
    soft reset and the count (their net count)."""
    binary = [(*f, False) for f in itertools.product((False, True), repeat=4)]
    signed = [(static, True, leak, True, True) for static in (False, True) for leak in (False, True)]
    return [(d, vec, *flags) for d in DTYPES for vec in VECS for flags in binary + signed]


def instantiations() -> str:
    """Explicit template instantiations of every variant (for ahead-of-time PTX and host builds)."""
    lines = []
    for v in all_variants():
        n = name(*v)
        t = "float" if v[0] == "float32" else "snn_u16"
        lines.append(
            f"template __global__ void {n}(const {t}*, {t}*, float*, const float*, float*, long long, "
            "int, int, long long, float, float);"
        )
    return "\n".join(lines)


def full_source() -> str:
    """The kernel source with every variant instantiated (what ahead-of-time compilers build)."""
    return SOURCE.read_text() + "\n" + instantiations() + "\n"


def ptx_with_nvcc(arch: str, nvcc: str = "nvcc") -> str:
    """Compile every variant to PTX with nvcc for `arch` (e.g. 'sm_90'); needs no GPU."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, ptx = Path(d) / "neuron_all.cu", Path(d) / "neuron.ptx"
        src.write_text(full_source())
        proc = subprocess.run(
            [nvcc, "-std=c++17", "-ptx", f"-arch={arch}", "-o", str(ptx), str(src)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stderr}")
        return ptx.read_text()


def ptx_with_nvrtc(arch: str) -> str:
    """Compile every variant to PTX with NVRTC (pip package nvidia-cuda-nvrtc-cu12); needs no GPU."""
    import ctypes
    import glob
    import os

    import nvidia.cuda_nvrtc as pkg  # the pip package's namespace

    libs = [p for d in pkg.__path__ for p in glob.glob(os.path.join(d, "lib", "libnvrtc.so*"))]
    if not libs:
        raise RuntimeError("libnvrtc not found in the nvidia-cuda-nvrtc-cu12 package")
    lib = ctypes.CDLL(sorted(libs)[0])
    prog = ctypes.c_void_p()
    src = full_source().encode()

    def check(code, what, log=False):
        if code != 0:
            detail = ""
            if log:
                n = ctypes.c_size_t()
                lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
                buf = ctypes.create_string_buffer(n.value)
                lib.nvrtcGetProgramLog(prog, buf)
                detail = buf.value.decode(errors="replace")
            raise RuntimeError(f"NVRTC {what} failed (code {code}) for {arch}:\n{detail}")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"neuron.cu", 0, None, None), "create")
    opts = [b"-std=c++17", f"--gpu-architecture=compute_{arch.split('_')[1]}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        check(lib.nvrtcCompileProgram(prog, len(opts), arr), "compile", log=True)
        n = ctypes.c_size_t()
        check(lib.nvrtcGetPTXSize(prog, ctypes.byref(n)), "get PTX size")
        buf = ctypes.create_string_buffer(n.value)
        check(lib.nvrtcGetPTX(prog, buf), "get PTX")
        return buf.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def host_library_source(names: list[str] | None = None) -> str:
    """C++ (to be built beside a copy of neuron.cu) that wraps each kernel in `names` (default: every
    variant) in an extern "C" host launcher `snn_host_<i>(x, out, v, th, count, M, steps, C, inner,
    v_reset, decay, blocks, threads)` running the grid block by block, thread by thread; and
    `snn_host_take_misaligned()`, the number of misaligned vector accesses since the last call."""
    names = names if names is not None else [name(*v) for v in all_variants()]
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
    (directory / "neuron.cu").write_text(code if code is not None else SOURCE.read_text())
    shutil.copy(KERNEL_DIR / "host_shim.h", directory / "host_shim.h")
    (directory / "lib.cpp").write_text(host_library_source(names))
    lib = directory / "lib.so"
    cmd = ["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-I", str(directory)]
    proc = subprocess.run([*cmd, "-o", str(lib), str(directory / "lib.cpp")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed on the kernel source:\n{proc.stderr[-4000:]}")
    return lib
