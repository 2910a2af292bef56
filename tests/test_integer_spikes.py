"""The integer_spikes pass: convolutions over binary spikes as int8 ops (runtime/integer_spikes.py).

Every test runs on every machine: each int8 mode runs through oneDNN where its op is exact here ('vnni'
needs VNNI, 'binary' AVX2 or better), else emulated (the same integers, layouts and scales, multiplied in
float64), so weight splitting, packing and layouts are checked everywhere; the oneDNN ops themselves are
checked against the emulation wherever they are exact, and the AVX2 kernels (no VNNI) by capping oneDNN's
instruction set in a subprocess."""

import copy
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import ResCatNet, randomize_bn, record_spikes

import snnconv
from snnconv import config, passes
from snnconv.runtime import integer_spikes as int8
from snnconv.runtime.context import Call, running
from snnconv.runtime.modules import Neuron
from snnconv.settings import NeuronConfig, Settings

# binary spikes (signed ones have their own tests here) and no bias calibration: fitted by
# each conversion's own SNN run, biases would differ between the paths these tests compare bit for bit
convert_binary = functools.partial(snnconv.convert, signed_spikes=False, bias_calibration=False)

# each layout through oneDNN where exact here, else emulated: never a skip
MODES = [m if int8.exact(m) else f"{m}-emulated" for m in ("vnni", "binary")] + ["sparse"] * int8.exact("sparse")
# signed spikes: each layout emulated too, so their shifted-by-one arithmetic is checked on every machine
SIGNED_MODES = sorted(set(MODES) | {"vnni-emulated", "binary-emulated"})
FLOAT32_PASSES = sorted(passes.OPTIONAL - {"integer_spikes"})


def test_split_weight_is_16_bit_fixed_point():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 5, 3, 3, dtype=torch.float64, generator=g) * torch.logspace(-3, 2, 16).view(-1, 1, 1, 1)
    w[3] = 0.0
    q, s = int8.split_weight(w)
    hi, lo = q[:, :5].double(), q[:, 5:].double()
    assert q.dtype == torch.int8 and q.abs().max() <= 127  # -128 never appears: VNNI-safe either sign
    back = s.view(-1, 1, 1, 1) * (255 * hi + lo)
    assert torch.all((back - w).abs() <= s.view(-1, 1, 1, 1) / 2 + 1e-18)
    peak = w.abs().flatten(1).amax(1)
    assert torch.all(s[peak > 0] <= peak[peak > 0] / 32512 * (1 + 1e-12))  # relative step <= 1 / (127 * 255 + 127)
    assert torch.equal(back[3], w[3])


