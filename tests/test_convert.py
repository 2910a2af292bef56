"""convert(): the seeds' notebook net, step modes, state_dict keys, the ANN limit as T grows."""

import copy
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import PLAIN, ResCatNet, notebook_net, randomize_bn

import snnconv
from snnconv.runtime.context import Call, running
from snnconv.runtime.modules import Neuron, SpikeMaxPool


def spiking_reference(net: nn.Sequential, x_seq: torch.Tensor) -> torch.Tensor:
    """The notebook net by hand in float64: Linear, IF (threshold 1, hard reset to 0, v0 = 0), repeat."""
    out = x_seq.double()
    for lin in (net[0], net[2]):
        cur = out @ lin.weight.double().T + lin.bias.double()
        v, spikes = torch.zeros_like(cur[0]), []
        for t in range(len(cur)):
            v = v + cur[t]
            s = (v >= 1.0).double()
            v = v * (1 - s)
            spikes.append(s)
        out = torch.stack(spikes)
    return out


def test_notebook_net_step_modes_identical_and_match_reference():
    T, N, C = 4, 2, 8
    net = notebook_net()
    torch.manual_seed(1)
    x_seq = torch.rand(T, N, C) * 256.0
    snn = snnconv.convert(net, T=T, threshold=1.0, example_input=x_seq[0], reset="hard", v_init=0.0)
    y_m = snn(x_seq, time_major=True, per_step=True)
    snn.step_mode = "s"
    snn.reset()
    y_s = torch.stack([snn(x_seq[t]) for t in range(T)])
    assert (y_m - y_s).abs().max().item() == 0.0
    assert torch.equal(y_m.double(), spiking_reference(net, x_seq))
    # a less saturated input, where spike trains actually vary over time
    x_seq = torch.randn(16, 5, C)
    snn.step_mode = "m"
    y_m = snn(x_seq, time_major=True, per_step=True)
    snn.step_mode = "s"
    snn.reset()
    y_s = torch.stack([snn(x_seq[t]) for t in range(16)])
    assert (y_m - y_s).abs().max().item() == 0.0
    assert torch.equal(y_m.double(), spiking_reference(net, x_seq))


def test_state_dict_keys_values_and_strict_loading_both_ways():
    ann = randomize_bn(ResCatNet())
    ann._version = 3  # a model class that versions its state_dict (as torchvision's MNASNet does)
    snn = snnconv.convert(ann, T=4, calib=torch.rand(32, 3, 16, 16))
    sd_ann, sd_snn = ann.state_dict(), snn.state_dict()
    assert list(sd_snn) == list(sd_ann)
    assert sd_snn._metadata[""]["version"] == sd_ann._metadata[""]["version"] == 3
    assert all(torch.equal(sd_ann[k], sd_snn[k]) for k in sd_ann)
    other = randomize_bn(ResCatNet(), seed=5)
    snn.load_state_dict(other.state_dict(), strict=True)
    fresh = ResCatNet()
    fresh.load_state_dict(snn.state_dict(), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], other.state_dict()[k]) for k in sd_ann)


def test_model_untouched():
    ann = randomize_bn(ResCatNet())
    before = copy.deepcopy(ann.state_dict())
    modules_before = [type(m) for m in ann.modules()]
    snnconv.convert(ann, T=4, calib=torch.rand(8, 3, 16, 16))
    assert [type(m) for m in ann.modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in ann.state_dict().items())
    assert not hasattr(ann, "_snn")


def test_error_falls_with_T_on_residual_cat_cnn():
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet())
    calib, x = torch.rand(128, 3, 16, 16), torch.rand(64, 3, 16, 16)
    ref = ann(x)
    snn = snnconv.convert(ann, T=4, calib=calib, **PLAIN)  # one conversion, run at every T
    errors = []
    for T in (4, 16, 64, 256):
        snn.T = T
        errors.append(((snn(x) - ref).norm() / ref.norm()).item())
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.1 and errors[-1] < errors[0] / 3, errors


