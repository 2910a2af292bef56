"""Expectation compensation (runtime/compensate.py, passes/compensate.py): for every op a neuron cannot represent,
the outputs summed over steps 1..t equal t * f(running means of its inputs), against a float64 reference, per op
and per T, whether the call runs all steps at once, in time chunks, step by step or from several threads."""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import MODERN_NETS

import snnconv
from snnconv.runtime.compensate import RunningDiff, RunningMean

D = 12  # features of each sample: two operands of 6 where an op takes two


def _halves(x):
    return x[:, :, : D // 2], x[:, :, D // 2 :]


class Op(nn.Module):
    """One op on [N, 4, D] inputs (4 tokens), written as a user would."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.ln, self.gn = nn.LayerNorm(D), nn.GroupNorm(2, 4)
        self.mha = nn.MultiheadAttention(D, 2, batch_first=True)
        self.gelu, self.hswish, self.silu = nn.GELU(), nn.Hardswish(), nn.SiLU()
        nn.init.normal_(self.ln.weight, 1.0, 0.3)

    def forward(self, x):
        a, b = _halves(x)
        return {
            "gelu": lambda: self.gelu(x),
            "gelu_tanh": lambda: F.gelu(x, approximate="tanh"),
            "silu": lambda: self.silu(x),
            "silu_spelled": lambda: x * x.sigmoid(),
            "hardswish": lambda: self.hswish(x),
            "sigmoid": lambda: torch.sigmoid(x),
            "hardsigmoid": lambda: F.hardsigmoid(x),
            "tanh": lambda: x.tanh(),
            "softmax": lambda: x.softmax(-1),
            "torch_softmax": lambda: torch.softmax(x, dim=-1),
            "layer_norm": lambda: self.ln(x),
            "F_layer_norm": lambda: F.layer_norm(x, (D,)),
            "group_norm": lambda: self.gn(x),
            "rms_norm": lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6),
            "erf_gelu": lambda: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
            "product": lambda: a * b,
            "quotient": lambda: a / (b.abs() + 1),
            "qk": lambda: a @ b.transpose(-2, -1),
            "matmul": lambda: torch.matmul(a.transpose(1, 2), b),
            "bmm": lambda: torch.bmm(a, b.transpose(1, 2)),
            "einsum": lambda: torch.einsum("nid,njd->nij", a, b),
            "sdpa": lambda: F.scaled_dot_product_attention(a.unsqueeze(1), b.unsqueeze(1), b.unsqueeze(1)),
            "mha": lambda: self.mha(x, x, x, need_weights=False)[0],
        }[self.name]()


OPS = [
    "gelu",
    "gelu_tanh",
    "silu",
    "silu_spelled",
    "hardswish",
    "sigmoid",
    "hardsigmoid",
    "tanh",
    "softmax",
    "torch_softmax",
    "layer_norm",
    "F_layer_norm",
    "group_norm",
    "rms_norm",
    "erf_gelu",
    "product",
    "quotient",
    "qk",
    "matmul",
    "bmm",
    "einsum",
    "sdpa",
    "mha",
]


def _snn(name: str):
    torch.manual_seed(0)
    model = Op(name).eval()
    snn = snnconv.convert(model, T=4, threshold=1.0, example_input=torch.rand(2, 4, D))
    assert not snn.neurons(), "only compensated ops: every input is the time-major input itself"
    return model, snn


def _reference(model, xs: torch.Tensor) -> torch.Tensor:
    """t * f(mean of the inputs over steps 1..t), for t = 1..T, in float64: [T, N, ...]."""
    ref = model.double()
    means = xs.double().cumsum(0) / torch.arange(1, len(xs) + 1, dtype=torch.float64).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = torch.stack([t * ref(m) for t, m in enumerate(means, 1)])
    model.float()
    return out


def _check(sums: torch.Tensor, ref: torch.Tensor):
    scale = ref.abs().amax(dim=tuple(range(1, ref.dim())), keepdim=True).clamp(min=1)
    err = ((sums.double() - ref).abs() / scale).max().item()
    assert err < 1e-5, err


@pytest.mark.parametrize("name", OPS)
def test_invariant_per_op_and_T(name):
    model, snn = _snn(name)
    gen = torch.Generator().manual_seed(1)
    for T in (1, 2, 3, 8, 17, 64):
        xs = torch.randn(T, 3, 4, D, generator=gen) * 2  # a different input at every step
        ys = snn(xs, time_major=True, per_step=True)
        _check(ys.cumsum(0), _reference(model, xs))


@pytest.mark.parametrize("name", ["softmax", "layer_norm", "qk", "sdpa", "mha", "erf_gelu"])
def test_invariant_in_chunks_steps_and_threads(name):
    model, snn = _snn(name)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(16, 3, 4, D, generator=gen)
    whole = snn(xs, time_major=True, per_step=True)
    ref = _reference(model, xs)
    _check(whole.cumsum(0), ref)
    snn.settings.chunk = 5  # state carried across time chunks
    _check(snn(xs, time_major=True, per_step=True).cumsum(0), ref)
    snn.settings.chunk = None
    state, steps = snn.init_state(3), []
    for x in xs:  # step by step, the state owned by the caller
        y, state = snn.step(x, state)
        steps.append(y)
    _check(torch.stack(steps).cumsum(0), ref)
    inputs = [torch.randn(16, 3, 4, D, generator=gen) for _ in range(6)]
    alone = [snn(x, time_major=True, per_step=True) for x in inputs]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda x: snn(x, time_major=True, per_step=True), inputs))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_static_input_is_passed_through():
    """The same input at every step (the default call): f(x) at every step, as the ANN computes it."""
    model, snn = _snn("layer_norm")
    x = torch.randn(5, 4, D)
    ys = snn(x, per_step=True)
    with torch.no_grad():
        assert torch.allclose(ys, model(x).expand_as(ys), atol=1e-6)


def test_running_modules_outside_a_call_are_identities():
    x = torch.randn(6, 3)
    assert RunningMean()(x) is x and RunningDiff()(x) is x


def test_two_sided_neuron_against_a_float64_loop():
    """The neuron inserted before weighted layers: fires +theta when V >= theta, -theta when V < 0 (soft reset
    both ways), so its count after t steps is floor((sum of inputs + theta / 2) / theta) while inputs stay
    within [-theta, theta]."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(F.gelu(x))

    torch.manual_seed(0)
    snn = snnconv.convert(Net().eval(), T=4, calib=torch.randn(64, 8))
    (neuron,) = snn.neurons().values()
    assert neuron.two_sided and neuron.channel_dim == -1
    theta = neuron.threshold.double()
    bias = neuron.bias.double() if neuron.bias is not None else 0
    xs = torch.randn(40, 5, 8, dtype=torch.float64)
    captured = []
    hook = neuron.register_forward_hook(lambda m, a, out: captured.append((a[0].clone(), out.clone())))
    snn(xs.float(), time_major=True)
    hook.remove()
    currents, spikes = captured[0]
    v = 0.5 * theta.expand(5, 8).clone()
    for t in range(40):
        v += currents.view(40, 5, 8)[t].double() + bias
        s = (v >= theta).double() - (v < 0).double()
        v -= s * theta
        assert torch.allclose(spikes.view(40, 5, 8)[t].double(), s * theta, atol=1e-6), t


@pytest.mark.parametrize("name", sorted(MODERN_NETS))
def test_modern_nets_convert_and_approach_the_ann(name, tmp_path, same_state_dict):
    torch.manual_seed(0)
    model = MODERN_NETS[name]().eval()
    calib, x = torch.rand(64, 1, 28, 28), torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    errors = {}
    for T in (8, 64):
        snn = snnconv.convert(model, T=T, calib=calib)
        with torch.no_grad():
            errors[T] = ((snn(x) - ref).abs().max() / ref.abs().max()).item()
    assert errors[64] < errors[8] and errors[64] < 0.05, errors
    same_state_dict(snn, model)  # keys unchanged, strict load both ways
    path = tmp_path / "m.safetensors"
    snnconv.save(snn, path)
    again = snnconv.load(path, model=MODERN_NETS[name]())
    with torch.no_grad():
        assert torch.equal(again(x), snn(x))


def test_exports_refuse_compensated_graphs_naming_the_ops():
    from snnconv.export import export_onnx
    from snnconv.nir_graph import to_nir

    torch.manual_seed(0)
    snn = snnconv.convert(MODERN_NETS["vit"]().eval(), T=4, calib=torch.rand(8, 1, 28, 28), signed_spikes=False)
    with pytest.raises(snnconv.ConversionError, match=r"NIR export .*blocks_0_norm1"):
        to_nir(snn)
    with pytest.raises(snnconv.ConversionError, match=r"ONNX export: .*op\(s\) on running means"):
        export_onnx(snn, "unused.onnx")


def test_evaluate_counts_float_ops_apart_from_synaptic_events():
    torch.manual_seed(0)
    model = MODERN_NETS["silu_se"]().eval()
    calib, x = torch.rand(16, 1, 28, 28), torch.rand(8, 1, 28, 28)
    r = snnconv.evaluate(snnconv.convert(model, T=4, calib=calib), x, progress=False)
    assert r["snn_float_ops"] > 0 and r["snn_acs"] > 0
    # the depthwise convolution reads SiLU's compensated output (floats, step-invariant here: once per sample) as
    # MACs; given spikes (spike_depthwise) it accumulates them instead
    spiking = snnconv.evaluate(snnconv.convert(model, T=4, calib=calib, spike_depthwise=True), x, progress=False)
    dw = sum(m.weight[0].numel() * 16 * 28 * 28 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    assert r["snn_macs"] - spiking["snn_macs"] == dw and spiking["snn_acs"] > r["snn_acs"]