def test_fold_input_scale_matches_scaled_input():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=g), torch.rand(2, 4, 7, 7, dtype=torch.float64)
    for theta in (torch.tensor(0.7, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.1):
        scaled = x * (theta.view(1, -1, 1, 1) if theta.dim() else theta)
        assert torch.allclose(
            F.conv2d(x, int8.fold_input_scale(w, theta), padding=1),
            F.conv2d(scaled, w, padding=1),
            rtol=1e-12,
            atol=1e-12,
        )


def test_fold_input_scale_for_flattened_maps():
    """A linear layer on flatten([C, H, W]) spikes: channel c's theta covers features c*H*W .. (c+1)*H*W."""
    g = torch.Generator().manual_seed(2)
    theta = torch.rand(3, dtype=torch.float64) + 0.1
    x, w = torch.rand(5, 3, 2, 4, dtype=torch.float64), torch.randn(7, 24, dtype=torch.float64, generator=g)
    ref = F.linear((x * theta.view(1, -1, 1, 1)).flatten(1), w)
    assert torch.allclose(F.linear(x.flatten(1), int8.fold_input_scale(w, theta)), ref, rtol=1e-12, atol=1e-12)


def test_supports_linear_and_plain_wide_kernels():
    assert int8.supports(nn.Linear(4, 8)) and not int8.supports(nn.Linear(4, 8).double())
    assert int8.supports(nn.Conv2d(4, 8, 3, padding=1, stride=2))
    assert int8.supports(nn.Conv2d(4, 8, 1, stride=2))  # 1x1: a matmul over the positions it reads
    assert int8.supports(nn.Conv2d(4, 8, 1, stride=2), "sparse")  # 'sparse': unstrided over those positions
    assert not int8.supports(nn.Conv2d(4, 8, 1, padding=1)) and not int8.supports(nn.Conv2d(4, 8, 1, dilation=2))
    assert not int8.supports(nn.Conv2d(4, 8, 3, groups=2))
    assert not int8.supports(nn.Conv2d(4, 8, 3, padding="same"))
    assert not int8.supports(nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"))
    assert not int8.supports(nn.Conv2d(4, 8, 3).double())
    assert not int8.supports(nn.Conv1d(4, 8, 3))


def test_split_weight_base_127_for_signed_vnni():
    """Signed spikes in 'vnni' feed 127 * (spike + 1) <= 254: weights split as 127 * hi + lo, 15-bit."""
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q, s = int8.split_weight(w, 127)
    back = s.view(-1, 1, 1, 1) * (127 * q[:, :6].double() + q[:, 6:].double())
    assert q.abs().max() <= 127 and torch.all((back - w).abs() <= s.view(-1, 1, 1, 1) / 2 + 1e-18)
    assert torch.allclose(s, w.abs().flatten(1).amax(1) / (127 * 127 + 63), rtol=1e-12)  # hi <= 127: no overflow


def _spikes(shape, theta: torch.Tensor, signed: bool, rate: float = 0.3) -> torch.Tensor:
    """Random spikes of theta (per channel of [N, C, H, W] maps, else per feature, the last dim) at `rate`;
    signed: as many again of -theta."""
    r = torch.rand(shape)
    sign = (r < rate).float() - ((r >= rate) & (r < 2 * rate) & signed).float()
    return sign * (theta.view(-1, 1, 1) if len(shape) == 4 else theta)


def _base(mode: str, signed: bool) -> int:
    return 127 if signed and mode.startswith("vnni") else 255


def _spike_layer(conv: nn.Module, theta: torch.Tensor, mode: str = MODES[0], signed: bool = False) -> int8.SpikeLayer:
    neuron = Neuron(NeuronConfig(signed=signed))
    neuron.threshold = theta
    layer = int8.SpikeLayer(conv, neuron, ("conv", "neuron"), mode)
    assert layer.signed is signed
    return layer


def _spiking(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer as it runs inside a spiking call (outside one it is the ANN's layer)."""
    with running(Call()):
        return layer(x)


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """Each int8 layout, as the pass would pick it ($SNNCONV_INT8)."""
    monkeypatch.setenv(config.INT8.name, request.param)
    return request.param


@pytest.mark.parametrize(
    "geometry",
    [
        dict(padding=1),
        dict(stride=2, padding=1),
        dict(padding=(0, 2), dilation=2),
        dict(kernel_size=(1, 3), padding=(0, 1), bias=False),
        dict(kernel_size=1),
        dict(kernel_size=1, stride=2),
        dict(kernel_size=1, stride=(2, 3), bias=False),
    ],
)
@pytest.mark.parametrize("signed", [False, True])
def test_spike_conv_within_its_error_bound(geometry, signed, mode):
    """Against float64: each output is off by at most (active inputs) x s/2 (the weights' rounding)
    plus float32 rounding of the result. Signed spikes (-theta too), shifted by one into uint8 with the
    layer over the ones map taken off again: the same bound, plus float32 rounding of that offset
    (in the bias and the border map), at every position, padded borders included."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, **{"kernel_size": 3, **geometry})
    theta = torch.rand(24) + 0.2
    x = _spikes((6, 24, 11, 13), theta, signed).contiguous(memory_format=torch.channels_last)
    out = _spiking(_spike_layer(conv, theta, mode, signed), x)
    ref = F.conv2d(
        x.double(),
        conv.weight.double(),
        None if conv.bias is None else conv.bias.double(),
        conv.stride,
        conv.padding,
        conv.dilation,
    )
    w = int8.fold_input_scale(conv.weight.double(), theta.double())
    _, s = int8.split_weight(w, _base(mode, signed))
    ones = torch.ones_like(conv.weight, dtype=torch.float64)
    active = F.conv2d((x != 0).double(), ones, None, conv.stride, conv.padding, conv.dilation)
    bound = active * s.view(1, -1, 1, 1) / 2 + ref.abs() * 2**-23 + 1e-6
    if signed:  # layer(u) and layer(1) each up to the sum of |weights|: their float32 rounding
        bound = bound + w.abs().flatten(1).sum(1).view(1, -1, 1, 1) * 2**-21
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.all((out.double() - ref).abs() <= bound)
    assert not torch.equal(out.double(), ref)  # it is the int8 path, not a float32 fallback
    if signed and any(conv.padding):  # the borders are where a constant offset would be wrong
        edge = (out.double() - ref).abs()[..., 0, :]
        assert torch.all(edge <= bound[..., 0, :]) and torch.all(ref[..., 0, :].abs() > 0)


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("signed", [False, True])
def test_spike_linear_within_its_error_bound(lead, signed, mode):
    torch.manual_seed(0)
    lin = nn.Linear(40, 12, bias=not signed or len(lead) == 1)  # signed and no bias: the offset is the bias
    theta = torch.rand(40) + 0.2
    x = _spikes((*lead, 40), theta, signed)
    out = _spiking(_spike_layer(lin, theta, mode, signed), x)
    ref = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    w = int8.fold_input_scale(lin.weight.double(), theta.double())
    _, s = int8.split_weight(w, _base(mode, signed))
    bound = (x != 0).double().sum(-1, keepdim=True) * s / 2 + ref.abs() * 2**-23 + 1e-6
    if signed:
        bound = bound + w.abs().sum(1) * 2**-21
    assert out.shape == ref.shape and torch.all((out.double() - ref).abs() <= bound)
    assert not torch.equal(out.double(), ref)


def test_spike_conv_follows_new_weights_and_thresholds(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    theta = torch.rand(8) + 0.5
    sc = _spike_layer(conv, theta, mode)
    x = (torch.rand(4, 8, 6, 6) < 0.5).float()
    for step in range(3):
        th = sc._neuron.threshold
        spikes = x * th.view(1, -1, 1, 1)
        ref = conv(spikes)
        assert torch.allclose(_spiking(sc, spikes), ref, atol=1e-4 * ref.abs().max().item()), step
        if step == 0:
            conv.load_state_dict({"weight": torch.randn(8, 8, 3, 3), "bias": torch.randn(8)})
        else:
            sc._neuron.threshold = torch.rand(8) + 2.0


def test_spike_conv_is_the_layer_outside_spiking_cpu_mode():
    conv = nn.Conv2d(3, 5, 3)
    sc = _spike_layer(conv, torch.ones(3))
    x = (torch.rand(2, 3, 6, 6) < 0.5).float()
    assert torch.equal(sc(x), conv(x))  # no spiking call open: the ANN (calibration)
    conv.double()  # float64 runs as float64
    with running(Call()):
        assert torch.equal(sc(x.double()), conv(x.double()))
    assert list(sc.state_dict()) == []


def _layer_pair(mode: str, geometry: dict | None, signed: bool = False):
    """A conv (geometry) or linear layer (None) in `mode` and in its emulation, with spikes for both."""
    torch.manual_seed(3)
    theta = torch.rand(24) + 0.2
    if geometry is None:
        layer, x = nn.Linear(24, 40), _spikes((20, 24), theta, signed)
    else:
        layer = nn.Conv2d(24, 40, **{"kernel_size": 3, **geometry})
        x = _spikes((6, 24, 11, 13), theta, signed).contiguous(memory_format=torch.channels_last)
    return _spike_layer(layer, theta, mode, signed), _spike_layer(layer, theta, f"{mode}-emulated", signed), x


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(
    "geometry", [dict(padding=1), dict(stride=2, padding=(0, 2), dilation=2), dict(kernel_size=1, stride=2), None]
)
def test_onednn_ops_match_their_emulation(geometry, signed):
    """Where oneDNN's op is exact its integer sums are the emulation's: the outputs differ only by the
    float32 rounding of scale * sum (+ the other half, + bias)."""
    modes = [m for m in ("vnni", "binary") if int8.exact(m)]
    assert modes or not _x86(), "u8 x s8 on 0/1 inputs is exact on every x86 CPU with oneDNN (AVX2's int16 sums)"
    for mode in modes:
        fast, emulated, x = _layer_pair(mode, geometry, signed)
        a, b = _spiking(fast, x), _spiking(emulated, x)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item()), mode


def _x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


_NO_VNNI = """
import json, torch, snnconv
from snnconv import config
from snnconv.runtime import integer_spikes as int8
import test_integer_spikes as t

out = {"vnni": int8.exact("vnni"), "binary": int8.exact("binary"), "diff": []}
if out["binary"]:
    for geometry, signed in [(g, s) for g in (dict(padding=1), dict(stride=2, padding=(0, 2), dilation=2), None)
                             for s in (False, True)]:
        fast, emulated, x = t._layer_pair("binary", geometry, signed)
        a, b = t._spiking(fast, x), t._spiking(emulated, x)
        out["diff"].append(((a - b).abs().max() / b.abs().max()).item())
try:
    import os
    os.environ[config.INT8.name] = "vnni"
    int8.mode()
    out["forced"] = "accepted"
except snnconv.ConversionError as exc:
    out["forced"] = str(exc)
print(json.dumps(out))
"""


def test_integer_paths_without_vnni():
    """oneDNN capped at AVX2 (no VNNI) in a fresh process, as on such a CPU: the probe finds 'vnni'
    inexact and refuses to force it, while 'binary' is exact and equals its emulation, on binary and on
    signed spikes (inputs 0/1/2: a pair sum 2 * 2 * 127 fits AVX2's int16)."""
    if not _x86():
        pytest.xfail("ONEDNN_MAX_CPU_ISA caps x86 instruction sets only")  # pragma: no cover
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.path.dirname(__file__)}
    env.pop(config.INT8.name, None)
    proc = subprocess.run([sys.executable, "-c", _NO_VNNI], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["vnni"] is False and out["binary"] is True, out
    assert len(out["diff"]) == 6 and max(out["diff"]) < 1e-6, out
    assert "not exact" in out["forced"] and "SNNCONV_INT8" in out["forced"], out


def test_int8_mode_setting(monkeypatch):
    monkeypatch.setenv(config.INT8.name, "off")
    assert int8.mode() is None
    monkeypatch.setenv(config.INT8.name, "binary-emulated")
    assert int8.mode() == "binary-emulated"
    snn = convert_binary(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), T=2, calib=torch.rand(4, 8))
    assert [m.mode for m in snn.modules() if isinstance(m, int8.SpikeLayer)] == ["binary-emulated"]
    monkeypatch.setenv(config.INT8.name, "avx9")
    with pytest.raises(snnconv.ConversionError, match="SNNCONV_INT8='avx9'"):
        convert_binary(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), T=2, calib=torch.rand(4, 8))


def _modes(snn) -> list[str]:
    return [m.mode for m in snn.modules() if isinstance(m, int8.SpikeLayer)]


def test_int8_mode_recorded_in_checkpoints_and_rebuilt(tmp_path, monkeypatch):
    """The mode is decided once, at conversion, and recorded: a checkpoint rebuilds its layers in that mode
    (not what auto would pick here), falls back to auto where the mode is not exact on this machine, and
    $SNNCONV_INT8 still forces another; inspect shows it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.rand(5, 8)
    monkeypatch.setenv(config.INT8.name, "binary-emulated")
    snn = convert_binary(net, T=2, calib=torch.rand(4, 8))
    assert snn.settings.int8 == "binary-emulated" and _modes(snn) == ["binary-emulated"]
    snnconv.save(snn, tmp_path / "m.safetensors")
    monkeypatch.setenv(config.INT8.name, "auto")
    again = snnconv.load(tmp_path / "m.safetensors", model=net)
    assert again.settings.int8 == "binary-emulated" and _modes(again) == ["binary-emulated"]
    assert torch.equal(again(x), snn(x))
    assert "'int8': 'binary-emulated'" in snnconv.inspect(again)
    monkeypatch.setattr(int8, "exact", lambda m: m != "binary-emulated")  # as on a CPU where it is not
    monkeypatch.setattr(int8, "mode", lambda: "vnni-emulated")  # what auto picks there
    moved = snnconv.load(tmp_path / "m.safetensors", model=net)
    assert moved.settings.int8 == "vnni-emulated" and _modes(moved) == ["vnni-emulated"]
    monkeypatch.undo()
    monkeypatch.setenv(config.INT8.name, "off")
    forced = snnconv.load(tmp_path / "m.safetensors", model=net)
    assert forced.settings.int8 == "off" and _modes(forced) == []
    float64 = convert_binary(net.double(), T=2, calib=torch.rand(4, 8, dtype=torch.float64))
    assert float64.settings.int8 == "off"  # not a float32 CPU model: nothing to decide


def test_recorded_int8_mode_is_validated():
    with pytest.raises(snnconv.ConversionError, match=r"settings\.int8 must be None, 'off' or one of"):
        Settings.from_dict({**Settings(input_ndim=2, input_shape=(8,)).to_dict(), "int8": "avx9"}, "settings.")


@pytest.fixture(params=SIGNED_MODES)
def signed_mode(request, monkeypatch):
    """Each int8 layout for signed spikes: through oneDNN where exact here, and emulated everywhere."""
    monkeypatch.setenv(config.INT8.name, request.param)
    return request.param


def _float_and_int8(ann, calib, signed=False):
    return (
        convert_binary(ann, T=6, calib=calib, passes=FLOAT32_PASSES, signed_spikes=signed),
        convert_binary(ann, T=6, calib=calib, signed_spikes=signed),
    )


def test_integer_spikes_pass_keeps_spikes_outputs_and_keys(mode):
    _pass_keeps_spikes_outputs_and_keys(mode, signed=False)


def test_integer_spikes_pass_on_signed_spikes(signed_mode):
    """Signed spikes (+-theta): the same agreement, in every layout, emulated ones included; a neuron's
    negative spikes reach the int8 layers (padded 3x3 convolutions: the borders' offsets)."""
    _pass_keeps_spikes_outputs_and_keys(signed_mode, signed=True)


def _pass_keeps_spikes_outputs_and_keys(mode, signed):
    """Same network, float32 with and without the pass: every spike train nearly identical, outputs
    within float tolerance of the layer scale, keys the ANN's."""
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet(c=16))
    calib, x = torch.rand(64, 3, 16, 16), torch.rand(16, 3, 16, 16)
    plain, fast = _float_and_int8(ann, calib, signed)
    assert list(fast.state_dict()) == list(plain.state_dict()) == list(ann.state_dict())
    convs = [m for m in fast.modules() if isinstance(m, int8.SpikeLayer)]
    # a1, a2, b2 (3x3 after neurons), b1 (1x1)
    assert [m.mode for m in convs] == [mode] * 4  # not the stem (it reads the input) nor fc (a cat)
    assert "contiguous" not in fast.graph_module.code  # the NCHW copies before small maps are gone
    assert all(m.signed is signed for m in convs)
    y_plain, s_plain = record_spikes(plain, lambda: plain(x, per_step=True))
    y_fast, s_fast = record_spikes(fast, lambda: fast(x, per_step=True))
    if signed:  # a2 and b2 read negative spikes (a1's neuron, on the pooled stem, measured none)
        assert sum(bool((s_plain[m.names[1]] < 0).any()) for m in convs) >= 2
    for n in plain.neurons():  # measured: 0 to 3e-4 of the spikes flip (float64 vs float32: none)
        flips = (s_plain[n] != s_fast[n]).float().mean().item()
        assert flips < 1e-3, (n, flips)
    y_plain, y_fast = y_plain.mean(0), y_fast.mean(0)
    assert torch.allclose(y_fast, y_plain, atol=1e-2 * y_plain.abs().max().item())
    assert (y_fast.argmax(1) == y_plain.argmax(1)).all()


def _conv_linear_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )


@pytest.mark.parametrize("signed", [False, True])
def test_integer_spikes_step_modes_and_chunks_agree(signed, mode):
    """Integer sums do not depend on how the batch is grouped: with every layer after the stem in int8,
    the spikes and outputs of 's', 'm' and chunked runs are identical (signed spikes: the per-shape
    border maps too)."""
    ann = _conv_linear_net()
    x = torch.rand(8, 3, 16, 16)
    runs = {}
    for tag, chunk, mode in (("m", None, "m"), ("s", None, "s"), ("chunk", 2, "m")):
        snn = convert_binary(ann, T=6, calib=x, chunk=chunk, signed_spikes=signed)
        assert sum(isinstance(m, int8.SpikeLayer) for m in snn.modules()) == 3  # 2 convs, the linear head
        snn.step_mode = mode
        runs[tag] = record_spikes(
            snn,
            lambda snn=snn, mode=mode: (
                torch.stack([snn(x) for _ in range(6)]) if mode == "s" else snn(x, per_step=True)
            ),
        )
    for tag in ("s", "chunk"):
        for n, spikes in runs["m"][1].items():
            assert torch.equal(runs[tag][1][n], spikes), (tag, n)
        assert torch.equal(runs[tag][0], runs["m"][0])
    # the head reads the 8x8 channels-last map in its own order (weights permuted), not a flattened copy
    snn = convert_binary(ann, T=6, calib=x, signed_spikes=signed)
    head = [m for m in snn.modules() if isinstance(m, int8.SpikeLayer) and m.flatten]
    assert len(head) == 1 and "flatten" not in snn.graph_module.code


def test_signed_conv_linear_net_with_and_without_the_pass(signed_mode):
    """Signed spikes through padded 3x3 convolutions (borders) into a linear head reading a channels-last
    map: the SNN with and without the pass, every layout emulated included: spike trains nearly identical
    (the weights' fixed point moves a membrane by ~1e-5 of a layer's scale), and at every step the int8
    head's output is the float64 head on the spikes it read, within the weights' rounding bound."""
    ann, x = _conv_linear_net(), torch.rand(16, 3, 16, 16)
    plain, fast = _float_and_int8(ann, x, True)
    layers = [m for m in fast.modules() if isinstance(m, int8.SpikeLayer)]
    assert [m.mode for m in layers] == [signed_mode] * 3 and all(m.signed for m in layers)
    _, s_plain = record_spikes(plain, lambda: plain(x, per_step=True))
    y_fast, s_fast = record_spikes(fast, lambda: fast(x, per_step=True))
    assert sum(bool((s < 0).any()) for s in s_plain.values()) >= 2
    for n in plain.neurons():  # measured: 0 to 1.4e-4 flip
        flips = (s_plain[n] != s_fast[n]).float().mean().item()
        assert flips < 1e-3, (n, flips)
    last, head = list(fast.neurons())[-1], ann[-1]
    spikes = s_fast[last].double().flatten(1)  # NCHW order, whatever layout the head read
    ref = F.linear(spikes, head.weight.double(), head.bias.double()).view(y_fast.shape)
    w = int8.fold_input_scale(head.weight.double(), fast.neurons()[last].threshold.double())
    _, step = int8.split_weight(w, _base(signed_mode, True))
    active = (spikes != 0).sum(1).view(*y_fast.shape[:2], 1)
    bound = active * step / 2 + w.abs().sum(1) * 2**-21 + ref.abs() * 2**-23 + 1e-6
    assert torch.all((y_fast.double() - ref).abs() <= bound)


@pytest.mark.parametrize("signed", [False, True])
def test_flattening_linear_reads_either_layout(signed, mode):
    """A linear layer on flatten(spikes [N, C, H, W], 1): the same result from an NCHW and a channels-last
    map (read in its memory order against permuted weights), within the weights' rounding bound."""
    torch.manual_seed(0)
    lin, theta = nn.Linear(8 * 6 * 5, 10), torch.rand(8) + 0.2
    x = _spikes((12, 8, 6, 5), theta, signed)
    ref = F.linear(x.double().flatten(1), lin.weight.double(), lin.bias.double())
    w = int8.fold_input_scale(lin.weight.double(), theta.double())
    _, s = int8.split_weight(w, _base(mode, signed))
    bound = (x != 0).double().flatten(1).sum(1, keepdim=True) * s / 2 + ref.abs() * 2**-23 + 1e-6
    if signed:
        bound = bound + w.abs().sum(1) * 2**-21
    neuron = _spike_layer(lin, theta, signed=signed)._neuron
    layer = int8.SpikeLayer(lin, neuron, ("lin", "neuron"), mode, flatten=True)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        out = _spiking(layer, xin)
        assert out.shape == ref.shape and torch.all((out.double() - ref).abs() <= bound)
    assert layer._cache[0][-1] == (8, 6, 5)  # the last call read H, W, C order


def test_integer_spikes_on_an_mlp_and_where_features_are_not_channels(mode):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))
    x = torch.rand(32, 64)
    plain = convert_binary(mlp, T=8, calib=x, passes=FLOAT32_PASSES)
    fast = convert_binary(mlp, T=8, calib=x)
    assert sum(isinstance(m, int8.SpikeLayer) for m in fast.modules()) == 2
    y0, y1 = plain(x), fast(x)
    assert torch.allclose(y1, y0, atol=1e-2 * y0.abs().max().item()) and (y1.argmax(1) == y0.argmax(1)).all()
    # [N, S, F]: thresholds are per dim 1 (S), the linear mixes dim 2: not foldable, left in float32
    seq = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    x3 = torch.rand(8, 4, 16)
    snn = convert_binary(seq, T=4, calib=x3)
    assert not any(isinstance(m, int8.SpikeLayer) for m in snn.modules())
    assert torch.equal(snn(x3), convert_binary(seq, T=4, calib=x3, passes=FLOAT32_PASSES)(x3))