def test_default_conversion_fitted_per_T_beats_plain_and_improves_with_T():
    """The default conversion is fitted to its T (threshold search, bias calibration, signed spikes): at
    each T it is closer to the ANN than the plain one, and converting for a larger T gets closer still."""
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet())
    calib, x = torch.rand(128, 3, 16, 16), torch.rand(64, 3, 16, 16)
    ref = ann(x)

    def error(snn):
        return ((snn(x) - ref).norm() / ref.norm()).item()

    fitted = [error(snnconv.convert(ann, T=T, calib=calib)) for T in (2, 4, 16, 64)]
    plain = [error(snnconv.convert(ann, T=T, calib=calib, **PLAIN)) for T in (2, 4, 16, 64)]
    assert all(a > b for a, b in itertools.pairwise(fitted)), fitted
    assert all(f < p for f, p in zip(fitted, plain)), (fitted, plain)


def test_step_modes_agree_on_cnn():
    ann = randomize_bn(ResCatNet())
    x = torch.rand(8, 3, 16, 16)
    snn = snnconv.convert(ann, T=12, calib=x)
    y_m = snn(x, per_step=True)
    snn.step_mode = "s"
    snn.reset()
    y_s = torch.stack([snn(x) for _ in range(12)])
    # conv over T*N vs N may round differently; spikes flip only at exact ties: bound the difference
    assert (y_m - y_s).abs().max() < 1e-4 * y_m.abs().max() or (y_m != y_s).float().mean() < 1e-3
    snn.step_mode = "m"
    assert torch.allclose(snn(x), y_m.mean(0), atol=1e-6)


def test_time_major_input_and_per_step_output():
    ann = randomize_bn(ResCatNet())
    x = torch.rand(8, 3, 16, 16)
    snn = snnconv.convert(ann, T=6, calib=x)
    direct = snn(x, per_step=True)
    assert direct.shape == (6, 8, 10)
    time_major = snn(x.expand(6, *x.shape), time_major=True, per_step=True)
    assert torch.allclose(time_major, direct, atol=1e-5)
    assert torch.allclose(snn(x), direct.mean(0), atol=1e-6)


def test_calls_under_inference_mode_equal_plain_calls():
    # inference tensors have no version counter, which the runtime's caches read: such a call once raised
    ann = randomize_bn(ResCatNet())
    x = torch.rand(8, 3, 16, 16)
    snn = snnconv.convert(ann, T=4, calib=x)
    plain, steps = snn(x), snn._step(x, snn.init_state(8))[0]
    with torch.inference_mode():
        assert torch.equal(snn(x.clone()), plain)
        assert torch.equal(snn.step(x.clone(), snn.init_state(8))[0], steps)


@pytest.mark.parametrize(
    "form",
    [
        "module",
        "module_inplace",
        "F.relu",
        "torch.relu",
        "method",
        "method_",
        "relu6",
        "hardtanh",
        "clamp",
        "clamp_max",
        "F.relu_inplace",
    ],
)
def test_relu_forms_become_neurons(form):
    acts = {
        "module": nn.ReLU(),
        "module_inplace": nn.ReLU(inplace=True),
        "F.relu": F.relu,
        "torch.relu": torch.relu,
        "method": lambda x: x.relu(),
        "method_": lambda x: x.relu_(),
        "relu6": nn.ReLU6(),
        "hardtanh": nn.Hardtanh(0.0, 2.0),
        "clamp": lambda x: torch.clamp(x, min=0),
        "clamp_max": lambda x: x.clamp(0, 1.5),
        "F.relu_inplace": lambda x: F.relu(x, inplace=True),
    }
    act = acts[form]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(6, 16), nn.Linear(16, 3)
            self.act = act if isinstance(act, nn.Module) else None

        def forward(self, x):
            h = self.l1(x)
            return self.l2(self.act(h) if self.act is not None else act(h))

    torch.manual_seed(0)
    ann = Net().eval()
    x = torch.randn(256, 6) * 2
    snn = snnconv.convert(ann, T=512, calib=x, method="max")
    assert len(snn.neurons()) == 1
    clip = {"relu6": 6.0, "hardtanh": 2.0, "clamp_max": 1.5}.get(form)
    assert next(iter(snn.neurons().values())).clip == clip
    ref = ann(x)
    assert ((snn(x) - ref).norm() / ref.norm()) < 0.02


