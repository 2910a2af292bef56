"""The fused CPU neuron kernel (runtime/cpu_kernel.py) against the torch backend, bit for bit: every variant
of the dynamics, both layouts, the thread split, the uint8 int8-layer input it writes, and whole converted
networks with the kernel on and off."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
from nets import ResCatNet, randomize_bn

import snnconv
from snnconv import config
from snnconv.runtime import cpu_kernel
from snnconv.runtime import integer_spikes as int8
from snnconv.runtime import torch_backend as tb

pytestmark = pytest.mark.skipif(cpu_kernel.why_not() is not None, reason=f"no CPU kernel: {cpu_kernel.why_not()}")

VARIANTS = [
    v
    for v in itertools.product(*[[False, True]] * 2, [1.0, 0.5], [True, False], *[[False, True]] * 3)
    if not (v[0] and not v[3])  # signed spikes reset softly only
]


def _case(signed, static, decay, soft, channels_last, per_channel, bias, seed=0, T=5, shape=(3, 4, 5, 6), grid=False):
    """grid: every value a multiple of 1/8, so sums are exact and land on the threshold (ties) and on 0 often."""
    g = torch.Generator().manual_seed(seed)
    snap = (lambda t: torch.round(t * 8) / 8) if grid else (lambda t: t)
    N, C = shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = snap(torch.rand(N if static else T * N, *shape[1:], generator=g) * 2 - 0.5).contiguous(memory_format=fmt)
    theta = snap(torch.rand(C, generator=g) + 0.5).view(-1, 1, 1) if per_channel else torch.tensor(0.75)
    b = snap(torch.rand(C, generator=g) - 0.5).view(-1, 1, 1) if bias else None
    v0 = snap(torch.rand(shape, generator=g) * theta).contiguous(memory_format=fmt)
    count0 = torch.randint(0, 3, shape, generator=g).float().contiguous(memory_format=fmt) if signed else None
    dyn = dict(steps=T, static=static, soft_reset=soft, v_reset=-0.1, decay=decay)
    return x, theta, b, v0, count0, dyn, fmt


def _reference(x, theta, b, v0, count0, dyn, fmt):
    """The torch backend, the bias added first as the neuron module does."""
    T, static = dyn["steps"], dyn["static"]
    v = v0.clone()
    count = None if count0 is None else count0.clone()
    out = torch.empty((T * v.shape[0], *v.shape[1:]), memory_format=fmt).view(T, *v.shape)
    xb = x if b is None else x + b
    xb = xb if static else xb.reshape(T, *v.shape)
    if count is None:
        tb.multistep(xb, v, theta, out=out, **dyn)
    else:
        tb.multistep(xb, v, theta, out=out, count=count, signed=True, **dyn)
    return out, v, count


def _fused(x, theta, b, v0, count0, dyn, fmt, code=None, residual=None):
    T, static = dyn["steps"], dyn["static"]
    v = v0.clone()
    count = None if count0 is None else count0.clone()
    out = torch.empty((T * v.shape[0], *v.shape[1:]), memory_format=fmt).view(T, *v.shape)
    xin = x if static else x.view(T, *v.shape)
    kw = dict(code=code, residual=residual)
    assert cpu_kernel.multistep(xin, v, theta, out=out, count=count, bias=b, **kw, **dyn)
    return out, v, count


@pytest.mark.parametrize("grid", [False, True], ids=["rounding", "ties"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(int(f)) for f in v))
def test_kernel_equals_the_torch_backend_bitwise(variant, grid):
    """Signed or not, static input or not, IF or LIF, soft or hard reset, layout, per-channel threshold, bias;
    values that round, and values on a grid that hit the threshold and zero exactly."""
    signed, static, decay, soft, cl, per_channel, bias = variant
    case = _case(signed, static, decay, soft, cl, per_channel, bias, grid=grid)
    ref, fused = _reference(*case), _fused(*case)
    assert (ref[0] != 0).any() and (ref[0] == 0).any()  # the case fires, and not everywhere
    for a, b in zip(ref, fused):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("signed", [False, True])
def test_first_steps_start_from_v0_and_last_steps_leave_the_state_unwritten(signed):
    """v0: the kernel starts every membrane from v0 * theta and the count from zero without reading v or count
    (they hold garbage here) and equals the torch backend started from filled ones; store=False computes the same
    spikes and leaves v and count as they were."""
    x, theta, b, _, _, dyn, fmt = _case(signed, False, 1.0, True, True, True, True, seed=3)
    start = (0.5 * theta).expand(3, 4, 5, 6).contiguous(memory_format=fmt)  # _case's shape
    zeros = torch.zeros_like(start) if signed else None
    ref_out, ref_v, ref_count = _reference(x, theta, b, start, zeros, dyn, fmt)
    garbage = torch.full_like(start, float("nan"))
    v, count = garbage.clone(), garbage.clone() if signed else None
    out = torch.empty_like(ref_out)
    xin = x.view(dyn["steps"], *v.shape)
    assert cpu_kernel.multistep(xin, v, theta, out=out, count=count, bias=b, v0=0.5 * theta, **dyn)
    assert (ref_out != 0).any() and torch.equal(out, ref_out) and torch.equal(v, ref_v)
    assert not signed or torch.equal(count, ref_count)
    v, count, out = start.clone(), zeros.clone() if signed else None, torch.empty_like(ref_out)
    assert cpu_kernel.multistep(xin, v, theta, out=out, count=count, bias=b, store=False, **dyn)
    assert torch.equal(out, ref_out) and torch.equal(v, start)
    assert not signed or torch.equal(count, zeros)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_residual_is_added_first_bitwise(signed, bias):
    """A residual (passes/residual_into_neuron.py): the kernel computes (x + r) + bias, the torch path's order after
    the graph's add; a static input or a residual in another layout is declined (the neuron adds it then)."""
    x, theta, b, v0, count0, dyn, fmt = _case(signed, False, 1.0, True, True, True, bias, seed=5)
    r = (torch.rand(x.shape, generator=torch.Generator().manual_seed(6)) - 0.5).contiguous(memory_format=fmt)
    ref = _reference(x + r, theta, b, v0, count0, dyn, fmt)
    v, count = v0.clone(), None if count0 is None else count0.clone()
    out = torch.empty_like(ref[0])
    steps = dyn["steps"]
    xin, rin = x.view(steps, *v.shape), r.view(steps, *v.shape)
    assert cpu_kernel.multistep(xin, v, theta, out=out, count=count, bias=b, residual=rin, **dyn)
    assert (ref[0] != 0).any() and not torch.equal(ref[0], _reference(x, theta, b, v0, count0, dyn, fmt)[0])
    for want, got in zip(ref, (out, v, count)):
        assert (want is None and got is None) or torch.equal(want, got)
    nchw = r.contiguous().view(steps, *v.shape)
    assert not cpu_kernel.multistep(xin, v, theta, out=out, count=count, residual=nchw, **dyn)
    assert not cpu_kernel.multistep(xin[0], v, theta, out=out, count=count, residual=rin, **{**dyn, "static": True})