def test_converted_model_deep_copies_after_running(mode):
    torch.manual_seed(0)
    snn = convert_binary(randomize_bn(ResCatNet(c=16)), T=4, calib=torch.rand(8, 3, 16, 16))
    x = torch.rand(4, 3, 16, 16)
    y = snn(x)  # packs the int8 weights
    other = copy.deepcopy(snn)
    assert any(isinstance(m, int8.SpikeLayer) for m in other.modules())
    assert torch.equal(other(x), y)


def test_integer_spikes_skips_what_it_cannot_run(mode):
    ann = randomize_bn(ResCatNet(c=16))
    x = torch.rand(8, 3, 16, 16)
    for snn in (
        convert_binary(ann.double(), T=4, calib=x.double()),  # float64: exact arithmetic wanted
        convert_binary(ann.float(), T=4, calib=x, max_spikes=3),
    ):  # burst spikes are not binary
        assert not any(isinstance(m, int8.SpikeLayer) for m in snn.modules())


def test_one_channel_stem_feeds_the_neurons_channels_last():
    """With one input channel NCHW and NHWC strides coincide and oneDNN returns NCHW: channels_last
    converts the stem's [N, ...] output once, so no layer converts the [T * N, ...] spikes again."""
    ann = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
    x = torch.rand(4, 1, 12, 12)
    for passes_ in (None, FLOAT32_PASSES):
        snn = convert_binary(ann, T=3, calib=x, passes=passes_)
        _, spikes = record_spikes(snn, lambda snn=snn: snn(x))
        first = spikes[next(iter(snn.neurons()))]
        assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()


