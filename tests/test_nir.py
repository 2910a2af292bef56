"""NIR export and import, checked by an independent consumer (Sinabs) and by the round trip."""

import functools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import randomize_bn

import snnconv
from snnconv.data import load_mnist

# binary spikes (what the int8 layers, the CUDA kernel and NIR take) and no bias calibration: fitted by
# each conversion's own SNN run, biases would differ between the paths these tests compare bit for bit
convert_binary = functools.partial(snnconv.convert, signed_spikes=False, bias_calibration=False)


nir = pytest.importorskip("nir")

FLOAT = sorted(snnconv.passes.OPTIONAL - {"integer_spikes"})


class ResAvgNet(nn.Module):
    """BN stem, a residual block, average pooling (module and adaptive function), flatten, linear."""

    def __init__(self, cin=1, c=8, classes=10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.c3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.pool, self.fc = nn.AvgPool2d(2), nn.Linear(c * 4 * 4, classes)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.c2(x))
        x = F.relu(self.c3(y) + x)
        x = F.adaptive_avg_pool2d(self.pool(x), 4)
        return self.fc(torch.flatten(x, 1))


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _mnist():
    here = Path(__file__).resolve().parents[1]
    for root in (here.parent / "shared/data/mnist", Path("/work/shared/data/mnist")):
        if root.is_dir():
            return load_mnist(root, "train"), load_mnist(root, "test")
    pytest.skip("MNIST not found beside the checkout (../shared/data/mnist)")


@pytest.fixture(scope="module")
def mnist_snn():
    """A small MNIST CNN trained for a few hundred steps (seeded), converted at T=8."""
    (x, y), (xt, yt) = _mnist()
    torch.manual_seed(0)
    model = mnist_cnn()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for i in range(150):
        idx = slice((i * 64) % 6000, (i * 64) % 6000 + 64)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    # float32 layers: the exported graph is the SNN's exact arithmetic (int8 layers round their weights)
    return model, convert_binary(model, T=8, calib=x[6000:6512], passes=FLOAT), xt[:64], yt[:64]


def _sinabs_run(graph, x: torch.Tensor, T: int):
    """Run an exported graph in Sinabs: its IAF layers told the two things NIR's IF does not say (binary
    spikes, membrane starting at the metadata's fraction of θ, no lower bound); returns the mean output
    over T and each IAF layer's spike count."""
    sl = pytest.importorskip("sinabs.layers")
    from sinabs.activation import SingleSpike
    from sinabs.nir import from_nir

    n = x.shape[0]
    model = from_nir(graph, batch_size=n)
    v_init = float(graph.metadata["snnconv"]["v_init"])
    counts = {}
    for name, layer in model.named_modules():
        if isinstance(layer, sl.IAFSqueeze):
            layer.spike_fn, layer.min_v_mem = SingleSpike, None
            th = layer.spike_threshold.detach()
            layer.init_state_with_shape((n, *th.shape))
            layer.v_mem.data.copy_((v_init * th).expand(n, *th.shape))
            layer.register_forward_hook(lambda m, i, o, name=name: counts.__setitem__(name, int(o.sum())))
    xs = x.unsqueeze(1).expand(n, T, *x.shape[1:]).reshape(n * T, *x.shape[1:])  # Sinabs: batch-major
    with torch.no_grad():
        y = model(xs)
    y = y[0] if isinstance(y, tuple) else y
    return y.reshape(n, T, -1).mean(1), counts


def _snnconv_counts(snn, x: torch.Tensor) -> dict[str, int]:
    counts = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: counts.__setitem__(n, counts.get(n, 0) + int((o != 0).sum())))
        for n, m in snn.neurons().items()
    ]
    try:
        y = snn(x)
    finally:
        for h in hooks:
            h.remove()
    return y, counts


@pytest.mark.parametrize("T", [8, 32])
@pytest.mark.parametrize("net", ["mnist", "residual"])
def test_sinabs_reproduces_exported_snn(net, T, mnist_snn):
    pytest.importorskip("sinabs")
    if net == "mnist":
        _, snn, x, _ = mnist_snn
    else:
        torch.manual_seed(1)
        x = torch.rand(16, 3, 16, 16)
        snn = convert_binary(randomize_bn(ResAvgNet(cin=3)), T=8, calib=torch.rand(64, 3, 16, 16), passes=FLOAT)
    snn.T = T
    graph = snnconv.to_nir(snn)
    ours, our_counts = _snnconv_counts(snn, x)
    theirs, their_counts = _sinabs_run(graph, x, T)
    ours_by_name = {k.replace(".", "_"): v for k, v in our_counts.items()}
    assert ours_by_name.keys() == their_counts.keys()
    # same spikes, every layer, up to float32 summation order: Sinabs sums NCHW, snnconv channels-last, and
    # CPUs differ in their kernels (capped at AVX2: 1-3 of 400,000 spikes a layer moved; AVX-512: none)
    for name, count in their_counts.items():
        assert abs(ours_by_name[name] - count) <= 1e-4 * count, (name, ours_by_name[name], count)
    assert sum(our_counts.values()) > 0
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    tol = 1e-4 if ours_by_name == their_counts else 1e-2  # a moved spike moves the output by w / T
    torch.testing.assert_close(theirs, ours, rtol=tol, atol=tol * ours.abs().max().item())


