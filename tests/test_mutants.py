"""Tests added for mutants that survived benchmarks/mutation.py: behaviour the other tests left unpinned."""

import itertools

import torch
import torch.nn as nn

import snnconv
from snnconv.calibrate import calibrate_bias


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_bias_calibration_uses_bias_batches_and_leaves_the_ann_graph_clean():
    ann = _mlp()
    g = torch.Generator().manual_seed(11)
    b1, b2 = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g) * 2 + 1
    one = snnconv.convert(ann, T=4, calib=[b1, b2], bias_calibration=True, bias_batches=1)
    # the same conversion without bias calibration, then bias calibration by hand on the first batch only
    ref = snnconv.convert(ann, T=4, calib=[b1, b2], bias_calibration=False)
    assert not any(n.bias is not None for n in ref.neurons().values())
    calibrate_bias(ref, [b1], None)
    both = snnconv.convert(ann, T=4, calib=[b1, b2], bias_calibration=True, bias_batches=2)
    for name, n in one.neurons().items():
        assert torch.equal(n.bias, ref.neurons()[name].bias), name
    assert any(not torch.equal(n.bias, both.neurons()[k].bias) for k, n in one.neurons().items())
    # no observer or hook is left behind: outside a call the graph is the ANN again
    with torch.no_grad():
        assert torch.allclose(one.graph_module(b2), ann(b2), atol=1e-5)
    assert all(n.observer is None and not n._forward_hooks for n in one.neurons().values())


def test_functional_neurons_equal_the_in_place_ones():
    """multistep_functional (what ONNX export and tracing record) runs the same dynamics as the in-place
    backends: same outputs and final membrane, for IF/LIF, soft/hard reset, static input, bursts."""
    from snnconv.runtime import torch_backend

    g = torch.Generator().manual_seed(5)
    T, n = 7, 29
    theta = torch.rand(n, generator=g, dtype=torch.float64) + 0.3
    for decay, soft, static, k, scale in [
        (1.0, True, False, 1, 1.4),
        (0.7, False, False, 1, 1.4),
        (1.0, True, True, 1, 1.4),
        (0.8, True, False, 3, 1.4),
        (1.0, True, False, 2, 1.4),
        (1.0, False, False, 3, 6.0),  # inputs of several thresholds: the clamp at max_spikes bites
    ]:
        x = torch.rand(T, n, generator=g, dtype=torch.float64) * scale - 0.2
        x_in = x[0] if static else x
        v0 = 0.5 * theta
        kw = dict(steps=T, static=static, soft_reset=soft, v_reset=0.1, decay=decay)
        out_f, v_f = torch_backend.multistep_functional(x_in, v0.clone(), theta, max_spikes=k, **kw)
        v, out = v0.clone(), torch.empty(T, n, dtype=torch.float64)
        if k == 1:
            torch_backend.multistep(x_in, v, theta, out=out, **kw)
        else:
            torch_backend.multistep_burst(x_in, v, theta, max_spikes=k, out=out, **kw)
        assert torch.allclose(out_f, out, rtol=0, atol=1e-12) and torch.allclose(v_f, v, rtol=0, atol=1e-12)
        assert 0 < (out != 0).double().mean() < 1  # spikes and silences both happen
        if k > 1:
            assert (out / theta).round().max() == k  # some steps fire the most spikes a step can carry
    # binary by default; float16 currents into a float32 membrane under a float64 threshold: the output
    # keeps the input's dtype, the membrane its own, and the threshold is taken in the membrane's dtype
    x = (torch.rand(T, n, generator=g) * 1.4 - 0.2).half()
    th = torch.full((n,), 0.1, dtype=torch.float64)  # 0.1 is not a float32: rounding shows
    kw = dict(steps=T, static=False, soft_reset=True, v_reset=0.0, decay=1.0)
    out_f, v_f = torch_backend.multistep_functional(x, torch.zeros(n), th, **kw)
    v, out = torch.zeros(n), torch.empty(T, n, dtype=torch.float16)
    torch_backend.multistep(x, v, th, out=out, **kw)
    assert out_f.dtype == torch.float16 and v_f.dtype == torch.float32
    assert torch.equal(out_f, out) and torch.equal(v_f, v)


