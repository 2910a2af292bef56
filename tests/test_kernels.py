"""The CUDA neuron kernel and its launcher without a GPU.

- Every variant compiles to PTX (sm_80, sm_90) with nvcc and NVRTC.
- The real launcher (runtime/cupy_backend.py) runs with only the `cupy` module replaced by a stand-in
  (tests/host_cupy.py) that builds the kernel source for the host and runs every block and thread, with
  the GPU's launch and alignment rules. Results are compared with a float32 numpy loop (independent of
  both backends): every variant, inputs landing exactly on the threshold, per-channel shapes whose channel
  boundary falls inside a 4-wide group, channels-last and mixed layouts, misaligned and strided views,
  empty inputs, the caller's stream, and a whole converted network; signed spikes (their net count the
  kernel's second state array) against a float32 numpy loop of their own and a converted signed network.
"""

import functools
import mmap
import shutil
import sys
from pathlib import Path

import host_cupy
import numpy as np
import pytest
import torch

import snnconv
from snnconv.runtime import kernel_source as ks

# binary spikes (signed ones have their own tests here) and no bias calibration: fitted by
# each conversion's own SNN run, biases would differ between the paths these tests compare bit for bit
convert_binary = functools.partial(snnconv.convert, signed_spikes=False, bias_calibration=False)


VARIANTS = ks.all_variants()
STREAM = 0x5EED  # the caller's current stream, as the stand-in torch.cuda.current_stream hands it out
CL = torch.channels_last


def _has_nvrtc() -> bool:
    try:
        import nvidia.cuda_nvrtc  # noqa: F401

        return True
    except ImportError:
        return False


def _ptx_with_nvcc(arch: str, nvcc: str = "nvcc") -> str:
    """Compile every variant to PTX with nvcc for `arch` (e.g. 'sm_90'); needs no GPU."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src, ptx = Path(d) / "neuron_all.cu", Path(d) / "neuron.ptx"
        src.write_text(ks.full_source())
        proc = subprocess.run(
            [nvcc, "-std=c++17", "-ptx", f"-arch={arch}", "-o", str(ptx), str(src)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{proc.stderr}")
        return ptx.read_text()


def _ptx_with_nvrtc(arch: str) -> str:
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
    src = ks.full_source().encode()

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


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("compiler", ["nvcc", "nvrtc"])
def test_every_variant_compiles_to_ptx(arch, compiler):
    if compiler == "nvcc":
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc not on PATH")
        ptx = _ptx_with_nvcc(arch)
    else:
        if not _has_nvrtc():
            pytest.skip("nvidia-cuda-nvrtc-cu12 not installed")
        ptx = _ptx_with_nvrtc(arch)
    assert ptx.count(".entry") == len(VARIANTS) == 120  # 96 binary, 24 signed
    assert f".target {arch}" in ptx
    assert "cvt.rn.f16.f32" in ptx  # float16 stores round to nearest even
    assert ".local" not in ptx  # the membrane lives in registers, nothing spills


@pytest.fixture
def launcher(monkeypatch):
    """The real launcher with the stand-in CuPy; afterwards, every launch must have gone to the caller's
    stream (and nothing synchronised the device: the stand-ins raise)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    from snnconv.runtime import cupy_backend

    cp = host_cupy.module()
    asked = []
    monkeypatch.setattr(cupy_backend, "cp", cp)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_kernels", {})
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda device=None: asked.append(device) or host_cupy.TorchStream(STREAM)
    )
    monkeypatch.setattr(torch.cuda, "synchronize", host_cupy._device_sync)
    yield cupy_backend
    launches = cp.RawModule.launches
    assert all(rec["stream"] == STREAM for rec in launches), "a launch left the caller's stream"
    assert len(asked) == len(launches)


# ---- an independent reference: float32 numpy, logical order (layouts play no part) ----


