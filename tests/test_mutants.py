"""Tests added for mutants that survived benchmarks/mutation.py: behaviour the other tests left unpinned."""

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
    for decay, soft, static, k in [
        (1.0, True, False, 1),
        (0.7, False, False, 1),
        (1.0, True, True, 1),
        (0.8, True, False, 3),
    ]:
        x = torch.rand(T, n, generator=g, dtype=torch.float64) * 1.4 - 0.2
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
    from snnconv.runtime.modules import Neuron, NeuronConfig, SpikeMaxPool

    n = Neuron(NeuronConfig(kind="lif", reset="hard"), clip=6.0)
    n.threshold = torch.tensor(0.25)
    assert n.extra_repr() == "lif, reset=hard, threshold=0.25, clip=6.0"
    n.threshold, n.bias = torch.ones(7), torch.zeros(7)
    assert n.extra_repr() == "lif, reset=hard, threshold=per-channel[7], clip=6.0, calibrated bias"
    pool = SpikeMaxPool({"kernel_size": 2, "stride": 1}, 2)
    assert pool.extra_repr() == "kernel_size=2, stride=1"


def test_spike_maxpool_sums_half_inputs_in_float32():
    """Running sums of bfloat16 currents are kept in float32 (in bfloat16 they would stop growing)."""
    import torch.nn.functional as F

    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import SpikeMaxPool

    g = torch.Generator().manual_seed(4)
    T = 64
    x = (torch.rand(T, 2, 3, 4, 4, generator=g) * 0.1).to(torch.bfloat16)
    pool = SpikeMaxPool({"kernel_size": 2, "stride": 2}, 2)
    with running(Call(steps=T, input_static=False)):
        out = pool(x.flatten(0, 1)).view(T, 2, 3, 2, 2)
    pooled = F.max_pool2d(x.float().cumsum(0).flatten(0, 1), 2).view(T, 2, 3, 2, 2)
    ref = torch.diff(pooled, dim=0, prepend=torch.zeros_like(pooled[:1])).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