def test_view_flatten_reshape_mean_forms():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 4, 3, padding=1)
            self.f = nn.Flatten()
            self.l = nn.Linear(4 * 16 * 4, 5)

        def forward(self, x):
            h = F.relu(self.c(x))
            a = self.f(h)
            b = torch.flatten(h, 1)
            c = h.reshape(h.shape[0], -1)
            d = h.view(h.size(0), 4, 16).view_as(a) / 2
            m = h.mean((2, 3))
            return self.l(torch.cat([a, b, c, d], 1)) + m[:, :1]

    ann = Net().eval()
    x = torch.rand(32, 2, 4, 4)
    snn = snnconv.convert(ann, T=256, calib=x)
    ref = ann(x)
    assert ((snn(x) - ref).norm() / ref.norm()) < 0.05


def test_maxpool_moves_before_the_neuron_and_converges():
    """maxpool(relu(x)) converts as neuron(maxpool(x)): pooling currents, not spikes."""
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    ).eval()
    x = torch.rand(64, 1, 16, 16)
    snn = snnconv.convert(ann, T=64, calib=x)
    for node in snn.graph_module.graph.nodes:
        if node.op == "call_module" and isinstance(snn.get_submodule(node.target), SpikeMaxPool):
            src = node.args[0]
            while src.op == "call_function":  # a layout conversion (channels_last) between them
                src = src.args[0]
            assert not isinstance(snn.get_submodule(src.target), Neuron)
            assert all(isinstance(snn.get_submodule(u.target), Neuron) for u in node.users)
    ref = ann(x)
    errors = []
    for T in (64, 256, 1024):
        snn.T = T
        errors.append(((snn(x) - ref).norm() / ref.norm()).item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.003, errors


def test_spike_maxpool_running_sum_is_exact():
    """Outputs up to every step sum to the max pool of the summed inputs (float64, exact up to rounding)."""
    pool = SpikeMaxPool({"kernel_size": 2, "stride": 2, "padding": 0, "dilation": 1, "ceil_mode": False}, 2)
    x = torch.rand(10, 3, 2, 4, 4, dtype=torch.float64)
    with running(Call(steps=10, input_static=False)):
        out = pool(x.flatten(0, 1)).view(10, 3, 2, 2, 2)
    assert torch.allclose(out.cumsum(0), F.max_pool2d(x.cumsum(0).flatten(0, 1), 2).view(10, 3, 2, 2, 2))
    # alternating inputs: the per-step max would report 1.0, the max of the averages is 0.5
    alt = torch.zeros(10, 1, 1, 1, 2, dtype=torch.float64)
    alt[0::2, ..., 0], alt[1::2, ..., 1] = 1.0, 1.0
    pool1 = SpikeMaxPool({"kernel_size": (1, 2), "stride": (1, 2), "padding": 0, "dilation": 1, "ceil_mode": False}, 2)
    with running(Call(steps=10, input_static=False)):
        assert pool1(alt.flatten(0, 1)).sum().item() == 5.0
    assert F.max_pool2d(alt.flatten(0, 1), (1, 2)).sum().item() == 10.0


@pytest.mark.parametrize("kernel", [2, (2, 3), 3])
def test_spike_maxpool_channels_last_chunks(kernel):
    """The channels-last fast path (running sums in memory order, pooling by strided maxima) against a
    float64 cumsum + max_pool2d reference, whole and in chunks carried over by the call's state."""
    kw = {"kernel_size": kernel, "stride": kernel, "padding": 0, "dilation": 1, "ceil_mode": False}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, 5, 8, 7, generator=g, dtype=torch.float64)  # steps, N, C, H, W (H, W not multiples)
    ref = F.max_pool2d(x.cumsum(0).flatten(0, 1), **kw).unflatten(0, (7, 2))
    ref = torch.diff(ref, dim=0, prepend=torch.zeros_like(ref[:1]))
    flat = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    pool = SpikeMaxPool(kw, 2)
    with running(Call(steps=7, input_static=False)):
        whole = pool(flat).clone()
    assert whole.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(whole.unflatten(0, (7, 2)), ref, atol=1e-12)
    call, parts = Call(steps=3, input_static=False), []
    for start, steps in ((0, 3), (3, 1), (4, 3)):
        call.steps = steps
        with running(call):
            parts.append(pool(flat[2 * start : 2 * (start + steps)]).clone())
    assert torch.equal(torch.cat(parts), whole)


