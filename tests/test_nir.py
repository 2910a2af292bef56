"""NIR export and import, checked by an interpreter written from NIR's definitions (tests/nir_spec.py), by
consumers (Sinabs, nirtorch) and by the round trip."""

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from nets import randomize_bn
from nir_spec import NIRInterpreter

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
    """Run an exported IF-form graph in Sinabs: its IAF layers told the two things NIR's IF does not say (binary
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
    graph = snnconv.to_nir(snn, neuron="IF")  # Sinabs imports IF, not I / Threshold / Scale
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


def _residual_snn(passes=FLOAT):
    torch.manual_seed(1)
    x = torch.rand(16, 3, 16, 16)
    return convert_binary(randomize_bn(ResAvgNet(cin=3)), T=8, calib=torch.rand(64, 3, 16, 16), passes=passes), x


def _spec_run(graph, x: torch.Tensor, T: int):
    """Per-step outputs [T, N, ...] of the graph run by NIR's definitions, and spikes per neuron layer (a
    Threshold's count under the name of the integrator feeding it, the SNN's neuron)."""
    steps, counts = NIRInterpreter(graph).run(x, T)
    src = {b: a for a, b in graph.edges}
    return steps, {src[k] if isinstance(graph.nodes[k], nir.Threshold) else k: v for k, v in counts.items()}


def _assert_same_run(snn, steps, counts, x, tol):
    """Spike counts per layer as the SNN's and outputs within `tol` of the largest, step by step. Up to float32
    summation order (see the Sinabs test): where a spike moved, it moves its step's output by a whole w·θ, and
    only the mean over T is compared (within w·θ / T)."""
    ours, our_counts = _snnconv_counts(snn, x)
    ours_by_name = {k.replace(".", "_"): v for k, v in our_counts.items()}
    assert ours_by_name.keys() == counts.keys()
    for name, count in counts.items():
        assert abs(ours_by_name[name] - count) <= 1e-4 * count, (name, ours_by_name[name], count)
    assert sum(counts.values()) > 0
    per_step = snn(x, per_step=True)
    scale = per_step.abs().max().item()
    if ours_by_name == counts:
        torch.testing.assert_close(steps.float(), per_step, rtol=tol, atol=tol * scale)
    else:
        tol = 1e-2
    mean = steps[snn.settings.readout_delay :].mean(0).float()
    torch.testing.assert_close(mean, ours, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("passes", [FLOAT, None], ids=["float", "int8"])
@pytest.mark.parametrize("net", ["mnist", "residual"])
def test_nir_file_alone_computes_the_snn(net, passes, mnist_snn):
    """The default export, run by NIR's definitions with nothing from its metadata: the SNN's spikes in every
    layer and its outputs, step by step, up to float32 rounding (int8 layers: the file has the weights they sum)."""
    T = 16
    if net == "mnist":
        model, snn, x, _ = mnist_snn
        if passes is None:
            snn = convert_binary(model, T=T, calib=x[32:], passes=None)
        x = x[:32]
    else:
        snn, x = _residual_snn(passes)
    snn.T = T
    graph = snnconv.to_nir(snn)
    assert not any(isinstance(n, nir.IF) for n in graph.nodes.values())
    steps, counts = _spec_run(graph, x, T)
    _assert_same_run(snn, steps, counts, x, 1e-5)


class _Integrator(nn.Module):  # NIR's I, dt = 1: v += r·x
    def __init__(self, r):
        super().__init__()
        self.r = torch.as_tensor(r)

    def forward(self, x, state=None):
        v = self.r * x if state is None else state + self.r * x
        return v, v


class _Elementwise(nn.Module):  # NIR's Threshold (x > t) and Scale (x ⊙ s)
    def __init__(self, fn, value):
        super().__init__()
        self.fn, self.value = fn, torch.as_tensor(value)

    def forward(self, x):
        return self.fn(x, self.value)


def _nirtorch_module(node) -> nn.Module:
    """Torch modules for the nodes the default form uses, as NIR defines them (batch first)."""
    if isinstance(node, nir.I):
        return _Integrator(node.r)
    if isinstance(node, nir.Threshold):
        return _Elementwise(lambda x, t: (x > t).float(), node.threshold)
    if isinstance(node, nir.Scale):
        return _Elementwise(torch.mul, node.scale)
    if isinstance(node, nir.SumPool2d):
        return nn.AvgPool2d(tuple(node.kernel_size), tuple(node.stride), tuple(node.padding), divisor_override=1)
    if isinstance(node, nir.Flatten):
        return nn.Flatten(node.start_dim + 1, node.end_dim + 1 if node.end_dim >= 0 else node.end_dim)
    if isinstance(node, (nir.Affine, nir.Conv2d)):
        w = torch.as_tensor(node.weight)
        m = nn.Linear(w.shape[1], w.shape[0]) if w.dim() == 2 else nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:])
        if w.dim() == 4:
            m.stride, m.padding, m.dilation = (
                tuple(int(v) for v in a) for a in (node.stride, node.padding, node.dilation)
            )
        m.weight.data, m.bias.data = w, torch.as_tensor(node.bias)
        return m
    return nn.Identity()  # Input, Output


def test_nirtorch_executor_runs_the_default_form():
    """nirtorch's graph executor (what Sinabs and Norse import through), given NIR's node definitions as torch
    modules, runs the default form's reset cycles as the SNN: the convention the file is written for."""
    nirtorch = pytest.importorskip("nirtorch")
    snn, x = _residual_snn()
    model = nirtorch.load(snnconv.to_nir(snn), _nirtorch_module)
    state, steps = None, []
    with torch.no_grad():
        for _ in range(snn.T):
            y, state = model(x, state)
            steps.append(y)
    per_step = snn(x, per_step=True)
    assert per_step.abs().sum() > 0
    torch.testing.assert_close(torch.stack(steps), per_step, rtol=1e-5, atol=1e-5 * per_step.abs().max().item())


