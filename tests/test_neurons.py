"""Neuron dynamics against a plain float64 Python loop, one neuron at a time."""

import itertools
import math

import pytest
import torch

from snnconv.runtime import torch_backend


def reference(x, theta, kind, reset, v_init, tau, v_reset=0.0):
    """Charge, fire, reset for each neuron separately, in Python floats (float64)."""
    T, n = len(x), len(x[0])
    decay = 1.0 - 1.0 / tau if kind == "lif" else 1.0
    out = [[0.0] * n for _ in range(T)]
    for i in range(n):
        v = v_init * theta
        for t in range(T):
            h = decay * v + x[t][i]
            s = h >= theta
            out[t][i] = theta if s else 0.0
            v = (h - theta if reset == "soft" else v_reset) if s else h
    return out


@pytest.mark.parametrize("kind,reset", list(itertools.product(["if", "lif"], ["soft", "hard"])))
@pytest.mark.parametrize("static", [False, True])
def test_torch_backend_matches_float64_loop(kind, reset, static):
    # a fixed seed per case (hash() of strings changes from process to process)
    seed = 4 * ("if", "lif").index(kind) + 2 * ("soft", "hard").index(reset) + int(static)
    g = torch.Generator().manual_seed(seed)
    T, n, theta, v_init, tau = 13, 37, 0.7, 0.5, 2.5
    x = torch.rand(T, n, generator=g, dtype=torch.float64) * 1.6 - 0.3
    if static:
        x[:] = x[0]
    v = torch.full((n,), v_init * theta, dtype=torch.float64)
    out = torch.empty(T, n, dtype=torch.float64)
    decay = 1.0 - 1.0 / tau if kind == "lif" else 1.0
    torch_backend.multistep(
        x[0] if static else x,
        v,
        torch.tensor(theta, dtype=torch.float64),
        steps=T,
        static=static,
        soft_reset=reset == "soft",
        v_reset=0.0,
        decay=decay,
        out=out,
    )
    ref = reference(x.tolist(), theta, kind, reset, v_init, tau)
    assert out.tolist() == ref
    assert out.abs().sum() > 0 and (out == 0).any()  # the case exercises both firing and silence


