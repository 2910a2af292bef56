"""The event-driven integer layer (runtime/sparse_layer.py, int8 mode 'sparse'): bit for bit the float64
layer over the same integers, rounded once; in every geometry, layout and thread split; as a SpikeLayer and
through the pass."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snnconv
from snnconv import config
from snnconv.runtime import integer_spikes as int8
from snnconv.runtime import sparse_layer
from snnconv.runtime.context import Call, running
from snnconv.runtime.modules import Neuron
from snnconv.settings import NeuronConfig

pytestmark = pytest.mark.skipif(not sparse_layer.available(), reason=f"no C compiler: {sparse_layer.why_not()}")


def _case(n, c, h, w, c_out, kernel, rate, signed, seed, peak=32512):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(n, c, h, w, generator=g) < rate
    sign = torch.where(torch.rand(n, c, h, w, generator=g) < 0.4, -1.0, 1.0) if signed else 1.0
    spikes = (active * sign).double()
    whole = torch.randint(-peak, peak + 1, (c_out, c, *kernel), generator=g).double()
    scale = torch.rand(c_out, generator=g) * 1e-3
    bias = torch.randn(c_out, generator=g)
    u = (spikes + int(signed)).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # channels-last integers
    return spikes, whole, scale, bias, u


def _reference(spikes, whole, scale, bias, stride, padding, dilation):
    """float(scale * sum + bias) in float64 over the exact integer sums: the kernel's contract."""
    acc = F.conv2d(spikes, whole, None, stride, padding, dilation)
    return (acc * scale.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)).float()


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(
    "n, c, hw, c_out, kernel, stride, padding, dilation, rate",
    [
        (3, 16, (8, 8), 64, (3, 3), (1, 1), (1, 1), (1, 1), 0.3),  # one chunk, one full block
        (2, 37, (9, 7), 70, (3, 3), (2, 1), (1, 2), (1, 1), 0.4),  # ragged chunk; 70 -> two blocks of 64
        (2, 5, (11, 13), 3, (3, 3), (2, 2), (0, 2), (2, 2), 0.5),  # dilation, one channel group short
        (1, 24, (6, 6), 130, (5, 1), (1, 1), (2, 0), (1, 1), 0.2),  # non-square kernel, three blocks
        (4, 48, (5, 5), 8, (1, 1), (1, 1), (0, 0), (1, 1), 1.0),  # every input spiking
        (2, 32, (4, 4), 16, (3, 3), (1, 1), (1, 1), (1, 1), 0.0),  # none: the bias alone
    ],
)
def test_kernel_is_the_float64_layer_bit_for_bit(n, c, hw, c_out, kernel, stride, padding, dilation, rate, signed):
    spikes, whole, scale, bias, u = _case(n, c, *hw, c_out, kernel, rate, signed, seed=c * c_out)
    geometry = (stride, padding, dilation, kernel)
    y = sparse_layer.run(u, int(signed), sparse_layer.pack(whole), c_out, geometry, scale, bias)
    ref = _reference(spikes, whole, scale, bias, stride, padding, dilation)
    assert y.shape == (n, *ref.shape[2:], c_out)
    assert torch.equal(y.permute(0, 3, 1, 2), ref)


def test_kernel_sums_do_not_overflow_at_the_largest_weights():
    """512 channels x 9 taps of +-32512, every input +1: 1.5e8, far from int32's 2.1e9, exact."""
    spikes, whole, scale, bias, u = _case(1, 512, 3, 3, 8, (3, 3), 1.0, False, seed=3)
    whole[:4] = 32512.0
    whole[4:] = -32512.0
    y = sparse_layer.run(u, 0, sparse_layer.pack(whole), 8, ((1, 1), (1, 1), (1, 1), (3, 3)), scale, bias)
    assert torch.equal(y.permute(0, 3, 1, 2), _reference(spikes, whole, scale, bias, 1, 1, 1))
    assert sparse_layer.MAX_INPUTS * 32512 < 2**31


@pytest.mark.parametrize("sign", [1.0, -1.0, None])
def test_kernel_16_bit_sums_at_their_bounds(sign):
    """Every input spiking, all +1, all -1 or mixed: each output's list is 9 taps x 64 channels per chunk, summed
    in pieces of 256 entries. Weights at +-32512 and at low bytes of 0 and 255 (-1, 255, -256...) drive the
    kernel's 16-bit sums (high bytes, and the whole sum mod 2^16) to their limits; still the float64 layer."""
    g = torch.Generator().manual_seed(7)
    n, c, c_out = 2, 128, 80
    spikes = torch.full((n, c, 5, 5), sign, dtype=torch.float64) if sign else torch.ones(n, c, 5, 5).double()
    if sign is None:
        spikes[torch.rand(n, c, 5, 5, generator=g) < 0.5] = -1.0
    picks = torch.tensor([-32512, -32511, -32257, -257, -256, -255, -1, 0, 1, 255, 256, 32511, 32512]).double()
    whole = picks[torch.randint(len(picks), (c_out, c, 3, 3), generator=g)]
    for i, value in enumerate((32512, -32512, -1, 255, -32257)):  # whole output channels at one extreme
        whole[8 * i : 8 * i + 8] = value
    scale, bias = torch.rand(c_out, generator=g) * 1e-3, torch.randn(c_out, generator=g)
    u = (spikes + 1).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    y = sparse_layer.run(u, 1, sparse_layer.pack(whole), c_out, ((1, 1), (1, 1), (1, 1), (3, 3)), scale, bias)
    assert torch.equal(y.permute(0, 3, 1, 2), _reference(spikes, whole, scale, bias, 1, 1, 1))
    with pytest.raises(ValueError, match="32512"):
        sparse_layer.pack(whole + 1)


