"""What `snnconv run` and `snnconv.evaluate` report, checked against independent computations: labels of
class subfolders, MAC counts against torch's FlopCounterMode on the plain ANN, agreement with the ANN at
every T, and a memory check sized for the batch actually run."""

import math
import re
import textwrap

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from nets import ResCatNet, notebook_net, randomize_bn, record_spikes
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import snnconv
from snnconv import datasets, memory
from snnconv.cli import main
from snnconv.evaluate import E_MAC_PJ, counting_graph


class SameConv(nn.Conv2d):
    """TF "same" padding, as EfficientNet-Lite ports write it: a Conv2d subclass whose forward calls F.conv2d
    (traced through: the graph holds the function, not the module)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LiteStyle(nn.Module):
    """EfficientNet-Lite's pieces: same-padded stem, depthwise and pointwise convolutions with BN and ReLU6,
    and a functional linear head (a weight parameter, no nn.Linear)."""

    def __init__(self, classes=12):
        super().__init__()
        self.stem, self.bn0 = SameConv(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.dw, self.bn1 = SameConv(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d(8)
        self.pw, self.bn2 = SameConv(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.w = nn.Parameter(torch.randn(classes, 16) * 0.3)
        self.b = nn.Parameter(torch.zeros(classes))

    def forward(self, x):
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        x = F.relu6(self.bn2(self.pw(x)))
        return F.linear(x.mean((2, 3)), self.w, self.b)


def _flop_macs(model: nn.Module, x: torch.Tensor) -> float:
    """MACs per sample as torch counts them on the plain ANN (FlopCounterMode: 2 FLOPs per MAC)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2 / len(x)


def _lite():
    torch.manual_seed(0)
    return randomize_bn(LiteStyle())


def _efficientnet_lite0():
    """The real EfficientNet-Lite0 architecture (random weights: only its shapes matter here)."""
    ef = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    return ef.EfficientNet.from_name("efficientnet-lite0").eval()


class Upsampler(nn.Module):
    """Transposed convolutions, as a module and as a function on a weight parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c, self.up = nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.w = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)  # [in, out / groups, kH, kW]
        self.fc = nn.Linear(2 * 18 * 18, 5)

    def forward(self, x):
        h = F.relu(self.up(F.relu(self.c(x))))
        return self.fc(F.relu(F.conv_transpose2d(h, self.w)).flatten(1))


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: randomize_bn(ResCatNet()), (3, 8, 8)),
        (lambda: notebook_net(), (8,)),
        (_lite, (3, 15, 13)),  # odd sizes: TF padding differs on each side
        (lambda: Upsampler().eval(), (3, 15, 15)),
        (_efficientnet_lite0, (3, 32, 32)),
    ],
    ids=["rescat", "mlp", "lite-style", "transposed", "efficientnet-lite0"],
)
def test_ann_macs_equal_torch_flop_count(make, shape):
    model = make()
    torch.manual_seed(1)
    x = torch.rand(4, *shape)
    want = _flop_macs(model, x)
    snn = snnconv.convert(model, T=2, calib=x, method="max", bias_calibration=False)
    r = snnconv.evaluate(snn, x, T=2, batch=4, progress=False)
    assert want > 0
    assert r["ann_macs"] == want
    assert r["ann_energy_uj"] == pytest.approx(want * E_MAC_PJ * 1e-6)


class Products(nn.Module):
    """Linear maps spelled as products with a weight (what exported programs and hand-written heads hold),
    beside a product of two activations, which maps no weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w, self.w2 = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(4, 5))
        self.w3, self.b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = x @ self.w
        return torch.addmm(self.b, h, self.w3), torch.mm(h, self.w2.t()), h.matmul(h.t())


def _graph_macs(gm, x) -> float:
    macs = []
    with torch.no_grad():
        counting_graph(gm, lambda name, n, inp: macs.append(n))(x)
    return sum(macs) / len(x)