@pytest.mark.parametrize("channels", [64, 80, 128])
@pytest.mark.parametrize("signed", [False, True])
def test_wide_channels_last_rows_read_one_pixel_of_values(signed, channels):
    """Channels-last maps of 64 channels or more: thresholds, biases and starting membranes go in as one pixel's
    values (they repeat every C neurons) and blocks stop at each pixel's end (C = 80: blocks of 64 and 16); the
    same spikes as the torch backend."""
    case = _case(signed, False, 1.0, True, True, True, True, seed=4, shape=(2, channels, 3, 5))
    ref, fused = _reference(*case), _fused(*case)
    assert (ref[0] != 0).any() and (ref[0] == 0).any()
    for a, b in zip(ref, fused):
        assert (a is None and b is None) or torch.equal(a, b)
    x, theta, bias, v0, count0, dyn, fmt = case  # and started from v0 * theta in the kernel
    start = (0.5 * theta).expand(v0.shape).contiguous(memory_format=fmt)
    ref = _reference(x, theta, bias, start, None if count0 is None else torch.zeros_like(count0), dyn, fmt)
    v, count = torch.full_like(v0, float("nan")), None if count0 is None else torch.full_like(count0, float("nan"))
    out = torch.empty_like(ref[0])
    xin = x.view(dyn["steps"], *v.shape)
    assert cpu_kernel.multistep(xin, v, theta, out=out, count=count, bias=bias, v0=0.5 * theta, **dyn)
    assert torch.equal(out, ref[0]) and torch.equal(v, ref[1])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_uint8_net_count_equals_the_float_count(static, channels_last):
    """Signed spikes with the net count held as uint8 (calls of at most 255 steps): the same spikes, membranes and
    counts as the torch backend's float count, read back and stored, with and without a first-steps start."""
    x, theta, b, v0, count0, dyn, fmt = _case(True, static, 1.0, True, channels_last, True, True, seed=6, T=9)
    ref = _reference(x, theta, b, v0, count0, dyn, fmt)
    v, count = v0.clone(), count0.to(torch.uint8)
    out = torch.empty_like(ref[0])
    xin = x if static else x.view(9, *v.shape)
    assert cpu_kernel.multistep(xin, v, theta, out=out, count=count, bias=b, **dyn)
    assert count.dtype == torch.uint8 and (ref[2] > 2).any()  # counts rose past their start
    assert torch.equal(out, ref[0]) and torch.equal(v, ref[1]) and torch.equal(count.float(), ref[2])