def test_state_carries_over_between_calls():
    """Two calls of 5 and 8 steps equal one call of 13: what 's' mode and time chunks rely on."""
    x = torch.rand(13, 20, dtype=torch.float64)
    th = torch.tensor(0.4, dtype=torch.float64)
    kw = dict(static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    v1 = torch.full((20,), 0.2, dtype=torch.float64)
    full = torch_backend.multistep(x, v1, th, steps=13, out=torch.empty_like(x), **kw)
    v2 = torch.full((20,), 0.2, dtype=torch.float64)
    a = torch_backend.multistep(x[:5], v2, th, steps=5, out=torch.empty(5, 20, dtype=torch.float64), **kw)
    b = torch_backend.multistep(x[5:], v2, th, steps=8, out=torch.empty(8, 20, dtype=torch.float64), **kw)
    assert torch.equal(torch.cat([a, b]), full) and torch.equal(v1, v2)


def test_count_adds_each_neurons_spikes_and_signed_needs_it():
    """count= without signed: each neuron's spikes added to it (what the CUDA kernel's callers read), the
    dynamics unchanged; signed spikes without their net count, or with hard reset, are refused."""
    x = torch.rand(9, 30, dtype=torch.float64)
    th = torch.tensor(0.35, dtype=torch.float64)
    kw = dict(steps=9, static=False, soft_reset=False, v_reset=0.0, decay=1.0)
    v1, v2 = torch.full((30,), 0.1, dtype=torch.float64), torch.full((30,), 0.1, dtype=torch.float64)
    count = torch.full((30,), 2.0, dtype=torch.float64)
    plain = torch_backend.multistep(x, v1, th, out=torch.empty_like(x), **kw)
    counted = torch_backend.multistep(x, v2, th, out=torch.empty_like(x), count=count, **kw)
    assert torch.equal(plain, counted) and torch.equal(v1, v2)
    assert torch.equal(count, 2 + (plain != 0).sum(0).double()) and count.max() > 3
    with pytest.raises(ValueError, match="soft reset"):
        torch_backend.multistep(x, v1, th, out=torch.empty_like(x), signed=True, **{**kw, "soft_reset": True})
    with pytest.raises(ValueError, match="soft reset"):
        torch_backend.multistep(x, v1, th, out=torch.empty_like(x), count=count, signed=True, **kw)


def test_per_channel_threshold_matches_loop():
    x = torch.rand(6, 2, 3, 4, dtype=torch.float64)
    th = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    v = (0.5 * th).view(3, 1).expand(2, 3, 4).contiguous()
    out = torch_backend.multistep(
        x, v, th.view(3, 1), steps=6, static=False, soft_reset=True, v_reset=0.0, decay=1.0, out=torch.empty_like(x)
    )
    for c in range(3):
        ref = reference(x[:, :, c].reshape(6, -1).tolist(), th[c].item(), "if", "soft", 0.5, 2.0)
        assert out[:, :, c].reshape(6, -1).tolist() == ref


def test_half_input_keeps_float32_state():
    x = torch.rand(9, 50).half()
    th = torch.tensor(0.3)
    v = torch.full((50,), 0.15)
    out = torch_backend.multistep(
        x, v, th, steps=9, static=False, soft_reset=True, v_reset=0.0, decay=1.0, out=torch.empty_like(x)
    )
    ref = reference(x.double().tolist(), 0.3, "if", "soft", 0.5, 2.0)
    assert out.dtype == torch.float16
    # state in float32 over float16 inputs: spikes equal except at rare exact ties
    assert (out.float() != torch.tensor(ref).half().float()).float().mean() < 0.01


@pytest.mark.parametrize("decay", [1.0, 0.6])  # IF and LIF
@pytest.mark.parametrize("reset", ["soft", "hard"])
def test_burst_neurons_match_float64_loop(reset, decay):
    """Burst mode: S[t] = clamp(floor(H / theta), 0, k) spikes per step, in plain Python floats."""
    g = torch.Generator().manual_seed(7)
    T, n, theta, k = 9, 41, 0.3, 3
    x = torch.rand(T, n, generator=g, dtype=torch.float64) * 1.5 - 0.2
    v = torch.full((n,), 0.5 * theta, dtype=torch.float64)
    out = torch.empty(T, n, dtype=torch.float64)
    torch_backend.multistep_burst(
        x,
        v,
        torch.tensor(theta, dtype=torch.float64),
        steps=T,
        static=False,
        soft_reset=reset == "soft",
        v_reset=0.0,
        decay=decay,
        max_spikes=k,
        out=out,
    )
    ref = []
    for i in range(n):
        vi, col = 0.5 * theta, []
        for t in range(T):
            h = (vi * decay if decay != 1.0 else vi) + x[t, i].item()
            c = min(max(math.floor(h / theta), 0), k)
            col.append(c * theta)
            vi = h - c * theta if reset == "soft" else (0.0 if c > 0 else h)
        ref.append(col)
    assert out.T.tolist() == ref
    counts = set((out / theta).round().unique().tolist())
    assert counts - {0.0, 1.0} and counts <= {0.0, 1.0, 2.0, 3.0}  # several spikes per step do happen


def test_burst_conversion_is_closer_at_small_T():
    import snnconv

    torch.manual_seed(0)
    ann = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()
    x = torch.randn(256, 8)
    ref = ann(x)
    errs = {}
    for k in (1, 4):
        snn = snnconv.convert(ann, T=2, calib=x, max_spikes=k)
        errs[k] = ((snn(x) - ref).norm() / ref.norm()).item()
    assert errs[4] < errs[1], errs


def _module_reference(x, theta, bias, cfg):
    """The Neuron module's SNN mode on x [T, N, C, ...]: per-channel threshold and bias current, in Python
    floats, one neuron at a time."""
    T, N, C = x.shape[:3]
    flat = x.reshape(T, N, C, -1)
    out = torch.zeros(flat.shape, dtype=torch.float64)
    for n, c, i in itertools.product(range(N), range(C), range(flat.shape[3])):
        th = theta[c].item()
        v = cfg.v_init * th
        for t in range(T):
            h = cfg.decay * v + flat[t, n, c, i].item() + bias[c].item()
            s = h >= th
            out[t, n, c, i] = th if s else 0.0
            v = (h - th if cfg.reset == "soft" else cfg.v_reset) if s else h
    return out.reshape(x.shape)


@pytest.mark.parametrize("kind,reset", [("if", "soft"), ("lif", "hard")])
def test_neuron_module_matches_float64_loop(kind, reset):
    """The module as the graph calls it: time folded into the batch [T * N, C, H, W], per-channel threshold
    and calibrated bias, v_init and v_reset, state carried from one call of the same Call to the next."""
    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import Neuron
    from snnconv.settings import NeuronConfig

    g = torch.Generator().manual_seed(21 + len(kind))
    T, N, C = 6, 2, 3
    cfg = NeuronConfig(kind=kind, reset=reset, v_reset=0.15, v_init=0.3, tau=3.0)
    neuron = Neuron(cfg)
    neuron.threshold = torch.rand(C, generator=g) + 0.4  # float32, as calibration leaves it
    neuron.bias = torch.rand(C, generator=g) * 0.4 - 0.2
    x = torch.rand(T, N, C, 4, 5, generator=g, dtype=torch.float64) * 1.5 - 0.3
    ref = _module_reference(x, neuron.threshold.double(), neuron.bias.double(), cfg)
    with running(Call(steps=T, input_static=False, backend="torch")):
        out = neuron(x.flatten(0, 1)).view(x.shape).clone()
    assert out.dtype == torch.float64 and torch.equal(out, ref)
    assert 0 < (out != 0).double().mean() < 1 and neuron.calls == {"kernel": 0, "cpu": 0, "torch": 1}
    with running(Call(steps=2, input_static=False, backend="torch")) as call:  # two chunks: 2 + 4 steps
        first = neuron(x[:2].flatten(0, 1)).view(2, *x.shape[1:]).clone()
        call.steps = 4
        rest = neuron(x[2:].flatten(0, 1)).view(4, *x.shape[1:]).clone()
    assert call.state[neuron].dtype == torch.float64 and torch.equal(torch.cat([first, rest]), ref)


def test_neuron_module_static_input_and_layouts():
    """A neuron marked static (hoisted) integrates its one [N, ...] input at every step when the call's input
    is static, and reads [T * N, ...] when it is not (time-major input); channels-last stays channels-last."""
    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import Neuron
    from snnconv.settings import NeuronConfig

    g = torch.Generator().manual_seed(31)
    T, N, C = 5, 2, 3
    neuron = Neuron(NeuronConfig())
    neuron.threshold, neuron.static_input = torch.rand(C, generator=g) + 0.4, True
    no_bias = torch.zeros(C, dtype=torch.float64)
    x0 = (torch.rand(N, C, 4, 4, generator=g, dtype=torch.float64) * 1.2 - 0.1).contiguous(
        memory_format=torch.channels_last
    )
    ref = _module_reference(x0.expand(T, *x0.shape), neuron.threshold.double(), no_bias, neuron.config)
    with running(Call(steps=T, input_static=True, backend="torch")):
        out = neuron(x0)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    assert torch.equal(out.view(T, *x0.shape), ref)
    xs = torch.rand(T, N, C, 4, 4, generator=g, dtype=torch.float64)
    ref = _module_reference(xs, neuron.threshold.double(), no_bias, neuron.config)
    with running(Call(steps=T, input_static=False, backend="torch")):
        out = neuron(xs.flatten(0, 1))
    assert out.is_contiguous() and torch.equal(out.view(xs.shape), ref)


def test_float32_neurons_keep_float32_membranes():
    """float32 currents integrate in a float32 membrane: the spikes equal a loop of float32 roundings (a
    float64 membrane would round differently and, over many steps, fire at other steps)."""
    import numpy as np

    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import Neuron
    from snnconv.settings import NeuronConfig

    g = torch.Generator().manual_seed(41)
    T, n = 64, 400
    neuron = Neuron(NeuronConfig(v_init=0.0))
    neuron.threshold = torch.tensor(0.7)
    x = torch.randint(1, 5, (T, n), generator=g) * 0.1  # sums land on the threshold: roundings decide
    with running(Call(steps=T, input_static=False, backend="torch")):
        out = neuron(x.flatten(0, 1)).view(T, n)
    th, xs = np.float32(0.7), x.numpy()
    v = np.zeros(n, dtype=np.float32)
    ref = np.zeros((T, n), dtype=np.float32)
    for t in range(T):
        v = v + xs[t]  # float32 + float32: one rounding, as torch's in-place add
        s = v >= th
        ref[t] = np.where(s, th, np.float32(0))
        v = np.where(s, v - th, v).astype(np.float32)
    assert out.dtype == torch.float32 and torch.equal(out, torch.from_numpy(ref))
    # the float64 sums of the same currents cross the threshold at other steps somewhere
    v64, fired64 = np.zeros(n), []
    for t in range(T):
        v64 = v64 + xs[t].astype(np.float64)
        s = v64 >= np.float64(th)
        fired64.append(s)
        v64 = np.where(s, v64 - np.float64(th), v64)
    assert (np.array(fired64) != (ref > 0)).any()


def test_neuron_outside_a_call_is_the_ann_activation():
    """No call open: the module is the ANN's activation (ReLU6 with its clip, else ReLU) and shows each
    output to its observer (calibration)."""
    import torch.nn.functional as F

    from snnconv.runtime.modules import Neuron
    from snnconv.settings import NeuronConfig

    x = torch.linspace(-4, 11, 61, dtype=torch.float64).view(1, 61)
    seen = []
    for clip, ref in ((6.0, F.relu6(x)), (None, F.relu(x))):
        n = Neuron(NeuronConfig(), clip=clip)
        n.observer = seen.append
        y = n(x)
        assert torch.equal(y, ref) and seen[-1] is y
    assert len(seen) == 2


def _signed(steps, static, decay):
    """The dynamics arguments of signed neurons (soft reset) for torch_backend.multistep."""
    return dict(steps=steps, static=static, soft_reset=True, v_reset=0.0, decay=decay)


@pytest.mark.parametrize("tau", [None, 3.0])
@pytest.mark.parametrize("static", [False, True])
def test_signed_spikes_match_float64_loop(tau, static, signed_reference):
    g = torch.Generator().manual_seed(11 + 2 * static + (tau is not None))
    T, n, theta = 17, 41, 0.6
    x = torch.rand(T, n, generator=g, dtype=torch.float64) * 1.4 - 0.6  # inputs of both signs
    if static:
        x[:] = x[0]
    v = torch.full((n,), 0.5 * theta, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    out = torch.empty(T, n, dtype=torch.float64)
    decay = 1.0 - 1.0 / tau if tau else 1.0
    th = torch.tensor(theta, dtype=torch.float64)
    torch_backend.multistep(
        x[0] if static else x, v, th, out=out, count=count, signed=True, **_signed(T, static, decay)
    )
    ref = signed_reference(x.tolist(), theta, 0.5, tau)
    assert out.tolist() == ref
    assert (out > 0).any() and (out < 0).any() != static  # a constant input never takes a spike back
    signs = (out / theta).round()
    assert torch.equal(count, signs.sum(0)) and (signs.cumsum(0) >= 0).all()  # the net count never below 0
    # the out-of-place form (export, tracing) runs the same dynamics
    v0 = torch.full((n,), 0.5 * theta, dtype=torch.float64)
    out_f, v_f, count_f = torch_backend.multistep_functional(
        x[0] if static else x, v0, th, steps=T, static=static, soft_reset=True, v_reset=0.0, decay=decay,
        count=torch.zeros(n, dtype=torch.float64),
    )  # fmt: skip
    assert out_f.tolist() == ref and torch.equal(v_f, v) and torch.equal(count_f, count)


def test_signed_count_is_the_rate_code_of_the_running_input():
    """Without decay, with inputs in [-theta, theta], a signed neuron's net count after every step t is
    floor((sum of inputs up to t + v_init) / theta) clipped to [0, t]: it takes back an early excess, which
    an unsigned neuron cannot (the unsigned count never falls)."""
    g = torch.Generator().manual_seed(5)
    T, n, theta = 12, 200, 1.0
    x = torch.rand(T, n, generator=g, dtype=torch.float64) * 2 - 1
    x[: T // 2] = x[: T // 2].abs()  # early excess, later taken back
    x[T // 2 :] = -x[T // 2 :].abs()
    v = torch.full((n,), 0.5, dtype=torch.float64)
    out = torch.empty(T, n, dtype=torch.float64)
    count = torch.zeros(n, dtype=torch.float64)
    torch_backend.multistep(x, v, torch.tensor(theta, dtype=torch.float64), out=out, count=count, signed=True,
                            **_signed(T, False, 1.0))  # fmt: skip
    t = torch.arange(1, T + 1, dtype=torch.float64).unsqueeze(1)
    ideal = torch.minimum(torch.floor(x.cumsum(0) + 0.5).clamp(min=0), t)
    assert torch.equal(out.cumsum(0), ideal)
    v0, th = torch.full((n,), 0.5, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64)
    plain = torch_backend.multistep(
        x, v0, th, steps=T, static=False, soft_reset=True, v_reset=0.0, decay=1.0, out=torch.empty_like(x)
    )
    final_err = lambda o: (o.sum(0) - ideal[-1]).abs().sum()  # noqa: E731
    assert final_err(out) == 0 < final_err(plain)


def test_exact_ties_fire(signed_reference):
    """Inputs on a grid of quarters, threshold 0.5, decay 0.5: every sum is exact, so membranes land exactly
    on the threshold (and on 0): H == theta fires (H >= theta), in every backend form, like the loops."""
    g = torch.Generator().manual_seed(17)
    T, n, theta = 16, 64, 0.5
    x = torch.randint(-2, 5, (T, n), generator=g).double() / 4
    th = torch.tensor(theta, dtype=torch.float64)

    def run(fn, **kw):
        out = torch.empty(T, n, dtype=torch.float64)
        fn(x, torch.full((n,), 0.5 * theta, dtype=torch.float64), th=th, steps=T, static=False, out=out, **kw)
        return out.tolist()

    def fwd(x, v, th, **kw):  # the out-of-place form, written into out
        out = kw.pop("out")
        out.copy_(torch_backend.multistep_functional(x, v, th, **kw)[0])

    ties = 0
    for kind, reset in itertools.product(["if", "lif"], ["soft", "hard"]):
        ref = reference(x.tolist(), theta, kind, reset, 0.5, 2.0)
        decay = 0.5 if kind == "lif" else 1.0
        kw = dict(soft_reset=reset == "soft", v_reset=0.0, decay=decay)
        assert run(lambda x, v, th, **k: torch_backend.multistep(x, v, th, **k), **kw) == ref, (kind, reset)
        assert run(fwd, **kw) == ref, (kind, reset)
        v = torch.full((n,), 0.5 * theta, dtype=torch.float64)
        for t in range(T):  # count the exact ties the case contains
            h = decay * v + x[t]
            ties += int((h == theta).sum())
            s = h >= theta
            v = torch.where(s, h - theta if reset == "soft" else torch.zeros_like(h), h)
    assert ties > 50
    burst = []
    for i in range(n):  # up to 3 spikes a step: floor(H / theta) clamped, soft reset
        v, col = 0.5 * theta, []
        for t in range(T):
            h = v + x[t, i].item()
            c = min(max(math.floor(h / theta), 0), 3)
            col.append(c * theta)
            v = h - c * theta
        burst.append(col)
    burst = torch.tensor(burst).T.tolist()
    kw = dict(soft_reset=True, v_reset=0.0, decay=1.0, max_spikes=3)
    assert run(lambda x, v, th, **k: torch_backend.multistep_burst(x, v, th, **k), **kw) == burst
    assert run(fwd, **kw) == burst
    signed = signed_reference(x.tolist(), theta, 0.5, None)
    out = torch.empty(T, n, dtype=torch.float64)
    v, count = torch.full((n,), 0.5 * theta, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    torch_backend.multistep(x, v, th, out=out, count=count, signed=True, **_signed(T, False, 1.0))
    assert out.tolist() == signed and (out < 0).any()
    out_f = torch_backend.multistep_functional(
        x, torch.full((n,), 0.5 * theta, dtype=torch.float64), th, steps=T, static=False, soft_reset=True,
        v_reset=0.0, decay=1.0, count=torch.zeros(n, dtype=torch.float64),
    )[0]  # fmt: skip
    assert out_f.tolist() == signed