class _Flattens(nn.Module):
    """Each form of flatten, on the input `s` or on another tensor, with what _flattens_channels says of it."""

    def __init__(self):
        super().__init__()
        self.flat, self.flat2, self.flat12, self.other = nn.Flatten(), nn.Flatten(2), nn.Flatten(1, 2), nn.Flatten()

    def forward(self, s):
        t = s + 1
        return {
            "module": self.flat(s),
            "module_from_2": self.flat2(s),
            "module_to_2": self.flat12(s),
            "module_other": self.other(t),
            "fn": torch.flatten(s, 1),
            "fn_end": torch.flatten(s, 1, -1),
            "fn_kw": torch.flatten(s, start_dim=1),
            "fn_end_kw": torch.flatten(s, 1, end_dim=-1),
            "fn_both_kw": torch.flatten(s, start_dim=1, end_dim=-1),
            "method": s.flatten(1),
            "fn_all": torch.flatten(s),
            "fn_from_2": torch.flatten(s, 2),
            "fn_to_1": torch.flatten(s, 1, 1),
            "fn_to_2": torch.flatten(s, 1, -2),
            "method_other": t.flatten(1),
            "view": s.view(s.shape[0], -1),
        }


_FLATTENS_CHANNELS = {"module", "fn", "fn_end", "fn_kw", "fn_end_kw", "fn_both_kw", "method"}