def test_every_spelling_of_a_weight_product_is_counted():
    x = torch.rand(4, 6)
    gram = _flop_macs(lambda h: h.matmul(h.t()), x @ Products().w)  # activations times activations
    assert gram > 0
    assert _graph_macs(fx.symbolic_trace(Products()), x) == _flop_macs(Products(), x) - gram
    xi = torch.rand(2, 3, 15, 13)
    exported = torch.export.export(_lite(), (xi,))  # aten ops: conv2d, linear; decomposed: convolution, addmm
    for gm in (exported.module(), exported.run_decompositions().module()):
        assert _graph_macs(gm, xi) == _flop_macs(_lite(), xi)


class FunctionalMLP(nn.Module):
    """Two linear maps spelled F.linear on parameters: no module to hook."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 6)), nn.Parameter(torch.rand(16))
        self.w2 = nn.Parameter(torch.randn(7, 16))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2)


def test_snn_operations_of_functional_layers_are_events_times_fan_out():
    """The SNN's second layer reads spikes: one AC per spike and output (7 each); its first reads the analog
    input once per forward (hoisted): 16 x 6 MACs per sample."""
    x = torch.rand(10, 6)
    snn = snnconv.convert(FunctionalMLP().eval(), T=5, calib=x)
    gm, code = snn.graph_module, snn.graph_module.code
    r = snnconv.evaluate(snn, x, T=5, batch=10, progress=False)
    assert snn.graph_module is gm and gm.code == code  # counted on a copy of the graph
    _, spikes = record_spikes(snn, lambda: snn(x))
    (events,) = [(s != 0).sum().item() for s in spikes.values()]
    assert events > 0
    assert r["snn_acs"] == pytest.approx(events * 7 / len(x))
    assert r["snn_macs"] == 16 * 6
    assert r["ann_macs"] == _flop_macs(FunctionalMLP().eval(), x) == 16 * 6 + 7 * 16


def _independent_agreement(model, snn, x, T):
    with torch.no_grad():
        ann = model(x).argmax(1)
        running = snn(x, per_step=True).cumsum(0)  # [T, N, classes]
    top1 = [(running[t].argmax(1) == ann).float().mean().item() * 100 for t in range(T)]
    top5 = [(running[t].topk(5, 1).indices == ann[:, None]).any(1).float().mean().item() * 100 for t in range(T)]
    return top1, top5


def test_evaluate_reports_agreement_with_the_ann_with_and_without_labels():
    torch.manual_seed(0)
    model = nn.Sequential(SameConv(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 12))
    torch.manual_seed(2)
    x = torch.randn(24, 3, 8, 8)
    snn = snnconv.convert(model.eval(), T=6, calib=x)
    top1, top5 = _independent_agreement(model, snn, x, 6)
    assert min(top1) < 100  # the comparison has something to compare
    for y in (None, torch.randint(0, 12, (24,))):
        r = snnconv.evaluate(snn, x, y, T=[3, 6], batch=7, progress=False)
        assert r["agreement_by_T"] == pytest.approx(top1)
        assert r["agreement_top5_by_T"] == pytest.approx(top5)
        assert ("accuracy_by_T" in r) == (y is not None)
    x4 = torch.rand(6, 8)  # fewer than 5 classes: top-1 agreement only
    small = snnconv.convert(notebook_net(), T=3, calib=x4)
    r = snnconv.evaluate(small, x4, T=3, progress=False)
    assert "agreement_top5_by_T" not in r and len(r["agreement_by_T"]) == 3


FACTORY = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def net(classes=130):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes)
        ).eval()
""")


@pytest.fixture()
def work(tmp_path, user_module):
    return tmp_path, user_module("reportnet", FACTORY).net


def _image_folder(root, names, per_class=2, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def _table(out: str) -> dict[str, dict[int, float]]:
    """The report's rows by name: {row: {T: %}}."""
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip().startswith("T="))
    ts = [int(t) for t in re.findall(r"T=(\d+)", lines[i])]
    rows = {}
    for line in lines[i + 1 :]:
        if not line.strip():
            break
        name, values = re.match(r"\s+(.*?)\s+((?:-?[\d.]+\s*)+)$", line).groups()
        rows[name] = dict(zip(ts, map(float, values.split())))
    return rows