def test_if_form_run_by_nir_if_loses_spikes(mnist_snn):
    """neuron="IF": a valid graph of IF nodes, which NIR's IF (fires on v > θ from v = 0) runs with fewer
    spikes than the SNN: what the metadata tells Sinabs, the default form says in the graph."""
    _, snn, x, _ = mnist_snn
    graph = snnconv.to_nir(snn, neuron="IF")
    assert {type(n).__name__ for n in graph.nodes.values()} >= {"IF"}
    assert not any(isinstance(n, (nir.I, nir.Threshold)) for n in graph.nodes.values())
    _, counts = _spec_run(graph, x[:16], snn.T)
    _, ours = _snnconv_counts(snn, x[:16])
    assert all(counts[k.replace(".", "_")] < v for k, v in ours.items())


def test_if_form_writes_and_reads_back(tmp_path):
    snn, x = _residual_snn()
    path = tmp_path / "if.nir"
    snnconv.write_nir(snn, path, neuron="IF")
    graph = nir.read(str(path))
    assert sum(isinstance(n, nir.IF) for n in graph.nodes.values()) == len(snn.neurons())
    back = snnconv.from_nir(path)
    assert torch.equal(back(x), snn(x))
    with pytest.raises(snnconv.ConversionError, match="neuron must be one of"):
        snnconv.to_nir(snn, neuron="LIF")


def test_foreign_integrator_graph_runs_in_snnconv():
    """A graph written by hand in NIR's nodes, IF neurons as I -> Threshold -> Scale(-θ) -> I, spikes of value
    1: from_nir runs it as NIR's definitions do."""
    rng = np.random.default_rng(7)
    f32 = np.float32
    nodes = {
        "input": nir.Input(input_type={"input": np.array([6])}),
        "fc1": nir.Affine(weight=rng.normal(0, 0.6, (5, 6)).astype(f32), bias=rng.normal(0, 0.1, 5).astype(f32)),
        "mem": nir.I(r=np.ones(5, f32)),
        "spike": nir.Threshold(threshold=np.full(5, 0.4, f32)),  # 0.8 - 0.4: starts at 0.4 from firing
        "reset": nir.Scale(scale=np.full(5, -0.8, f32)),
        "fc2": nir.Affine(weight=rng.normal(0, 0.6, (3, 5)).astype(f32), bias=np.zeros(3, f32)),
        "output": nir.Output(output_type={"output": np.array([3])}),
    }
    edges = [("input", "fc1"), ("fc1", "mem"), ("mem", "spike"), ("spike", "reset"), ("reset", "mem")]
    graph = nir.NIRGraph(nodes=nodes, edges=[*edges, ("spike", "fc2"), ("fc2", "output")])
    x, T = torch.rand(32, 6, generator=torch.Generator().manual_seed(8)), 12
    steps, counts = NIRInterpreter(graph).run(x, T)
    snn = snnconv.from_nir(graph, T=T)
    assert counts["spike"] > 0
    torch.testing.assert_close(snn(x, per_step=True), steps.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["I", "IF"])
@pytest.mark.parametrize("passes", [None, FLOAT], ids=["int8", "float"])
def test_round_trip_is_exact(passes, form, tmp_path):
    """from_nir rebuilds the SNN from the file alone, with the layers it had (int8 or float: the metadata
    records the passes), whichever form wrote it."""
    torch.manual_seed(2)
    calib = torch.rand(64, 1, 16, 16)
    snn = convert_binary(
        randomize_bn(ResAvgNet()), T=8, calib=calib, passes=passes, bias_calibration=True, readout_delay=1
    )
    path = tmp_path / "net.nir"
    snnconv.write_nir(snn, path, neuron=form)
    back = snnconv.from_nir(path)
    assert back.T == snn.T and back.settings.passes == snn.settings.passes
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
    x = torch.rand(4, 1, 28, 28)
    for form, node in (("I", nir.I), ("IF", nir.IF)):
        argv = ["export", "snn.safetensors", "--model", "test_nir:mnist_cnn", "--format", "nir", "-o", "snn.nir"]
        assert main([*argv, "--nir-neuron", form]) == 0
        assert "NIR graph" in capsys.readouterr().out
        nodes = nir.read(tmp_path / "snn.nir").nodes.values()
        assert sum(isinstance(n, node) for n in nodes) == len(snn.neurons()), form
        back = snnconv.from_nir(tmp_path / "snn.nir", T=4)
        assert torch.equal(back(x), snn(x)), form