def reference(x, v, theta, *, steps, static, soft_reset, v_reset, decay, net=None):
    """(outputs [steps, ...] float32, final membrane, how many charges H landed exactly on the threshold);
    `net` given (a net spike count): signed spikes, -theta where H < 0 while the net count is positive,
    and the final net count as a fourth item."""
    xs, vv = x.float().numpy(), v.numpy().astype(np.float32)
    th = np.broadcast_to(theta.float().numpy(), vv.shape)
    n = None if net is None else net.numpy().astype(np.float32)
    outs, ties = [], 0
    for t in range(steps):
        xt = xs if static else xs[t]
        h = vv * np.float32(decay) + xt if decay != 1.0 else vv + xt
        s = h >= th
        ties += int((h == th).sum())
        o = np.where(s, th, np.float32(0.0))
        if n is not None:
            neg = ~s & (h < 0) & (n > 0)
            o = np.where(neg, -th, o)
            n = n + s.astype(np.float32) - neg.astype(np.float32)
        vv = h - o if soft_reset else np.where(s, np.float32(v_reset), h)
        outs.append(o)
    res = torch.from_numpy(np.stack(outs)), torch.from_numpy(np.ascontiguousarray(vv)), ties
    return res if n is None else (*res, torch.from_numpy(np.ascontiguousarray(n)))


def make_case(shape, steps, per_channel, dtype, static, seed):
    """Thresholds and inputs in multiples of 1/8 for half the neurons (exact in every dtype, so charges land
    exactly on thresholds), uniform random inputs for the other half."""
    g = torch.Generator().manual_seed(seed)
    if per_channel:
        theta_c = torch.tensor([0.25, 0.5, 0.75, 1.0])[torch.randint(4, (shape[1],), generator=g)]
        theta = theta_c.view(-1, *([1] * (len(shape) - 2)))
    else:
        theta = torch.tensor(0.5)
    xshape = shape if static else (steps, *shape)
    exact = torch.randint(-2, 11, xshape, generator=g) / 8
    noise = torch.rand(xshape, generator=g) * 1.2 - 0.2
    x = torch.where(torch.rand(shape, generator=g) < 0.5, exact, noise).to(dtype)
    v0 = (0.5 * theta).expand(shape).contiguous().float()
    return x, v0, theta


def layout(t: torch.Tensor, kind: str, lead: int = 0) -> torch.Tensor:
    """t's values in a layout: 'nchw' (contiguous), 'cl' (channels-last over the last 4 dims, `lead` leading
    dims in front as the neuron's [T, N, ...] view of a [T*N, ...] tensor), 'offset' (contiguous but one
    element off a 16-byte boundary), 'strided' (every other element of a wider tensor: not dense)."""
    if kind == "nchw":
        return t.contiguous()
    if kind == "cl":
        flat = t.flatten(0, lead) if lead else t
        return flat.contiguous(memory_format=CL).view(t.shape)
    if kind == "offset":
        return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)
    if kind == "strided":
        return torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2].copy_(t)
    raise ValueError(kind)


def run_and_check(cb, x, v, theta, out, count=None, signed=False, **kw):
    """Launch through the real launcher; compare out, v (and count) with the reference; return the ties
    (signed: and how many negative spikes the reference fired)."""
    ref = reference(x, v.clone(), theta, **kw, net=count.clone() if signed else None)
    ref_out, ref_v, ties = ref[:3]
    count0 = count.clone() if count is not None else None
    calls = {}
    got = cb.multistep(x, v, theta, out=out, count=count, calls=calls, signed=signed, **kw)
    assert got is out
    assert calls == {"kernel": 1}
    assert torch.equal(out, ref_out.to(out.dtype)), f"{(out != ref_out.to(out.dtype)).sum()} outputs differ"
    assert torch.equal(v, ref_v)
    if signed:
        assert torch.equal(count, ref[3])
        return ties, int((ref_out < 0).sum())
    if count is not None:
        assert torch.equal(count, count0 + (ref_out != 0).sum(0).float())
    return ties


def _variant_shapes(vec):
    """(shape, steps, per_channel): with vec 4 every M is a multiple of 4 and the per-channel inner sizes
    (9, 1 for channels-last with C = 3, 3 for [N, 3] vectors) are not, so channel boundaries fall inside
    4-wide groups; with vec 1 every M is odd."""
    if vec == 4:
        return [((4, 3, 3, 3), 5, True), ((4, 3), 7, True), ((2, 3, 4, 6), 3, "cl"), ((1000,), 16, False)]
    return [((3, 5, 7, 11), 1, False), ((3, 3, 3, 3), 5, True), ((5, 3), 7, True), ((1, 3, 5, 3), 3, "cl")]