@pytest.mark.parametrize("T", [8, 300])
def test_calls_hold_the_net_count_as_uint8_only_when_it_fits(monkeypatch, T):
    """A call of T <= 255 steps gives the kernel uint8 counts, a longer one float32 counts, streaming (step by
    step, no bound) float32 too; every way equal to the torch backend."""
    monkeypatch.setenv(config.INT8.name, "vnni-emulated")
    calib, x = torch.rand(32, 3, 16, 16), torch.rand(4, 3, 16, 16)
    snn = snnconv.convert(_net(), T=T, calib=calib)
    seen, real = set(), cpu_kernel.multistep
    monkeypatch.setattr(cpu_kernel, "multistep", lambda *a, **k: seen.add(k["count"].dtype) or real(*a, **k))
    on = snn(x)
    assert seen == {torch.uint8 if T <= 255 else torch.float32}
    seen.clear()
    snn.step(x, snn.init_state(4))
    assert seen == {torch.float32}
    monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
    assert torch.equal(on, snn(x))


@pytest.mark.parametrize("channels", [4, 80])
def test_rows_follow_thresholds_and_biases_changed_in_place(channels):
    """The kernel's per-channel rows are made once per tensor and version: a threshold or bias changed in place
    (a new calibration, load_state_dict) is read at the next call, as the torch backend reads it."""
    case = _case(True, False, 1.0, True, True, True, True, seed=5, shape=(2, channels, 3, 5))
    theta, bias = case[1], case[2]
    for change in (
        lambda: None,
        lambda: theta.mul_(1.5),
        lambda: bias.add_(0.25),
        lambda: theta.copy_(bias.abs() + 0.1),
    ):
        change()
        ref, fused = _reference(*case), _fused(*case)
        assert (ref[0] != 0).any()
        for a, b in zip(ref, fused):
            assert torch.equal(a, b)