def test_kernel_threads_split_samples_alike(monkeypatch):
    """1 and 3 threads, on torch's OpenMP threads (where built with OpenMP) and on the Python thread pool."""
    spikes, whole, scale, bias, u = _case(7, 20, 6, 6, 12, (3, 3), 0.3, True, seed=4)
    packed, geometry = sparse_layer.pack(whole), ((1, 1), (1, 1), (1, 1), (3, 3))
    fn, par = sparse_layer.KERNEL.get()
    before, runs = torch.get_num_threads(), []
    try:
        for split in (par, None):
            monkeypatch.setattr(sparse_layer.KERNEL, "value", (fn, split))
            for threads in (1, 3):
                torch.set_num_threads(threads)
                runs.append(sparse_layer.run(u, 1, packed, 12, geometry, scale, bias))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert torch.equal(runs[0].permute(0, 3, 1, 2), _reference(spikes, whole, scale, bias, 1, 1, 1))


def test_kernel_as_a_linear_layer():
    g = torch.Generator().manual_seed(5)
    x = ((torch.rand(9, 300, generator=g) < 0.3).double()) * torch.where(torch.rand(9, 300, generator=g) < 0.5, -1, 1)
    whole = torch.randint(-32512, 32513, (10, 300), generator=g).double()
    scale, bias = torch.rand(10, generator=g) * 1e-3, torch.randn(10, generator=g)
    y = sparse_layer.run((x + 1).to(torch.uint8), 1, sparse_layer.pack(whole), 10, None, scale, bias)
    assert torch.equal(y, ((x @ whole.t()) * scale.double() + bias.double()).float())


def _spike_layer(layer, theta, signed, flatten=False):
    neuron = Neuron(NeuronConfig(signed=signed))
    neuron.threshold = theta
    return int8.SpikeLayer(layer, neuron, ("layer", "neuron"), "sparse", flatten)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_spike_layer_is_its_integer_weights_in_float64(signed, layout):
    """A SpikeLayer in 'sparse' over spikes of theta (per channel): float(s * conv(spikes / theta, q) + b),
    with q, s the layer's own 16-bit weights (split_weight, base 255), and the output in the input's layout."""
    torch.manual_seed(0)
    conv, theta = nn.Conv2d(12, 20, 3, stride=2, padding=1), torch.rand(12) + 0.3
    g = torch.Generator().manual_seed(6)
    sign = ((torch.rand(5, 12, 9, 9, generator=g) < 0.3).float()) * (
        torch.where(torch.rand(5, 12, 9, 9, generator=g) < 0.4, -1.0, 1.0) if signed else 1.0
    )
    x = sign * theta.view(-1, 1, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    layer = _spike_layer(conv, theta, signed)
    with running(Call()):
        y = layer(x)
    q, s = int8.split_weight(int8.fold_input_scale(conv.weight.double(), theta.double()))
    whole = 255 * q[:, :12].double() + q[:, 12:].double()
    acc = F.conv2d(sign.double(), whole, None, 2, 1)
    ref = (acc * s.float().double().view(1, -1, 1, 1) + conv.bias.double().view(1, -1, 1, 1)).float()
    assert torch.equal(y, ref)
    assert y.is_contiguous() == (layout == "nchw")
    with torch.no_grad():
        assert torch.allclose(y, conv(x), atol=1e-4 * conv(x).abs().max().item())  # and near the float32 layer


def test_supports_refuses_what_could_overflow():
    assert int8.supports(nn.Linear(60000, 4), "sparse") and not int8.supports(nn.Linear(70000, 4), "sparse")
    assert int8.supports(nn.Linear(70000, 4), "vnni")


def test_mode_sparse_forced_and_without_a_compiler(monkeypatch):
    monkeypatch.setenv(config.INT8.name, "sparse")
    assert int8.mode() == "sparse"
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    snn = snnconv.convert(net, T=4, calib=torch.rand(8, 3, 8, 8))
    assert [m.mode for m in snn.modules() if isinstance(m, int8.SpikeLayer)] == ["sparse"]
    monkeypatch.setattr(sparse_layer.KERNEL, "value", None)  # as where the build failed
    monkeypatch.setattr(sparse_layer.KERNEL, "why", "RuntimeError: no C compiler found")
    assert not int8.exact.__wrapped__("sparse")
    monkeypatch.setattr(int8, "exact", int8.exact.__wrapped__)
    with pytest.raises(snnconv.ConversionError, match=r"SNNCONV_INT8='sparse'.*no C compiler"):
        int8.mode()


_AVX2 = """
import torch, test_sparse_layer as t
from snnconv.runtime import integer_spikes as int8
t.test_kernel_is_the_float64_layer_bit_for_bit(2, 37, (9, 7), 70, (3, 3), (2, 1), (1, 2), (1, 1), 0.4, True)
times = int8.probe_times()
print(sorted(times), int8.mode())
"""


def test_kernel_built_for_avx2_and_the_mode_probe(tmp_path):
    """On a CPU without VNNI (oneDNN and torch capped at AVX2 in a fresh process, the kernel compiled for
    Haswell): the kernel still equals the float64 layer, and the mode is measured among float32, 'binary'
    and 'sparse' (whichever wins here), never 'vnni'."""
    env = {
        **os.environ,
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "SNNCONV_CACHE": str(tmp_path),
        "PYTHONPATH": os.path.dirname(__file__),
    }
    env.pop(config.INT8.name, None)
    proc = subprocess.run([sys.executable, "-c", _AVX2], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert any(p.name.startswith("sparse_layer_") for p in tmp_path.iterdir())  # built here, for AVX2
    probed, chosen = proc.stdout.strip().splitlines()[-1].rsplit("] ", 1)
    assert "'sparse'" in probed and "'float32'" in probed and chosen in ("sparse", "binary", "None")