@pytest.mark.parametrize("variant", VARIANTS, ids=[ks.name(*v) for v in VARIANTS])
def test_launcher_runs_every_variant_as_the_reference(launcher, variant):
    dtype_name, vec, static, soft, leak, count, signed = variant
    dtype = getattr(torch, dtype_name)
    ties = negatives = 0
    for i, (shape, steps, per_channel) in enumerate(_variant_shapes(vec)):
        x, v, theta = make_case(shape, steps, bool(per_channel), dtype, static, seed=VARIANTS.index(variant) * 7 + i)
        if per_channel == "cl":
            x, v = layout(x, "cl", 0 if static else 1), layout(v, "cl")
        out = torch.full((steps, *shape), 7.0, dtype=dtype)  # poisoned: every element must be written
        out = layout(out, "cl", 1) if per_channel == "cl" else out
        cnt = torch.full(shape, 2.0) if count else None
        if signed:  # net counts of 2 (negative spikes possible at once) and of 0
            cnt[..., ::2] = 0.0
        cnt = layout(cnt, "cl") if count and per_channel == "cl" else cnt
        kw = dict(steps=steps, static=static, soft_reset=soft, v_reset=0.25, decay=0.5 if leak else 1.0)
        if signed:
            t, n = run_and_check(launcher, x, v, theta, out, cnt, signed=True, **kw)
            ties, negatives = ties + t, negatives + n
        else:
            ties += run_and_check(launcher, x, v, theta, out, cnt, **kw)
        rec = launcher.cp.RawModule.launches[-1]
        assert rec["name"] == ks.name(*variant)  # the launcher chose this variant (and this vector width)
        if per_channel == "cl":
            assert rec["inner"] == 1 and rec["x"] == x.data_ptr() and rec["out"] == out.data_ptr()  # zero-copy
    assert ties > 0  # charges landed exactly on thresholds: `>=` against `>` is tested
    assert negatives > 0 or not signed


