"""On a CUDA device (skipped cleanly elsewhere): the CuPy kernels against the torch backend."""

import pytest
import torch
import torch.nn as nn

import snnconv
from snnconv.runtime import kernel_source as ks
from snnconv.runtime import torch_backend

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _cupy():
    cupy_backend = pytest.importorskip("snnconv.runtime.cupy_backend")
    try:
        cupy_backend.check_available()
    except Exception as exc:
        pytest.skip(f"CuPy cannot run here: {exc}")
    return cupy_backend


@cuda
@pytest.mark.parametrize("variant", [v for v in ks.all_variants() if v[1] == 1], ids=lambda v: ks.name(*v))
def test_cupy_matches_torch_backend_on_device(variant):
    """Shapes with M % 4 == 0 take the 4-wide kernels, the others the scalar ones."""
    cupy_backend = _cupy()
    dtype_name, _, static, soft, leak, count = variant
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(3)
    for steps, shape, per_channel in [
        (1, (3, 5, 7, 11), False),
        (8, (4, 16, 9, 9), True),
        (5, (100003,), False),
        (3, (4, 8, 6, 6), True),
        (6, (1 << 16,), False),
    ]:
        theta = (
            (torch.rand(shape[1], device="cuda", generator=g) * 0.8 + 0.2)
            if per_channel
            else torch.tensor(0.45, device="cuda")
        )
        th_b = theta.view(-1, *([1] * (len(shape) - 2))) if per_channel else theta
        x = (torch.rand((steps, *shape), device="cuda", generator=g) * 1.2 - 0.2).to(dtype)
        x_in = x[0] if static else x
        v0 = (0.5 * th_b).expand(shape).contiguous().float()
        decay = 0.8 if leak else 1.0
        ref_v, ref_out = v0.clone(), torch.empty((steps, *shape), dtype=dtype, device="cuda")
        torch_backend.multistep(
            x_in, ref_v, th_b, steps=steps, static=static, soft_reset=soft, v_reset=0.05, decay=decay, out=ref_out
        )
        v, out = v0.clone(), torch.full((steps, *shape), 7.0, dtype=dtype, device="cuda")
        cnt = torch.zeros(shape, device="cuda") if count else None
        cupy_backend.multistep(
            x_in, v, th_b, steps=steps, static=static, soft_reset=soft, v_reset=0.05, decay=decay, out=out, count=cnt
        )
        torch.cuda.synchronize()
        assert torch.equal(out, ref_out) and torch.equal(v, ref_v)
        if count:
            assert torch.equal(cnt, (ref_out != 0).sum(0).float())


@cuda
def test_converted_cnn_same_on_both_backends():
    _cupy()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from nets import ResCatNet, randomize_bn

    ann = randomize_bn(ResCatNet()).cuda()
    x = torch.rand(32, 3, 16, 16, device="cuda")
    snn = snnconv.convert(ann, T=16, calib=x, backend="torch")
    y_torch = snn(x, per_step=True)
    snn.settings.backend = "cupy"
    y_cupy = snn(x, per_step=True)
    assert torch.equal(y_torch, y_cupy)
    assert torch.allclose(snn(x), ann(x), atol=0.3 * ann(x).abs().max().item())


def test_cupy_request_without_cuda_explains():
    snn = snnconv.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), T=2, calib=torch.randn(8, 4), backend="cupy")
    with pytest.raises(snnconv.ConversionError, match=r"CUDA tensors only|cannot run here"):
        snn(torch.randn(2, 4))