@pytest.mark.parametrize("channels", [4, 64, 80])
@pytest.mark.parametrize("interleave", [False, True])
def test_residual_read_from_a_neurons_code_is_its_float_spikes(interleave, channels):
    """A residual given as the uint8 code another neuron's kernel wrote ((u - shift) * its theta), its float tensor
    unwritten: the same spikes, membranes and counts as with that neuron's float spikes as the residual."""
    shape = (2, channels, 3, 5)
    src = _case(True, False, 1.0, True, True, True, False, seed=8, shape=shape)
    x, theta, b, v0, count0, dyn, fmt = _case(True, False, 1.0, True, True, True, True, seed=9, shape=shape)
    code = (
        torch.empty(dyn["steps"] * v0.numel() * (2 if interleave else 1), dtype=torch.uint8),
        channels,
        interleave,
        127,
    )
    spikes = _fused(*src, code=code)[0]  # the source neuron: float spikes and their code
    assert (spikes < 0).any() and (spikes > 0).any()
    want = _fused(x, theta, b, v0, count0, dyn, fmt, residual=spikes)
    v, count, out = v0.clone(), count0.clone(), torch.empty_like(want[0])
    r_code = (code[0], channels, interleave, src[1], 1)
    xin = x.view(dyn["steps"], *v.shape)
    unwritten = torch.full_like(spikes, float("nan"))  # the source neuron's float output: its layout, no values
    kw = dict(out=out, count=count, bias=b, residual=unwritten, residual_code=r_code)
    assert cpu_kernel.multistep(xin, v, theta, **kw, **dyn)
    assert torch.equal(out, want[0]) and torch.equal(v, want[1]) and torch.equal(count, want[2])
    # the code is in its neuron's memory order: a residual laid out otherwise (NCHW here) is declined
    other = torch.empty(spikes.shape)
    assert not cpu_kernel.multistep(xin, v0.clone(), theta, **{**kw, "residual": other}, **dyn)
    assert not cpu_kernel.multistep(xin, v0.clone(), theta, **{**kw, "residual": None}, **dyn)


@pytest.mark.parametrize("split", ["openmp", "pool"])
def test_threads_split_rows_without_changing_a_bit(split, monkeypatch):
    """Above the size where rows are split over threads, 1, 2 and 3 threads give the same bits: on torch's
    OpenMP threads (the kernel's own loop, where built with OpenMP) and on the Python thread pool."""
    (fn, par), (pool, pool_par) = cpu_kernel.KERNELS.get()
    if split == "openmp":
        assert (par is not None) == cpu_kernel.openmp()  # built with OpenMP where torch's runtime is loaded
        if par is None:
            pytest.skip("torch runs no libgomp here: the kernels split rows on the pool")
    on_omp = split == "openmp"
    kernels = cpu_kernel.Kernels((fn, par if on_omp else None), (pool, pool_par if on_omp else None))
    monkeypatch.setattr(cpu_kernel.KERNELS, "value", kernels)
    case = _case(True, False, 1.0, True, True, True, True, T=8, shape=(7, 16, 24, 24))
    ref = _reference(*case)
    x = torch.randn(8 * 7, 16, 24, 24, generator=torch.Generator().manual_seed(1))
    pool_ref = _pool_steps(x.contiguous(memory_format=torch.channels_last), "torch", 8, 2)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            fused = _fused(*case)
            assert all(torch.equal(a, b) for a, b in zip(ref, fused)), threads
            pooled = _pool_steps(x.contiguous(memory_format=torch.channels_last), "auto", 8, 2)
            assert torch.equal(pooled, pool_ref), threads
    finally:
        torch.set_num_threads(before)


def _pool_steps(x, backend, steps, kernel, chunks=None):
    """SpikeMaxPool over x [T * N, C, H, W] in one call on `backend`, its time chunks `chunks` (default: one)."""
    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import SpikeMaxPool

    pool = SpikeMaxPool({"kernel_size": kernel, "stride": kernel, "padding": 0, "dilation": 1, "ceil_mode": False}, 2)
    n, call, outs, t0 = x.shape[0] // steps, Call(input_static=False, backend=backend), [], 0
    for size in chunks or [steps]:
        call.steps = size
        with running(call):
            outs.append(pool(x[t0 * n : (t0 + size) * n]).clone())
        t0 += size
    return torch.cat(outs)