class _StaticMeetsSpikes(nn.Module):
    """A step-invariant branch (a linear layer on the input) added to a spiking one: a TimeBroadcast."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.relu(torch.relu(self.a(x)) + self.b(x)))


def test_time_broadcast_where_static_meets_spiking():
    torch.manual_seed(2)
    ann = _StaticMeetsSpikes().double().eval()
    x = torch.rand(5, 6, dtype=torch.float64)
    hoisted = snnconv.convert(ann, T=4, calib=x)
    plain = snnconv.convert(ann, T=4, calib=x, passes=[])
    kinds = [n.meta.get("snn_kind") for n in hoisted.graph_module.graph.nodes]
    assert kinds.count("broadcast") == 1  # b(x) runs once on [N, ...] and is broadcast where it meets spikes
    for T in (1, 4):
        hoisted.T = plain.T = T
        assert torch.allclose(hoisted(x, per_step=True), plain(x, per_step=True), rtol=0, atol=1e-12)
    xs = torch.rand(3, 5, 6, dtype=torch.float64)  # time-major: every tensor already varies with time
    assert torch.allclose(hoisted(xs, time_major=True), plain(xs, time_major=True), rtol=0, atol=1e-12)
    assert torch.allclose(hoisted(xs[:1], time_major=True), plain(xs[:1], time_major=True), rtol=0, atol=1e-12)


def test_module_reprs_name_their_settings():
    from snnconv.runtime.modules import Neuron, SpikeMaxPool
    from snnconv.settings import NeuronConfig

    n = Neuron(NeuronConfig(kind="lif", reset="hard"), clip=6.0)
    n.threshold = torch.tensor(0.25)
    assert n.extra_repr() == "lif, reset=hard, threshold=0.25, clip=6.0"
    n.threshold, n.bias = torch.ones(7), torch.zeros(7)
    assert n.extra_repr() == "lif, reset=hard, threshold=per-channel[7], clip=6.0, calibrated bias"
    pool = SpikeMaxPool({"kernel_size": 2, "stride": 1}, 2)
    assert pool.extra_repr() == "kernel_size=2, stride=1"


def test_spike_maxpool_sums_half_inputs_in_float32():
    """Running sums of bfloat16 and float32 currents are kept in float32 (in bfloat16 they would stop
    growing; in float64 they would round differently): equal to float32 cumsums, max-pooled and differenced
    in float32, in either layout."""
    import torch.nn.functional as F

    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import SpikeMaxPool

    g = torch.Generator().manual_seed(4)
    T = 64
    for dtype, fmt in itertools.product(
        (torch.bfloat16, torch.float32), (torch.contiguous_format, torch.channels_last)
    ):
        x = (torch.rand(T, 2, 3, 4, 4, generator=g) * 0.1).to(dtype)
        pool = SpikeMaxPool({"kernel_size": 2, "stride": 2}, 2)
        with running(Call(steps=T, input_static=False)):
            out = pool(x.flatten(0, 1).contiguous(memory_format=fmt)).view(T, 2, 3, 2, 2)
        sums = x.float().clone()
        for t in range(1, T):  # float32 adds step by step (torch.cumsum accumulates float32 in float64)
            sums[t] = sums[t - 1] + sums[t]
        pooled = F.max_pool2d(sums.flatten(0, 1), 2).view(T, 2, 3, 2, 2)
        ref = torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1])).to(dtype)
        assert out.dtype == dtype and torch.equal(out, ref), (dtype, fmt)


class _PoolNet(nn.Module):
    """Two max pools on spiking input: a non-overlapping 2x2 one (the channels-last fast kernel) and an
    overlapping 3x3 one (max_pool2d on the running sums)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.p1, self.p2 = nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        x = self.p2(torch.relu(self.c2(self.p1(torch.relu(self.c1(x))))))
        return self.fc(torch.relu(x).flatten(1))


def test_traced_graph_equals_the_eager_run():
    """Under graph capture (torch.jit.trace, what ONNX export records) neurons and spike max pools run their
    out-of-place forms; the traced SNN computes what the eager one does, in float64 to the last bits."""
    import warnings

    torch.manual_seed(6)
    ann = _PoolNet().double().eval()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    for kw in (dict(), dict(neuron="lif", reset="hard"), dict(max_spikes=3), dict(passes=[])):
        snn = snnconv.convert(ann, T=5, calib=x, **kw)
        ref = snn(x)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(snn, (x,), check_trace=False)
            y = traced(x)
        assert torch.allclose(y, ref, rtol=0, atol=1e-12), kw
        assert not torch.allclose(ref, ann(x), rtol=0, atol=1e-3)  # spikes, not the ANN's values


def test_channel_sums_are_per_channel_float64():
    """Bias calibration's per-channel sums (dim 1) and counts, against float64 sums of the same values;
    a tensor without a channel dim is one channel."""
    from snnconv.calibrate import _channel_sums

    g = torch.Generator().manual_seed(8)
    for shape in [(5, 3), (4, 3, 2, 6), (7,), ()]:
        t = torch.rand(shape, generator=g) * 1e4 + 1e-3  # float32: float32 sums would round
        sums, count = _channel_sums(t)
        d = t.double()
        ref = d.transpose(0, 1).reshape(shape[1], -1).sum(1) if t.dim() > 1 else d.sum().reshape(1)
        assert sums.dtype == torch.float64 and sums.shape == ref.shape
        assert torch.allclose(sums, ref, rtol=1e-13, atol=0)
        assert count == (t.numel() // shape[1] if t.dim() > 1 else t.numel())


def test_one_rank_distributed_calibration_matches_the_plain_one(tmp_path):
    """Calibration under a one-process gloo group (what mutmut can follow; tests/test_distributed.py runs
    two processes): max thresholds all-reduced and percentiles gathered to the same values."""
    import torch.distributed as dist

    ann = _mlp()
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(12))
    plain = {m: snnconv.convert(ann, T=4, calib=x, method=m, percentile=99.0) for m in ("max", "percentile")}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        for method, ref in plain.items():
            snn = snnconv.convert(ann, T=4, calib=[x[:50], x[50:]], method=method, percentile=99.0)
            for name, n in snn.neurons().items():
                th, th_ref = n.threshold, ref.neurons()[name].threshold
                assert th.shape == th_ref.shape and th.dim() == 1  # per channel
                assert torch.equal(th, th_ref), (method, name)
    finally:
        dist.destroy_process_group()


def test_calibration_progress_bar_only_on_a_terminal(capsys, monkeypatch):
    """tqdm's bar, named 'calibration' and counting batches, is drawn on a terminal only and cleared when
    calibration ends."""
    import io
    import sys

    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(8, 4)
    snnconv.convert(model, T=2, calib=[x, x])
    assert "calibration" not in capsys.readouterr().err  # stderr is not a terminal here

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    snnconv.convert(model, T=2, calib=[x, x])
    text = term.getvalue()
    assert "calibration: 0batch [" in text and "batch/s]" in text
    assert text.endswith("\r") and text.rsplit("\r", 2)[-2].strip() == ""  # the line is blanked at the end