def test_which_flattens_keep_channels_in_features():
    """Only flatten(s, 1) in its module, function and method forms (end_dim -1, positional or keyword) makes
    every feature one channel's value at one position of s."""
    from snnconv.passes.integer_spikes import _flattens_channels

    gm = torch.fx.symbolic_trace(_Flattens())
    src = next(n for n in gm.graph.nodes if n.op == "placeholder")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert {name for name, node in out.items() if _flattens_channels(gm, node, src)} == _FLATTENS_CHANNELS


@pytest.mark.parametrize(
    "geometry, hw",
    [
        (dict(padding=1), (16, 16)),
        (dict(padding=1, stride=2), (9, 8)),
        (dict(padding=(0, 2), stride=2, dilation=2), (11, 13)),
        (dict(padding=2, kernel_size=5), (4, 4)),  # every output row and column cut: the whole map
        (dict(padding=(3, 1), kernel_size=(7, 3)), (12, 10)),
    ],
)
def test_border_is_subtracted_on_its_ring_only(geometry, hw):
    """Signed spikes: the border map (the taps zero padding cuts off) is nonzero only on a ring of rows and
    columns, and only that ring of the output is touched; the result equals subtracting the whole map."""
    kernel = geometry.pop("kernel_size", 3)
    torch.manual_seed(0)
    conv, theta = nn.Conv2d(6, 10, kernel, **geometry), torch.rand(6) + 0.2
    layer = _spike_layer(conv, theta, "vnni-emulated", signed=True)
    x = _spikes((3, 6, *hw), theta, True).contiguous(memory_format=torch.channels_last)
    _, _, _, border = layer._packed_for((3, 12, *hw), theta)
    full, ring = border
    covered = torch.zeros(full.shape[-2:], dtype=torch.bool)
    for rows, cols, part in ring:
        covered[rows, cols] = True
        assert torch.equal(part, full[:, :, rows, cols])
    assert not full[..., ~covered].any()  # every nonzero is on the ring
    interior = full.shape[-1] * full.shape[-2] - int(covered.sum())
    assert interior > 0 or hw == (4, 4)  # and the ring is not the whole map where an interior exists
    y = _spiking(layer, x)
    layer._cache[2][(3, 12, *hw)] = (layer._cache[2][(3, 12, *hw)][0], (full, [(slice(None), slice(None), full)]))
    assert torch.equal(y, _spiking(layer, x))