def test_mnist_snn_keeps_the_ann_accuracy(mnist_snn):
    """The exported net is a working classifier, not a degenerate one."""
    model, snn, x, y = mnist_snn
    snn.T = 32
    with torch.no_grad():
        ann_acc = (model(x).argmax(1) == y).float().mean().item()
    assert ann_acc > 0.8
    assert (snn(x).argmax(1) == y).float().mean().item() >= ann_acc - 0.1


@pytest.mark.parametrize("passes", [None, FLOAT], ids=["default", "float"])
def test_round_trip_is_exact(passes, tmp_path):
    torch.manual_seed(2)
    calib = torch.rand(64, 1, 16, 16)
    snn = convert_binary(
        randomize_bn(ResAvgNet()), T=8, calib=calib, passes=passes, bias_calibration=True, readout_delay=1
    )
    path = tmp_path / "net.nir"
    snnconv.write_nir(snn, path)
    back = snnconv.from_nir(path, T=8, passes=passes)
    x = torch.rand(8, 1, 16, 16)
    assert torch.equal(back(x), snn(x))
    assert torch.equal(back(x, per_step=True), snn(x, per_step=True))
    for a, b in zip(snn.thresholds().values(), back.thresholds().values()):
        assert torch.equal(a, b)


def test_per_layer_thresholds_round_trip():
    torch.manual_seed(3)
    snn = convert_binary(mnist_cnn().eval(), T=4, calib=torch.rand(32, 1, 28, 28), per_channel=False)
    back = snnconv.from_nir(snnconv.to_nir(snn), T=4)
    assert all(t.dim() == 0 for t in back.thresholds().values())
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(back(x), snn(x))


def test_graph_from_sinabs_runs_in_snnconv():
    """An SNN built in Sinabs (binary IAF spikes, reset by subtraction), exported by Sinabs, imported here."""
    sl = pytest.importorskip("sinabs.layers")
    from sinabs.activation import SingleSpike
    from sinabs.nir import to_nir as sinabs_to_nir

    torch.manual_seed(4)
    n, T = 4, 16
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        sl.IAFSqueeze(batch_size=n, spike_threshold=0.5, spike_fn=SingleSpike),
        sl.SumPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        sl.IAFSqueeze(batch_size=n, spike_threshold=0.8, spike_fn=SingleSpike),
        nn.Linear(12, 5),
    )
    x = torch.rand(n, 1, 8, 8)
    xs = x.unsqueeze(1).expand(n, T, 1, 8, 8).reshape(n * T, 1, 8, 8)
    graph = sinabs_to_nir(net, xs[:n])
    for m in net.modules():
        if isinstance(m, sl.IAFSqueeze):
            m.reset_states()
    with torch.no_grad():
        theirs = net(xs).reshape(n, T, -1)
    snn = snnconv.from_nir(graph, T=T)
    ours = snn(x, per_step=True).transpose(0, 1)
    assert theirs.abs().sum() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_node():
    torch.manual_seed(5)
    pooled = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    snn = convert_binary(pooled.eval(), T=4, calib=torch.rand(16, 1, 8, 8))
    with pytest.raises(snnconv.ConversionError, match=r"NIR export: node .*max pool"):
        snnconv.to_nir(snn)
    lif = convert_binary(mnist_cnn().eval(), T=4, calib=torch.rand(16, 1, 28, 28), neuron="lif")
    with pytest.raises(snnconv.ConversionError, match="only IF neurons"):
        snnconv.to_nir(lif)
    with pytest.raises(snnconv.ConversionError, match="not a readable NIR file"):
        snnconv.from_nir(Path(__file__))


def test_cli_export_nir(tmp_path, monkeypatch, capsys):
    from snnconv.cli import main

    torch.manual_seed(6)
    snn = convert_binary(mnist_cnn().eval(), T=4, calib=torch.rand(32, 1, 28, 28))
    snnconv.save(snn, tmp_path / "snn.safetensors")
    monkeypatch.chdir(tmp_path)
    argv = ["export", "snn.safetensors", "--model", "test_nir:mnist_cnn", "--format", "nir", "-o", "snn.nir"]
    assert main(argv) == 0
    assert "NIR graph" in capsys.readouterr().out
    back = snnconv.from_nir(tmp_path / "snn.nir", T=4)
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(back(x), snn(x))