def test_integer_subfolders_are_class_indices(work, capsys):
    d, net = work
    _image_folder(d / "photos", ["129", "22", "7"])
    ds = datasets.open_dataset(d / "photos")
    assert sorted({c for _, c in ds.files}) == [7, 22, 129]
    assert all(int(f.parent.name) == c for f, c in ds.files)
    assert main(["convert", "reportnet:net", "--calib", "photos", "-o", "n.safetensors", "--T", "4"]) == 0
    capsys.readouterr()
    assert main(["run", "n.safetensors", "--model", "reportnet:net", "--data", "photos", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    rule = [line for line in out.splitlines() if line.startswith("labels:")]
    assert len(rule) == 1 and "integers" in rule[0] and "129/ -> 129" in rule[0]
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        ann = (net()(x).argmax(1) == y).float().mean().item() * 100
    assert f"(ANN: {ann:.2f}%)" in out


def test_other_subfolder_names_are_numbered_as_imagefolder_does(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    _image_folder(tmp_path, ["dog", "7", "cat", "22"])
    ds = datasets.open_dataset(tmp_path)
    ref = torchvision.datasets.ImageFolder(str(tmp_path))
    assert [(str(f), c) for f, c in ds.files] == [(p, c) for p, c in ref.samples]
    assert "sorted order" in ds.label_rule


def test_run_prints_agreement_per_T_equal_to_an_independent_computation(work, capsys):
    d, net = work
    torch.manual_seed(3)
    x = torch.rand(30, 3, 8, 8)
    np.save(d / "x.npy", x.numpy())
    assert main(["convert", "reportnet:net", "--calib", "x.npy", "-o", "n.safetensors", "--T", "4"]) == 0
    capsys.readouterr()
    argv = ["run", "n.safetensors", "--model", "reportnet:net", "--data", "x.npy", "--T", "2,5", "--workers", "0"]
    assert main([*argv, "--plot", "agree.png"]) == 0  # no labels: agreement only, and a plot of it
    out = capsys.readouterr().out
    assert "labels: none" in out and (d / "agree.png").stat().st_size > 0
    rows = _table(out)
    snn = snnconv.load(d / "n.safetensors", model=net())
    snn.T = 5
    top1, top5 = _independent_agreement(net(), snn, x, 5)
    assert set(rows) == {"SNN top-1 = ANN top-1", "ANN top-1 in SNN top-5"}
    for t in (1, 2, 4, 5):
        assert rows["SNN top-1 = ANN top-1"][t] == pytest.approx(top1[t - 1], abs=0.005)
        assert rows["ANN top-1 in SNN top-5"][t] == pytest.approx(top5[t - 1], abs=0.005)


def test_memory_check_sizes_the_batch_actually_run(work, capsys, monkeypatch):
    """--batch 256 over 20 samples runs batches of 20: a machine that holds those (one time step of
    activations per pass, with the smallest memory budget) but not a batch of 256 runs it."""
    d, net = work
    torch.manual_seed(4)
    np.save(d / "calib.npy", torch.rand(16, 3, 8, 8).numpy())
    assert main(["convert", "reportnet:net", "--calib", "calib.npy", "-o", "n.safetensors"]) == 0
    step = snnconv.load(d / "n.safetensors", model=net()).settings.step_bytes_per_sample
    outputs = 3 * 4 * 130 * 4  # per sample: T=4 steps of 130 outputs, kept, joined and summed, float32
    have = 100 * step
    assert 20 * (step + outputs) < have < 256 * step  # the machine holds a batch of 20, not one of 256
    monkeypatch.setattr(memory, "machine_bytes", lambda device="cpu": have)
    argv = ["run", "n.safetensors", "--model", "reportnet:net", "--T", "4", "--memory-budget-mb", "1e-6"]
    for n in (20, 300):
        np.save(d / f"x{n}.npy", torch.rand(n, 3, 8, 8).numpy())
    capsys.readouterr()
    assert main([*argv, "--data", "x20.npy", "--batch", "256", "--workers", "0"]) == 0
    assert "time chunk 1 of T=4 steps at batch 20" in capsys.readouterr().out
    assert main([*argv, "--data", "x300.npy", "--batch", "256", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--batch 256" in err and "needs" in err and "lower --batch" in err