@pytest.mark.parametrize("kernel", [2, (2, 3), 3])
@pytest.mark.parametrize("chunks", [[7], [3, 1, 3]], ids=["whole", "chunked"])
def test_pool_kernel_equals_the_torch_path_bitwise(kernel, chunks, monkeypatch):
    """Spiking max pool (running sums, window maxima, increments) in one C pass against the torch path, bit for
    bit (a NaN propagating alike), and against float64 cumsum + max_pool2d; maps whose sides are not multiples of
    the window, the call carried over time chunks."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    x = torch.randn(7 * 2, 5, 8, 7, generator=g)
    x[3, 1, 2, 2] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    ran, kernel_call = [], cpu_kernel.pool_steps
    monkeypatch.setattr(cpu_kernel, "pool_steps", lambda *a: ran.append(kernel_call(*a)) or ran[-1])
    fused = _pool_steps(x, "auto", 7, kernel, chunks)
    assert ran == [True] * len(chunks)  # the kernel ran every chunk
    ref = _pool_steps(x, "torch", 7, kernel, chunks)
    assert fused.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, ref, rtol=0, atol=0, equal_nan=True)
    sums = x.double().unflatten(0, (7, 2)).cumsum(0).flatten(0, 1)
    pooled = F.max_pool2d(sums, kernel).unflatten(0, (7, 2))
    exact = torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1])).flatten(0, 1)
    torch.testing.assert_close(fused.double(), exact, rtol=0, atol=1e-5, equal_nan=True)
    assert fused.isnan().any()


def test_pool_kernel_declines_what_it_does_not_walk():
    k, x = (2, 2), torch.rand(4, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    acc = torch.zeros(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    last = torch.zeros(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    out = torch.empty(4, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    assert not cpu_kernel.pool_steps(x.contiguous(), acc, last, out, k)  # NCHW
    assert not cpu_kernel.pool_steps(x.double(), acc, last, out, k)
    assert not cpu_kernel.pool_steps(x, acc, last, out[:2], k)
    assert cpu_kernel.pool_steps(x, acc, last, out, k)


def test_kernel_declines_what_it_does_not_walk():
    x, theta, _, v0, _, dyn, _ = _case(False, False, 1.0, True, False, True, False)
    out = torch.empty((5 * 3, 4, 5, 6)).view(5, 3, 4, 5, 6)
    assert not cpu_kernel.multistep(x.double().view(5, 3, 4, 5, 6), v0.double(), theta, out=out.double(), **dyn)
    strided = torch.empty(5, 3, 4, 5, 12)[..., ::2]  # not dense
    assert not cpu_kernel.multistep(strided, v0.clone(), theta, out=out, **dyn)
    v = v0.clone()
    assert not cpu_kernel.multistep(x.view(5, 3, 4, 5, 6), v, theta, out=out.transpose(3, 4), **dyn)
    assert torch.equal(v, v0)  # declined before touching anything


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("group", ["channel", "row"])
def test_kernel_writes_the_int8_layers_input(signed, interleave, group):
    """The uint8 code beside the spikes is what the int8 layer would encode from them: u = s (+1 signed),
    in groups of C (a convolution's channels-last input) or of a whole row, [base * u, u] when interleaved."""
    case = _case(signed, False, 1.0, True, True, True, True, T=4, shape=(3, 5, 4, 6))
    v0 = case[3]
    T, (N, C, H, W) = 4, v0.shape
    base = 127 if signed else 255
    size = T * N * C * H * W * (2 if interleave else 1)
    code = torch.full((size,), 77, dtype=torch.uint8)
    g = C if group == "channel" else C * H * W
    out, _, _ = _fused(*case, code=(code, g, interleave, base))
    u = torch.empty(T * N, H, W, C, dtype=torch.uint8)
    int8._encode(out.reshape(T * N, C, H, W), u.permute(0, 3, 1, 2), signed)  # channels-last memory order
    groups = u.reshape(-1, g)
    expect = torch.cat([groups * base, groups], 1) if interleave else groups
    assert torch.equal(code.view(-1, g * (2 if interleave else 1)), expect)


def _net():
    torch.manual_seed(0)
    return randomize_bn(ResCatNet())


@pytest.mark.parametrize("mode", ["vnni-emulated", "binary-emulated", None])
@pytest.mark.parametrize("signed", [False, True])
def test_converted_net_is_the_same_with_the_kernel_on_and_off(monkeypatch, mode, signed):
    """A whole network (residual adds, cat, pooling, flatten-linear head), int8 layers in each layout
    (emulated: the same integers on every machine) reading the kernel's uint8 code, or float32 layers."""
    if mode:
        monkeypatch.setenv(config.INT8.name, mode)
    else:
        monkeypatch.setenv(config.INT8.name, "off")
    calib, x = torch.rand(32, 3, 16, 16), torch.rand(6, 3, 16, 16)
    snn = snnconv.convert(_net(), T=6, calib=calib, signed_spikes=signed, bias_calibration=False)
    layers = [m for m in snn.graph_module.modules() if isinstance(m, int8.SpikeLayer)]
    assert bool(layers) == bool(mode)
    neurons = snn.neurons().values()
    for n in neurons:
        n.calls.update(kernel=0, cpu=0, torch=0)
    with torch.no_grad():
        on = snn(x)
        assert all(n.calls == {"kernel": 0, "cpu": 1, "torch": 0} for n in neurons)  # none declined
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)  # the torch backend and in-layer encoding
        off = snn(x)
    assert torch.equal(on, off)
    assert all(n.calls == {"kernel": 0, "cpu": 1, "torch": 1} for n in neurons)
    assert any(n.int8_only for n in neurons) == bool(mode)  # these wrote only the int8 layers' input


