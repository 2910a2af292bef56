"""The ONNX export is the SNN: onnxruntime on the exported graph gives snn(x) (to float32 rounding) and the
same spikes at every neuron, for the models the zoo tests convert and for each int8 arithmetic the SNN's
layers may run (runtime/integer_spikes.py). A few models run in CI; the rest carry the `slow` marker."""

import numpy as np
import pytest
import torch
from nets import TORCHVISION_ZOO, ResCatNet, randomize_bn, record_spikes

import snnconv
from snnconv.export import export_onnx
from snnconv.runtime import integer_spikes as int8

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TV_CI = ["resnet18", "squeezenet1_1"]
TV_SLOW = [n for n in TORCHVISION_ZOO if n not in TV_CI]
TIMM_CI = ["mobilenetv2_035", "tf_mobilenetv3_small_minimal_100"]
TIMM_SLOW = ["test_resnet", "resnet10t", "resnetv2_18", "mobilenetv2_050", "efficientnet_lite0"]


def assert_export_is_snn(snn, x, path):
    """onnxruntime on the export of `snn` against snn(x): the output to 1e-4 of its norm and every neuron's
    spikes (their signs: the values are theta, -theta or 0) equal at every step."""
    export_onnx(snn, path, batch=x.shape[0], spikes=True)
    session = ort.InferenceSession(str(path))
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"x": x.numpy()})))
    y, spikes = record_spikes(snn, lambda: snn(x))
    assert set(spikes) <= set(names)
    moved = {n: int((np.sign(got[n]) != np.sign(s.numpy())).sum()) for n, s in spikes.items()}
    assert not any(moved.values()), {n: k for n, k in moved.items() if k}
    rel = np.linalg.norm(got["y"] - y.numpy()) / np.linalg.norm(y.numpy())
    assert rel <= 1e-4, rel


def _int8_layers(snn) -> int:
    return sum(isinstance(m, int8.SpikeLayer) for m in snn.modules())


def _flatten_net() -> torch.nn.Module:
    """Strided and padded convolutions, a linear layer on flattened spike maps and one on spike vectors."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    ).eval()


# (net, signed) per mode: ResCatNet's convolutions with both kinds of spikes, the linear layers with signed ones
NETS = [("rescat", True), ("rescat", False), ("flatten", True)]


@pytest.mark.parametrize("mode", ["auto", "off", *int8.MODES])
@pytest.mark.parametrize(("net", "signed"), NETS)
def test_export_reproduces_each_int8_arithmetic(net, signed, mode, monkeypatch, tmp_path):
    """Each int8 mode scales its exact integer sums its own way (oneDNN in float32, the emulated modes and
    'sparse' in float64): the export computes the same numbers, not the float layers they stand for."""
    if mode not in ("auto", "off") and not int8.exact(mode):
        pytest.skip(f"int8 mode {mode} does not run on this CPU")
    monkeypatch.setenv("SNNCONV_INT8", mode)
    torch.manual_seed(0)
    model = randomize_bn(ResCatNet(c=16)) if net == "rescat" else _flatten_net()
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(16, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    snn = snnconv.convert(model, T=6, calib=calib, signed_spikes=signed)
    if mode != "off" and int8.mode() is not None:
        assert _int8_layers(snn) >= (2 if net == "rescat" else 3)
    assert_export_is_snn(snn, x, tmp_path / "m.onnx")


def test_export_splits_wide_layers_into_exact_sums(monkeypatch, tmp_path):
    """Layers with more inputs than one exact float32 sum holds are summed over groups of input channels: made to
    happen here on small layers (a lower bound than 2^24), the export still gives the SNN's spikes."""
    if int8.mode() is None:
        pytest.skip("no int8 mode runs here")
    monkeypatch.setattr("snnconv.export._EXACT", 1 << 12)  # 3x3 on signed spikes: 1 input channel per sum
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(16, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    snn = snnconv.convert(_flatten_net(), T=6, calib=calib)
    assert_export_is_snn(snn, x, tmp_path / "m.onnx")


class _CatNorm(torch.nn.Module):
    """A batch norm after a concatenation of spikes (as in DenseNet): not folded, it runs in the SNN."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.norm, self.head = nn.BatchNorm2d(16), nn.Conv2d(16, 4, 3)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.head(torch.relu(self.norm(y))).flatten(1)


def test_export_leaves_the_snn_as_it_was(tmp_path):
    """torch.onnx.export sets its wrapper's mode (train) on every module under it: an unfolded batch norm then ran
    on batch statistics in every later snn(x), which no longer matched the export."""
    torch.manual_seed(0)
    model = randomize_bn(_CatNorm())
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    snn = snnconv.convert(model, T=4, calib=x)
    modes = {name: m.training for name, m in snn.named_modules()}
    before = snn(x)
    assert_export_is_snn(snn, x, tmp_path / "m.onnx")
    assert {name: m.training for name, m in snn.named_modules()} == modes
    assert torch.equal(snn(x), before)


@pytest.mark.parametrize("name", TV_CI + [pytest.param(n, marks=pytest.mark.slow) for n in TV_SLOW])
def test_torchvision_zoo_export_is_the_snn(name, tmp_path, tv_model):
    hw = {"alexnet": 64, "inception_v3": 80}.get(name, 32)  # alexnet's features need 64 (its last pool: 3x3)
    g = torch.Generator().manual_seed(2)
    calib, x = torch.rand(8, 3, hw, hw, generator=g), torch.rand(2, 3, hw, hw, generator=g)
    snn = snnconv.convert(tv_model(name), T=4, calib=calib)
    assert_export_is_snn(snn, x, tmp_path / "m.onnx")


@pytest.mark.parametrize("name", TIMM_CI + [pytest.param(n, marks=pytest.mark.slow) for n in TIMM_SLOW])
def test_timm_export_is_the_snn(name, tmp_path):
    """Depthwise convolutions, ReLU6, TF 'same' padding, residuals: mobile nets were 10-19% off before the int8
    layers exported their own arithmetic."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = 64 if name == "efficientnet_lite0" else 32
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(16, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)
    snn = snnconv.convert(model, T=4, calib=calib)
    assert_export_is_snn(snn, x, tmp_path / "m.onnx")
