"""On a CUDA device (skipped cleanly elsewhere): the CuPy kernels against the torch backend, in every layout
the passes produce, on the caller's stream (stream synchronisation only, never the whole device)."""

import functools

import pytest
import torch
import torch.nn as nn

import snnconv
from snnconv.runtime import kernel_source as ks
from snnconv.runtime import torch_backend

# binary spikes (what the int8 layers, the CUDA kernel and NIR take) and no bias calibration: fitted by
# each conversion's own SNN run, biases would differ between the paths these tests compare bit for bit
convert_binary = functools.partial(snnconv.convert, signed_spikes=False, bias_calibration=False)


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
    """Shapes with M % 4 == 0 take the 4-wide kernels, the others the scalar ones; signed variants against
    torch_backend.multistep(signed=True), net counts starting at 0 or 1."""
    cupy_backend = _cupy()
    dtype_name, _, static, soft, leak, count, signed = variant
    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cuda").manual_seed(3)
    negatives = 0
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
        net0 = torch.randint(0, 2, shape, device="cuda", generator=g).float()
        ref_net = net0.clone()
        if signed:
            dyn = dict(steps=steps, static=static, soft_reset=True, v_reset=0.0, decay=decay)
            torch_backend.multistep(x_in, ref_v, th_b, out=ref_out, count=ref_net, signed=True, **dyn)
        else:
            torch_backend.multistep(
                x_in, ref_v, th_b, steps=steps, static=static, soft_reset=soft, v_reset=0.05, decay=decay, out=ref_out
            )
        v, out = v0.clone(), torch.full((steps, *shape), 7.0, dtype=dtype, device="cuda")
        cnt = (net0.clone() if signed else torch.zeros(shape, device="cuda")) if count else None
        cupy_backend.multistep(
            x_in,
            v,
            th_b,
            steps=steps,
            static=static,
            soft_reset=soft,
            v_reset=0.05,
            decay=decay,
            out=out,
            count=cnt,
            signed=signed,
        )
        torch.cuda.current_stream().synchronize()
        assert torch.equal(out, ref_out) and torch.equal(v, ref_v)
        if signed:
            assert torch.equal(cnt, ref_net)
            negatives += int((ref_out < 0).sum())
        elif count:
            assert torch.equal(cnt, (ref_out != 0).sum(0).float())
    assert negatives > 0 or not signed


def _layout(t, kind, lead=0):
    if kind == "nchw":
        return t.contiguous()
    if kind == "cl":
        return (t.flatten(0, lead) if lead else t).contiguous(memory_format=torch.channels_last).view(t.shape)
    if kind == "offset":  # one element off a 16-byte boundary
        return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)
    return torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)[..., ::2].copy_(t)