def test_thresholds_changed_in_place_between_calls_are_read(monkeypatch):
    """Each neuron keeps its starting membrane (v_init * theta) and the kernel its rows while the threshold is
    unchanged; scaled in place between calls, the next call starts from the new one: equal to a copy's call on
    the torch backend."""
    monkeypatch.setenv(config.INT8.name, "vnni-emulated")
    calib, x = torch.rand(32, 3, 16, 16), torch.rand(6, 3, 16, 16)
    snn = snnconv.convert(_net(), T=6, calib=calib)
    before = snn(x)
    for n in snn.neurons().values():
        n.threshold.mul_(1.25)
    after = snn(x)
    fresh = copy.deepcopy(snn)  # a copy made after the change: its thresholds are new tensors, nothing kept
    monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
    assert torch.equal(after, fresh(x)) and not torch.equal(after, before)


def test_a_hook_sees_the_spikes_of_a_neuron_only_int8_layers_read(monkeypatch):
    """A neuron whose readers are all int8 layers skips its float spikes, unless a forward hook would see them:
    the hook gets this call's spikes, not what its reused buffer held before (another input's)."""
    monkeypatch.setenv(config.INT8.name, "vnni-emulated")
    g = torch.Generator().manual_seed(2)
    calib, x, other = (torch.rand(n, 3, 16, 16, generator=g) for n in (32, 6, 6))
    snn = snnconv.convert(_net(), T=6, calib=calib, bias_calibration=False)
    neuron = next(n for n in snn.neurons().values() if n.int8_only)
    kernel, seen = cpu_kernel.KERNELS.get(), []
    with torch.no_grad():
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
        snn(other)  # the torch backend fills the neuron's buffer with other's spikes
        handle = neuron.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", kernel)
        on = snn(x)
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
        off = snn(x)
        handle.remove()
    assert neuron.calls["cpu"] >= 1 and torch.equal(on, off)
    assert torch.equal(seen[0], seen[1]) and seen[0].abs().sum() > 0


