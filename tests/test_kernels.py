"""The CUDA neuron kernel without a GPU: every variant compiles to PTX (sm_80, sm_90), and the same source,
built for the host through host_shim.h, matches the torch backend exactly on awkward sizes."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
import torch

from snnconv.runtime import kernel_source as ks
from snnconv.runtime import torch_backend

VARIANTS = ks.all_variants()


def _has_nvrtc() -> bool:
    try:
        import nvidia.cuda_nvrtc  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("compiler", ["nvcc", "nvrtc"])
def test_every_variant_compiles_to_ptx(arch, compiler):
    if compiler == "nvcc":
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc not on PATH")
        ptx = ks.ptx_with_nvcc(arch)
    else:
        if not _has_nvrtc():
            pytest.skip("nvidia-cuda-nvrtc-cu12 not installed")
        ptx = ks.ptx_with_nvrtc(arch)
    assert ptx.count(".entry") == len(VARIANTS) == 96
    assert f".target {arch}" in ptx
    assert "cvt.rn.f16.f32" in ptx  # float16 stores round to nearest even
    assert ".local" not in ptx  # the membrane lives in registers, nothing spills


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    d = tmp_path_factory.mktemp("host")
    (d / "lib.cpp").write_text(ks.host_library_source())
    subprocess.run(
        [
            "g++",
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-ffp-contract=off",
            "-I",
            str(ks.KERNEL_DIR),
            "-o",
            str(d / "lib.so"),
            str(d / "lib.cpp"),
        ],
        check=True,
    )
    return ctypes.CDLL(str(d / "lib.so"))


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _run_host(lib, index, x, v, th, steps, count, v_reset, decay, out):
    M, C = v.numel(), th.numel()
    inner = M // (v.shape[0] * C) if C > 1 else 1
    assert VARIANTS[index][1] == 1 or M % VARIANTS[index][1] == 0
    fn = getattr(lib, f"snn_host_{index}")
    fn(
        _ptr(x),
        _ptr(out),
        _ptr(v),
        _ptr(th),
        _ptr(count) if count is not None else None,
        ctypes.c_longlong(M),
        ctypes.c_int(steps),
        ctypes.c_int(C),
        ctypes.c_longlong(inner),
        ctypes.c_float(v_reset),
        ctypes.c_float(decay),
        ctypes.c_int(256),
    )


@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[ks.name(*v) for v in VARIANTS])
def test_host_run_matches_torch_backend(host_lib, index):
    dtype_name, vec, static, soft, leak, count = VARIANTS[index]
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(index)
    shapes = (
        [(1, (3, 5, 7, 11), False), (7, (2, 3, 13, 9), True), (16, (1001,), False)]
        if vec == 1
        else [(1, (4, 5, 7, 8), False), (7, (2, 3, 13, 4), True), (16, (1000,), False)]
    )  # vec 4 needs M % 4 == 0
    for steps, shape, per_channel in shapes:
        theta = (torch.rand(shape[1], generator=g) * 0.8 + 0.2) if per_channel else torch.tensor(0.45)
        th_b = theta.view(-1, *([1] * (len(shape) - 2))) if per_channel else theta
        x = (torch.rand((steps, *shape), generator=g) * 1.2 - 0.2).to(dtype)
        x_in = x[0].contiguous() if static else x
        v0 = (0.5 * th_b).expand(shape).contiguous().float() + torch.rand(shape, generator=g) * 0.1
        decay = 0.8 if leak else 1.0
        ref_v, ref_out = v0.clone(), torch.empty((steps, *shape), dtype=dtype)
        torch_backend.multistep(
            x_in, ref_v, th_b, steps=steps, static=static, soft_reset=soft, v_reset=0.05, decay=decay, out=ref_out
        )
        v, out = v0.clone(), torch.full((steps, *shape), 7.0, dtype=dtype)  # poisoned: every element is written
        cnt = torch.full(shape, 2.0) if count else None
        _run_host(host_lib, index, x_in, v, theta.contiguous(), steps, cnt, 0.05, decay, out)
        assert torch.equal(out, ref_out), f"steps={steps} shape={shape}"
        assert torch.equal(v, ref_v)
        if count:
            assert torch.equal(cnt, 2.0 + (ref_out != 0).sum(0).float())
        assert 0 < (ref_out != 0).float().mean() < 1  # both spikes and silences were exercised


def test_host_half_conversion_matches_torch(host_lib):
    """The shim's float16 rounding (used only on the host) agrees with torch's on tricky values."""
    x = torch.cat([torch.randn(100000) * 10, torch.tensor([65504.0, 65520.0, 1e-8, 6e-8, 2.0**-24, 0.0, -0.0])])
    expected = x.half()
    idx = VARIANTS.index(("float16", 1, False, True, False, False))
    # a firing neuron stores its threshold: with v = +inf every neuron fires, and per-channel thresholds
    # (M = C = n, inner = 1) make the stored outputs the float16 roundings of x
    th = x.contiguous()
    n = th.numel()
    v = torch.full((1, n), float("inf"))
    out = torch.empty((1, 1, n), dtype=torch.float16)
    xin = torch.zeros((1, 1, n), dtype=torch.float16)
    _run_host(host_lib, idx, xin, v, th, 1, None, 0.0, 1.0, out)
    got = out.view(-1)
    assert torch.equal(got[torch.isfinite(expected)], expected[torch.isfinite(expected)])
    assert np.array_equal(torch.isinf(got).numpy(), torch.isinf(expected).numpy())