def test_conversion_state_roundtrip():
    ann = randomize_bn(ResCatNet())
    x = torch.rand(16, 3, 16, 16)
    snn = snnconv.convert(ann, T=5, calib=x, per_channel=True)
    state = snn.conversion_state()
    import json

    state = json.loads(json.dumps(state))
    other = snnconv.convert(ann, T=9, calib=torch.rand(16, 3, 16, 16) * 3)
    assert not torch.allclose(other(x), snn(x))
    other.load_conversion_state(state)
    assert other.T == 5 and torch.equal(other(x), snn(x))


_GEOMETRIES = [
    (2, {"kernel_size": 2, "stride": 1}),  # overlapping windows
    (2, {"kernel_size": 2, "stride": 2, "padding": 1}),
    (2, {"kernel_size": 2, "stride": 2, "dilation": 2}),
    (2, {"kernel_size": 2, "stride": 2, "ceil_mode": True}),  # a partial window at the edge
    (2, {"kernel_size": (3, 2), "stride": None}),  # stride defaults to the kernel
    (2, {"kernel_size": 9, "stride": 9, "ceil_mode": True}),  # the window is larger than the map
    (1, {"kernel_size": 2, "stride": 2}),
    (3, {"kernel_size": 2, "stride": 2}),
]


@pytest.mark.parametrize(
    "dims,kw,channels_last", [(d, kw, cl) for d, kw in _GEOMETRIES for cl in ((False, True) if d == 2 else (False,))]
)
def test_spike_maxpool_every_geometry(dims, kw, channels_last):
    """Every pooling geometry, in either layout, equals the float64 cumsum + max pool reference, whole and
    in chunks; on a static input (call.input_static and marked static) it is the plain max pool."""
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
    g = torch.Generator().manual_seed(9 + dims)
    T, N, C = 5, 2, 3
    x = torch.randn(T, N, C, *(7, 5, 6)[3 - dims :], generator=g, dtype=torch.float64)
    ref = fn(x.cumsum(0).flatten(0, 1), **kw).unflatten(0, (T, N))
    ref = torch.diff(ref, dim=0, prepend=torch.zeros_like(ref[:1]))
    flat = x.flatten(0, 1)
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    pool = SpikeMaxPool(kw, dims)
    with running(Call(steps=T, input_static=False)):
        whole = pool(flat).clone()
    assert whole.dtype == torch.float64 and torch.allclose(whole.unflatten(0, (T, N)), ref, rtol=0, atol=1e-12)
    call, parts = Call(steps=2, input_static=False), []
    for start, steps in ((0, 2), (2, 3)):
        call.steps = steps
        with running(call):
            parts.append(pool(flat[N * start : N * (start + steps)]).clone())
    assert torch.equal(torch.cat(parts), whole)
    pool.static_input = True
    with running(Call(steps=T, input_static=True)):
        assert torch.equal(pool(flat[:N]), fn(flat[:N], **kw))
    with running(Call(steps=T, input_static=False)):  # time-varying input: running sums again
        assert torch.equal(pool(flat), whole)