@pytest.mark.parametrize("mode", ["vnni-emulated", "binary-emulated"])
def test_int8_layers_on_nchw_spikes_encode_for_themselves(monkeypatch, mode):
    """Without the channels_last pass the spikes are NCHW: a convolution's channels-last integer input is not
    their memory order, so the kernel writes no code for it and the layer encodes (same outputs either way)."""
    from snnconv import passes

    monkeypatch.setenv(config.INT8.name, mode)
    calib, x = torch.rand(32, 3, 16, 16), torch.rand(6, 3, 16, 16)
    chosen = sorted(passes.OPTIONAL - {"channels_last"})
    snn = snnconv.convert(_net(), T=4, calib=calib, passes=chosen, bias_calibration=False)
    assert any(isinstance(m, int8.SpikeLayer) for m in snn.graph_module.modules())
    with torch.no_grad():
        on = snn(x)
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
        assert torch.equal(on, snn(x))


def test_int8_layer_ignores_a_code_whose_spikes_were_changed():
    """The code is valid only for the spikes as the neuron wrote them: an in-place change (version counter)
    or another tensor makes the layer encode for itself."""
    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import Neuron
    from snnconv.settings import NeuronConfig

    neuron = Neuron(NeuronConfig(signed=True))
    neuron.threshold = torch.tensor(0.5)
    neuron.int8_readers.append((True, 127, True))
    x = torch.rand(2 * 3, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with running(Call(steps=2, input_static=False)):
        spikes = neuron(x)
        assert neuron.int8_input(spikes) is not None
        assert neuron.int8_input(spikes.clone()) is None
        spikes.add_(0)
        assert neuron.int8_input(spikes) is None
    assert neuron.int8_input(spikes) is None  # no call open


def test_bias_calibrated_default_conversion_agrees_with_the_torch_backend(monkeypatch):
    """The default conversion (signed spikes, bias calibration, threshold search): the kernel adds the
    calibrated bias itself."""
    calib, x = torch.rand(32, 3, 16, 16), torch.rand(6, 3, 16, 16)
    snn = snnconv.convert(_net(), T=4, calib=calib)
    assert any(n.bias is not None for n in snn.neurons().values())
    with torch.no_grad():
        on = snn(x)
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
        off = snn(x)
    assert torch.equal(on, off)


def test_linear_neurons_two_dimensional():
    """[N, F] neurons (an MLP) with per-feature thresholds: rows are samples, the width their features."""
    g = torch.Generator().manual_seed(3)
    T, N, F = 6, 5, 37
    x, theta = torch.randn(T * N, F, generator=g), torch.rand(F, generator=g) + 0.2
    v0 = 0.5 * theta.expand(N, F).contiguous()
    dyn = dict(steps=T, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    ref_v, ref = v0.clone(), torch.empty(T, N, F)
    tb.multistep(x.view(T, N, F), ref_v, theta, out=ref, **dyn)
    v, out = v0.clone(), torch.empty(T, N, F)
    assert cpu_kernel.multistep(x.view(T, N, F), v, theta, out=out, **dyn)
    assert torch.equal(out, ref) and torch.equal(v, ref_v)


def test_mlp_converts_the_same_either_way(monkeypatch):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10)).eval()
    snn = snnconv.convert(model, T=8, calib=torch.rand(64, 20))
    x = torch.rand(7, 20)
    with torch.no_grad():
        on = snn(x)
        monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
        assert torch.equal(on, snn(x))


def test_a_batch_of_one_runs_on_the_kernel(monkeypatch):
    """Size-1 dims carry arbitrary strides in torch (a batch of 1, channels-last): the kernel still takes them."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    snn = snnconv.convert(model.eval(), T=4, calib=torch.rand(16, 3, 8, 8), bias_calibration=False)
    neurons = list(snn.neurons().values())
    for n in neurons:
        n.calls.update(kernel=0, cpu=0, torch=0)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        y = snn(x)
    assert all(n.calls["cpu"] == 1 and n.calls["torch"] == 0 for n in neurons), [n.calls for n in neurons]
    monkeypatch.setattr(cpu_kernel.KERNELS, "value", None)
    with torch.no_grad():
        assert torch.equal(y, snn(x))  # the linear head read the kernel's code, a row of one sample