LAYOUT_CASES = {
    # name: (x, v, out, count) layouts; 'cl' x/out are [T, N, ...] views of channels-last [T*N, ...]
    "all channels-last": ("cl", "cl", "cl", "cl"),
    "x NCHW, state channels-last (step mode: input format changed)": ("nchw", "cl", "cl", "cl"),
    "x channels-last, state and out NCHW": ("cl", "nchw", "nchw", "nchw"),
    "out channels-last, the rest NCHW": ("nchw", "nchw", "cl", "nchw"),
    "out strided (not dense)": ("nchw", "nchw", "strided", "nchw"),
    "x strided (not dense)": ("strided", "nchw", "nchw", "nchw"),
    "state and count strided": ("nchw", "strided", "nchw", "strided"),
    "x misaligned": ("offset", "nchw", "nchw", "nchw"),
    "out misaligned": ("nchw", "nchw", "offset", "nchw"),
    "x and out misaligned alike": ("offset", "nchw", "offset", "nchw"),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_launcher_layouts(launcher, case, dtype, static, signed):
    """Every layout combination gives the reference's values in the caller's tensors, in their layouts
    (signed spikes: the net count, in its layout, too)."""
    kx, kv, ko, kc = LAYOUT_CASES[case]
    shape, steps = (4, 6, 5, 3), 4  # M = 360 (4-wide groups possible), inner 15 / channels-last C = 6
    x, v, theta = make_case(shape, steps, True, dtype, static, seed=11)
    x = layout(x, kx, 0 if static else 1)
    v = layout(v, kv)
    out = layout(torch.full((steps, *shape), 7.0, dtype=dtype), ko, 1)
    cnt = layout(torch.randint(0, 3, shape).float() if signed else torch.zeros(shape), kc)
    strides = (out.stride(), v.stride(), cnt.stride())
    ptrs = (out.data_ptr(), v.data_ptr(), cnt.data_ptr())
    kw = dict(steps=steps, static=static, soft_reset=True, v_reset=0.0, decay=1.0)
    got = run_and_check(launcher, x, v, theta, out, cnt, signed=signed, **kw)
    assert not signed or got[1] > 0  # negative spikes fired
    assert (out.stride(), v.stride(), cnt.stride()) == strides and (
        out.data_ptr(),
        v.data_ptr(),
        cnt.data_ptr(),
    ) == ptrs


def test_launcher_empty_input_returns_at_once(launcher):
    for shape in [(0, 3, 4, 4), (0, 5)]:
        x, v, out = torch.rand(4, *shape), torch.zeros(shape), torch.empty(4, *shape)
        calls = {}
        th = torch.ones(shape[1], *([1] * (len(shape) - 2)))
        kw = dict(steps=4, static=False, soft_reset=True, v_reset=0.0, decay=1.0, calls=calls)
        assert launcher.multistep(x, v, th, out=out, **kw) is out
        assert calls == {"kernel": 1}
    assert launcher.cp.RawModule.launches == []


def test_launcher_leaves_float64_to_torch(launcher):
    x, v, theta = make_case((3, 4, 5), 3, True, torch.float64, False, seed=5)
    v = v.double()
    out, calls = torch.empty(3, 3, 4, 5, dtype=torch.float64), {}
    launcher.multistep(
        x, v, theta, out=out, steps=3, static=False, soft_reset=True, v_reset=0.0, decay=1.0, calls=calls
    )
    assert calls == {"torch": 1} and launcher.cp.RawModule.launches == []


def test_launcher_half_rounding_matches_torch(launcher):
    """Firing neurons store their threshold: per-channel thresholds th = values (shape [1, n]) through a
    float16 kernel give the kernel's float16 rounding of each value, which must be torch's."""
    vals = torch.cat([torch.randn(20000, generator=torch.Generator().manual_seed(2)) * 10])
    vals = torch.cat([vals, torch.tensor([65504.0, 65520.0, 1e-8, 6e-8, 2.0**-24, 0.0, -0.0, 1.0 + 2.0**-11])])
    n = vals.numel()
    v, out = torch.full((1, n), float("inf")), torch.empty(1, 1, n, dtype=torch.float16)
    x = torch.zeros(1, 1, n, dtype=torch.float16)
    launcher.multistep(x, v, vals, out=out, steps=1, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    assert torch.equal(out.view(-1), vals.half())


def test_launcher_grid_covers_every_neuron(launcher):
    """Sizes around block boundaries (256 threads, 4 neurons each): every output written, no block to spare."""
    for m in (1, 4, 255, 256, 257, 1023, 1024, 1025, 1028):
        x, v, theta = make_case((m,), 2, False, torch.float32, False, seed=m)
        out = torch.full((2, m), 7.0)
        run_and_check(launcher, x, v, theta, out, steps=2, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
        rec = launcher.cp.RawModule.launches[-1]
        vec = 4 if m % 4 == 0 else 1
        assert rec["grid"] == (-(-m // (vec * 256)),)


_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.13 does not name it
_GUARD = 2**31 * 4  # mapped bytes before each array: an index wrapped negative in 32 bits lands here, not in a fault


def _virtual(n: int, keep: list) -> torch.Tensor:
    """n float32 elements in anonymous memory mapped without reserving it: pages exist only where written
    (reads of the rest see shared zero pages), after _GUARD bytes of the same."""
    if not sys.platform.startswith("linux"):
        pytest.skip("sparse anonymous mappings: Linux only")
    try:
        mm = mmap.mmap(-1, _GUARD + 4 * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
    except (OSError, OverflowError, ValueError) as exc:
        pytest.skip(f"cannot map {(_GUARD + 4 * n) / 2**30:.0f} GiB of address space here: {exc}")
    keep.append(mm)
    return torch.from_numpy(np.frombuffer(mm, dtype=np.float32, count=n, offset=_GUARD))


@pytest.mark.parametrize("vec", [4, 1])
def test_launcher_indexes_past_2_31_elements(launcher, vec):
    check_past_2_31(launcher, vec)


def check_past_2_31(launcher, vec):
    """One layer of more than 2^32 neurons (3 channels, 2 steps: x[1] starts past 2^32 elements too), in memory
    that stays virtual: the stand-in runs only the blocks around element 2^31 (where a signed 32-bit index
    turns negative), around 2^32 (where an unsigned one wraps to 0) and the last ones, and each neuron there
    must match the reference, channel and step offsets included. A 32-bit index anywhere in the kernel fails
    here, where tests/test_kernels.py's other layers (under 2^31 elements) cannot see it."""
    C, steps, per_block = 3, 2, vec * 256
    L = (2**32 // C + 4096) // 4 * 4 + (vec == 1)  # vec 1: M odd, so the launcher picks the 1-wide kernel
    M = C * L
    keep = []
    x = _virtual(steps * M, keep).view(steps, 1, C, L)
    out, v, count = _virtual(steps * M, keep).view(steps, 1, C, L), _virtual(M, keep), _virtual(M, keep)
    v, count = v.view(1, C, L), count.view(1, C, L)
    theta = torch.tensor([0.25, 0.5, 0.75]).view(C, 1)
    grid = -(-M // per_block)
    blocks = [(2**31 // per_block - 2, 2**31 // per_block + 2), (2**32 // per_block - 2, 2**32 // per_block + 2)]
    blocks.append((grid - 3, grid))
    launcher.cp.RawModule.blocks = blocks
    xf, of, vf, cf = x.view(steps, M), out.view(steps, M), v.view(M), count.view(M)
    g = torch.Generator().manual_seed(3)
    kw = dict(steps=steps, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    refs = []
    for first, end in blocks:  # the neurons those blocks cover: inputs, membranes and counts set there only
        lo, hi = first * per_block, min(end * per_block, M)
        n = hi - lo
        xf[:, lo:hi] = torch.where(torch.rand(steps, n, generator=g) < 0.5, torch.randint(-2, 11, (steps, n)) / 8, 0.3)
        vf[lo:hi] = torch.rand(n, generator=g) * 0.25
        cf[lo:hi] = 2.0
        of[:, lo:hi] = 7.0  # poisoned: each must be written
        th = theta.view(-1)[(torch.arange(lo, hi) // L) % C]
        refs.append((lo, hi, reference(xf[:, lo:hi].clone(), vf[lo:hi].clone(), th, **kw)))
    calls = {}
    launcher.multistep(x, v, theta, out=out, count=count, calls=calls, **kw)
    rec = launcher.cp.RawModule.launches[-1]
    assert calls == {"kernel": 1} and rec["grid"] == (grid,) and rec["M"] == M > 2**32
    assert rec["name"] == ks.name("float32", vec, False, True, False, True)
    for lo, hi, (ref_out, ref_v, _) in refs:
        assert torch.equal(of[:, lo:hi], ref_out), f"outputs of neurons {lo}..{hi}"
        assert torch.equal(vf[lo:hi], ref_v), f"membranes of neurons {lo}..{hi}"
        assert torch.equal(cf[lo:hi], 2.0 + (ref_out != 0).sum(0).float()), f"counts of neurons {lo}..{hi}"
    assert not vf[: 2 * per_block].any() and not of[0, : 2 * per_block].any()  # nothing wrapped to the start


# 32-bit indexing seeded into the kernel (benchmarks/kernel_mutations.py has the same): (original, mutated)
INDEX_MUTANTS = {
    "int element index": (
        "const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
        "const int i0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
    ),
    "element index computed in 32 bits, then widened": (
        "const long long i0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
        "const long long i0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;",
    ),
    "step offset of x in 32 bits": (
        "snn_vload<Vec>(x + (long long)t * M + i0)",
        "snn_vload<Vec>(x + (int)(t * M) + i0)",
    ),
}


@pytest.mark.slow  # a host build of the mutated kernel each
@pytest.mark.parametrize("mutant", INDEX_MUTANTS)
def test_past_2_31_check_fails_32_bit_index_mutants(launcher, monkeypatch, tmp_path, mutant):
    """The check above can fail: each kernel seeded with a 32-bit index fails it (the other tests pass them)."""
    old, new = INDEX_MUTANTS[mutant]
    source = ks.SOURCE.read_text()
    assert source.count(old) == 1
    (tmp_path / "neuron.cu").write_text(source.replace(old, new))
    monkeypatch.setattr(ks, "SOURCE", tmp_path / "neuron.cu")
    with pytest.raises(AssertionError, match="of neurons"):
        check_past_2_31(launcher, 4)


COUNT_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float64]


def _count_case(signed: bool, dtype: torch.dtype, state=torch.float32):
    """Inputs over 6 steps and a count (net counts 0..2 for signed spikes) in `dtype`, with the reference's
    outputs, membrane and count."""
    x, v, theta = make_case((2, 3, 4, 4), 6, True, state, False, seed=21)
    v = v.to(state)
    count = torch.randint(0, 3, v.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    kw = dict(steps=6, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    ref = reference(x, v.clone(), theta, **kw, net=count.float() if signed else None)
    want = ref[3] if signed else count.float() + (ref[0] != 0).sum(0).float()
    return x, v, theta, count, kw, (ref[0], ref[1], want)


def _check_count_case(multistep, signed, dtype, state=torch.float32):
    x, v, theta, count, kw, (ref_out, ref_v, want) = _count_case(signed, dtype, state)
    out, calls = torch.empty(6, *v.shape, dtype=state), {}
    multistep(x, v, theta, out=out, count=count, calls=calls, signed=signed, **kw)
    assert count.dtype == dtype and torch.equal(count.float(), want)
    assert torch.equal(out.float(), ref_out) and torch.equal(v.float(), ref_v)
    return calls


@pytest.mark.parametrize("dtype", COUNT_DTYPES)
@pytest.mark.parametrize("signed", [False, True])
def test_torch_backend_counts_in_any_real_dtype(signed, dtype):
    """A count of any real dtype (the CPU kernel's uint8 among them) holds the float32 loop's counts after the
    call, in its own dtype."""
    from snnconv.runtime import torch_backend

    assert _check_count_case(torch_backend.multistep, signed, dtype) == {"torch": 1}


@pytest.mark.parametrize("dtype", COUNT_DTYPES)
@pytest.mark.parametrize("signed", [False, True])
def test_launcher_counts_in_any_real_dtype(launcher, signed, dtype):
    """The kernel takes a float32 count: any other is counted in a float32 copy and stored back."""
    assert _check_count_case(launcher.multistep, signed, dtype) == {"kernel": 1}


@pytest.mark.parametrize("signed", [False, True])
def test_launcher_fallback_takes_a_uint8_count(signed):
    """float64 state goes to the torch backend (no GPU, no CuPy needed): a uint8 count works there too, as a
    float64 one does."""
    from snnconv.runtime import cupy_backend, torch_backend

    x, v, theta, count, kw, _ = _count_case(signed, torch.uint8, torch.float64)
    results = []
    for fn, c in ((torch_backend.multistep, count.double()), (cupy_backend.multistep, count.clone())):
        out, vv, calls = torch.empty(6, *v.shape, dtype=v.dtype), v.clone(), {}
        fn(x, vv, theta, out=out, count=c, calls=calls, signed=signed, **kw)
        assert calls == {"torch": 1}
        results.append((out, vv, c))
    (out, vv, c), (got_out, got_v, got_c) = results
    assert got_c.dtype == torch.uint8 and torch.equal(got_c.double(), c)
    assert torch.equal(got_out, out) and torch.equal(got_v, vv) and (c != count.double()).any()


@pytest.mark.parametrize("backend", ["torch", "cupy"])
def test_counts_refused_in_one_line(backend):
    """A count no number fits (bool, complex) and integer counts that would wrap around: one-line errors naming
    the dtype."""
    from snnconv.runtime import cupy_backend, torch_backend

    multistep = torch_backend.multistep if backend == "torch" else cupy_backend.multistep
    x, v, theta, _, kw, _ = _count_case(True, torch.float64, torch.float64)  # float64: no kernel launch
    for bad in (torch.zeros(v.shape, dtype=torch.bool), torch.zeros(v.shape, dtype=torch.complex64)):
        with pytest.raises(TypeError) as info:
            multistep(x, v.clone(), theta, out=torch.empty(6, *v.shape, dtype=v.dtype), count=bad, **kw)
        assert str(bad.dtype) in str(info.value) and "\n" not in str(info.value)
    full = torch.full(v.shape, 254, dtype=torch.uint8)  # 6 more steps of spikes do not fit
    with pytest.raises(snnconv.ConversionError, match=r"^[^\n]*torch\.uint8$"):
        multistep(torch.ones_like(x), v.clone(), theta, out=torch.empty(6, *v.shape, dtype=v.dtype), count=full, **kw)


def _converted_net(seed=0):
    from nets import ResCatNet, randomize_bn

    torch.manual_seed(seed)
    ann = randomize_bn(ResCatNet())
    calib = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return convert_binary(ann, T=6, calib=calib, backend="torch"), calib


def test_converted_net_runs_every_neuron_on_the_kernel(launcher, monkeypatch):
    """A CPU conversion (channels-last pass on) driven through the launcher: the same spikes as the torch
    backend, 100% of neuron calls on the kernel, channels-last activations among them without a copy."""
    from nets import record_spikes

    snn, x = _converted_net()
    want, want_spikes = record_spikes(snn, lambda: snn(x, per_step=True))
    assert sum(n.calls["torch"] for n in snn.neurons().values()) > 0
    for n in snn.neurons().values():
        n.calls.update(kernel=0, torch=0)
    from snnconv.runtime import modules

    monkeypatch.setattr(modules, "get_backend", lambda name, device: launcher.multistep)
    got, got_spikes = record_spikes(snn, lambda: snn(x, per_step=True))
    assert torch.equal(got, want)
    for name in want_spikes:
        assert torch.equal(got_spikes[name], want_spikes[name]), name
    calls = [n.calls for n in snn.neurons().values()]
    assert all(c["torch"] == 0 and c["kernel"] == 1 for c in calls)
    assert any(rec["inner"] == 1 and rec["C"] > 1 for rec in launcher.cp.RawModule.launches)  # channels-last

    # step mode 's' with the input's memory format changing between calls: still the reference's spikes
    snn.step_mode = "s"
    snn.reset()
    steps = [snn(x if t % 2 == 0 else x.contiguous(memory_format=CL)) for t in range(snn.T)]
    snn.step_mode = "m"
    assert torch.equal(torch.stack(steps), want)
    assert all(n.calls["torch"] == 0 for n in snn.neurons().values())


def test_converted_signed_net_runs_on_the_kernel(launcher, monkeypatch):
    """A signed conversion (the default) driven through the launcher: bit for bit the torch backend's
    spikes and outputs, in 'm' and in 's' step mode (the net count carried between calls), every neuron
    call on the kernel, negative spikes among them."""
    from nets import ResCatNet, randomize_bn, record_spikes

    from snnconv.runtime import modules

    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    snn = snnconv.convert(randomize_bn(ResCatNet()), T=6, calib=x, signed_spikes=True, backend="torch")
    want, want_spikes = record_spikes(snn, lambda: snn(x, per_step=True))
    assert sum(bool((s < 0).any()) for s in want_spikes.values()) >= 2
    for n in snn.neurons().values():
        n.calls.update(kernel=0, torch=0)
    monkeypatch.setattr(modules, "get_backend", lambda name, device: launcher.multistep)
    got, got_spikes = record_spikes(snn, lambda: snn(x, per_step=True))
    assert torch.equal(got, want)
    for name in want_spikes:
        assert torch.equal(got_spikes[name], want_spikes[name]), name
    assert all(n.calls == {"kernel": 1, "cpu": 0, "torch": 0} for n in snn.neurons().values())
    assert all("true>" in rec["name"] for rec in launcher.cp.RawModule.launches)  # the signed variants
    snn.step_mode = "s"
    snn.reset()
    steps = [snn(x) for _ in range(snn.T)]
    snn.step_mode = "m"
    assert torch.equal(torch.stack(steps), want)


def test_run_report_and_inspect_give_the_kernel_share(launcher, monkeypatch):
    """`snnconv run` (snnconv.evaluate) and `inspect` count each neuron's calls: kernel vs torch backend."""
    from snnconv.evaluate import evaluate
    from snnconv.runtime import modules
    from snnconv.stats import format_report

    snn, x = _converted_net(seed=1)
    y = torch.zeros(len(x), dtype=torch.long)
    n = len(snn.neurons())
    r = evaluate(snn, x, y, batch=8, progress=False, device="cpu")  # torch backend on the CPU
    assert f"neuron calls on the fused CUDA kernel: 0 of {2 * n} (0%) on cpu" in format_report(r)
    monkeypatch.setattr(modules, "get_backend", lambda name, device: launcher.multistep)
    r = evaluate(snn, x, y, batch=8, progress=False, device="cpu")
    assert f"neuron calls on the fused CUDA kernel: {2 * n} of {2 * n} (100%)" in format_report(r)
    assert r["neuron_calls"] == {name: {"kernel": 2, "cpu": 0, "torch": 0} for name in snn.neurons()}
    table = snnconv.inspect(snn).split("== final graph ==")[1]
    assert sum(" 2/2 " in line for line in table.splitlines()) == n