@cuda
@pytest.mark.parametrize(
    "kinds",
    [
        ("cl", "cl", "cl"),
        ("nchw", "cl", "cl"),
        ("cl", "nchw", "nchw"),
        ("nchw", "nchw", "cl"),
        ("strided", "strided", "strided"),
        ("offset", "nchw", "offset"),
        ("nchw", "nchw", "offset"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cupy_layouts_on_device(kinds, dtype):
    """x, v, out in every layout mix (channels-last, strided, misaligned): the torch backend's values, in the
    caller's tensors, with per-channel thresholds whose channel boundaries fall inside 4-wide groups."""
    cupy_backend = _cupy()
    g = torch.Generator(device="cuda").manual_seed(5)
    steps, shape = 4, (4, 6, 5, 3)
    theta = (torch.randint(1, 5, (6,), device="cuda", generator=g) / 4).view(-1, 1, 1)
    x = (torch.randint(-2, 11, (steps, *shape), device="cuda", generator=g) / 8).to(dtype)  # ties on theta
    v0 = (0.5 * theta).expand(shape).contiguous()
    ref_v, ref_out = v0.clone(), torch.empty((steps, *shape), dtype=dtype, device="cuda")
    kw = dict(steps=steps, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    torch_backend.multistep(x, ref_v, theta, out=ref_out, **kw)
    kx, kv, ko = kinds
    xk, v = _layout(x, kx, 1), _layout(v0, kv)
    out = _layout(torch.full_like(ref_out, 7.0), ko, 1)
    calls = {}
    cupy_backend.multistep(xk, v, theta, out=out, calls=calls, **kw)
    torch.cuda.current_stream().synchronize()
    assert calls == {"kernel": 1}
    assert torch.equal(out, ref_out) and torch.equal(v, ref_v)


@cuda
def test_cupy_runs_on_the_callers_stream():
    """The input is written on a side stream after a long sleep; a launch on any other stream would read it
    before it is there. Only that stream is synchronised."""
    cupy_backend = _cupy()
    n, steps = 1 << 20, 4
    x = torch.zeros(steps, n, device="cuda")
    v, out, th = torch.zeros(n, device="cuda"), torch.empty(steps, n, device="cuda"), torch.tensor(1.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time
        x.fill_(1.0)
        cupy_backend.multistep(x, v, th, out=out, steps=steps, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
        empty = torch.empty(steps, 0, 3, device="cuda")
        cupy_backend.multistep(  # 0 neurons: returns at once, nothing launched (a 0-block grid would fail)
            empty, torch.zeros(0, 3, device="cuda"), th, out=torch.empty_like(empty), steps=steps, static=False,
            soft_reset=True, v_reset=0.0, decay=1.0,
        )  # fmt: skip
    side.synchronize()
    assert torch.equal(out, torch.ones_like(out)) and torch.equal(v, torch.zeros_like(v))


@cuda
def test_cpu_conversion_moved_to_cuda_runs_every_neuron_on_the_kernel():
    """Converted on the CPU (channels-last pass on), then moved: 100% of neuron calls on the kernel, the same
    outputs as the torch backend on the device; `snnconv.evaluate` reports the same share."""
    _cupy()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from nets import ResCatNet, randomize_bn

    from snnconv.evaluate import evaluate
    from snnconv.stats import format_report

    ann = randomize_bn(ResCatNet())
    x = torch.rand(32, 3, 16, 16)
    snn = convert_binary(ann, T=8, calib=x).to("cuda")
    assert "_to_channels_last" in snn.graph_module.code  # the CPU-chosen layout plan is in the graph
    y = snn(x.cuda(), per_step=True)
    calls = [n.calls for n in snn.neurons().values()]
    assert all(c["torch"] == 0 and c["kernel"] > 0 for c in calls), calls
    snn.settings.backend = "torch"
    assert torch.equal(snn(x.cuda(), per_step=True), y)
    snn.settings.backend = "auto"
    r = evaluate(snn, x, torch.zeros(32, dtype=torch.long), batch=16, progress=False, device="cuda")
    assert all(c["torch"] == 0 for c in r["neuron_calls"].values())
    assert "(100%)" in format_report(r)


@cuda
def test_converted_cnn_same_on_both_backends():
    _cupy()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from nets import ResCatNet, randomize_bn

    ann = randomize_bn(ResCatNet()).cuda()
    x = torch.rand(32, 3, 16, 16, device="cuda")
    snn = convert_binary(ann, T=16, calib=x, backend="torch")
    y_torch = snn(x, per_step=True)
    snn.settings.backend = "cupy"
    y_cupy = snn(x, per_step=True)
    assert torch.equal(y_torch, y_cupy)
    assert torch.allclose(snn(x), ann(x), atol=0.3 * ann(x).abs().max().item())


def test_cupy_request_without_cuda_explains():
    snn = convert_binary(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), T=2, calib=torch.randn(8, 4), backend="cupy")
    with pytest.raises(snnconv.ConversionError, match=r"CUDA tensors only|cannot run here"):
        snn(torch.randn(2, 4))
