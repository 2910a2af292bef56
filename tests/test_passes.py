"""Each optional pass leaves the spikes unchanged (outputs within float tolerance where folding changes
rounding) and the state_dict keys untouched; time chunks give the unchunked outputs with less memory."""

import pytest
import torch
import torch.nn as nn
from nets import ResCatNet, randomize_bn, record_spikes

import snnconv
from snnconv import passes
from snnconv.runtime import integer_spikes as int8
from snnconv.runtime.context import release_scratch


@pytest.mark.parametrize("name", sorted(passes.OPTIONAL - {"integer_spikes"}))  # float32 only: test_spike_conv.py
def test_pass_keeps_spikes_and_keys(name):
    ann = randomize_bn(ResCatNet()).double()
    calib = torch.rand(64, 3, 16, 16, dtype=torch.float64)
    x = torch.rand(16, 3, 16, 16, dtype=torch.float64)
    without = snnconv.convert(ann, T=6, calib=calib, passes=sorted(passes.OPTIONAL - {name}))
    with_ = snnconv.convert(ann, T=6, calib=calib, passes=sorted(passes.OPTIONAL))
    assert list(with_.state_dict()) == list(without.state_dict()) == list(ann.state_dict())
    y0, s0 = record_spikes(without, lambda: without(x, per_step=True))
    y1, s1 = record_spikes(with_, lambda: with_(x, per_step=True))
    assert s0.keys() == s1.keys()
    if name == "fold_batchnorm":  # folding reorders float64 arithmetic: spikes may flip only at exact ties
        for k in s0:
            assert (s0[k] != s1[k]).double().mean() < 1e-3, k
        assert torch.allclose(y0, y1, atol=1e-6)
    else:
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
        assert torch.equal(y0, y1)


def test_every_pass_keeps_keys_and_graph_lints():
    ann = randomize_bn(ResCatNet())
    snn = snnconv.convert(ann, T=4, calib=torch.rand(16, 3, 16, 16))
    names = [n for n, _ in snn.pass_log]
    assert names[0] == "trace" and set(passes.OPTIONAL) <= set(names)
    assert list(snn.state_dict()) == list(ann.state_dict())
    text = snnconv.inspect(snn)
    for n in names[1:]:
        assert n in text
    assert "fold_batchnorm" in text and "+    " in text  # diffs of the graph code


def test_fold_batchnorm_refolds_after_load():
    """After load_state_dict the SNN computes with the new weights: BN is refolded from them."""
    torch.manual_seed(0)  # float32 against float32 (int8 spike layers refold: test_integer_spikes.py)
    a, b = randomize_bn(ResCatNet(), 1), randomize_bn(ResCatNet(), 2)
    x = torch.rand(8, 3, 16, 16)
    # no bias calibration: biases are fitted to the weights converted (a's), not to b's
    snn = snnconv.convert(a, T=4, calib=x, passes=sorted(passes.OPTIONAL - {"integer_spikes"}), bias_calibration=False)
    ref = snnconv.convert(b, T=4, calib=x, passes=[], bias_calibration=False)
    snn.load_state_dict(b.state_dict())
    for (_, n1), (_, n2) in zip(snn.neurons().items(), ref.neurons().items()):
        n1.threshold = n2.threshold.clone()
    assert torch.allclose(snn(x), ref(x), atol=1e-4)


def test_hoisting_runs_stem_once():
    """The ops before the first neuron see the batch N, not T*N."""
    ann = randomize_bn(ResCatNet())
    x = torch.rand(4, 3, 16, 16)
    snn = snnconv.convert(ann, T=8, calib=x)
    seen = []
    conv = snn.stem[0]
    h = conv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    snn(x)
    h.remove()
    assert seen == [] or seen == [4]  # folded into FoldedBN (not called) or called once on N
    folded = [m for m in snn.modules() if type(m).__name__ in ("FoldedBN", "SpikeLayer")]
    batches = []
    hooks = [m.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0])) for m in folded]
    snn(x)
    for h in hooks:
        h.remove()
    assert batches[0] == 4 and 32 in batches


def test_residual_in_the_cpu_kernel_keeps_every_spike():
    """float32 on CPU: the neuron kernel adds the residual itself (passes/residual_into_neuron.py), bit for bit the
    graph's add; both sums of ResCatNet move into their neurons, and the kernel serves every neuron call."""
    from snnconv.runtime import cpu_kernel

    if cpu_kernel.why_not() is not None:
        pytest.skip(f"no CPU kernel: {cpu_kernel.why_not()}")
    ann = randomize_bn(ResCatNet())
    calib, x = torch.rand(64, 3, 16, 16), torch.rand(16, 3, 16, 16)
    without = snnconv.convert(ann, T=6, calib=calib, passes=sorted(passes.OPTIONAL - {"residual_into_neuron"}))
    with_ = snnconv.convert(ann, T=6, calib=calib)
    fused = [n for n in with_.graph_module.graph.nodes if n.meta.get("snn_kind") == "neuron" and len(n.args) == 2]
    assert len(fused) == 2 and "add" not in with_.graph_module.code and "add" in without.graph_module.code
    y0, s0 = record_spikes(without, lambda: without(x, per_step=True))
    y1, s1 = record_spikes(with_, lambda: with_(x, per_step=True))
    assert torch.equal(y0, y1) and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert all(n.calls["torch"] == 0 and n.calls["cpu"] > 0 for n in with_.neurons().values())
    # with int8 layers, an identity shortcut's neuron writes no float spikes: the kernel reads its uint8 code
    sources = [n.residual_source for n in with_.neurons().values() if n.residual_source is not None]
    assert len(sources) == (2 if int8.mode() else 0) and all(s.int8_only for s in sources)
    reference = without(x, per_step=True)  # no hooks: the float spikes really are left unwritten
    assert torch.equal(with_(x, per_step=True), reference)


def test_residual_in_another_layout_is_added_first_and_the_kernel_still_runs():
    """A residual the kernel cannot walk with the input (NCHW beside channels-last, as a 1x1 shortcut on a small map
    can be): the neuron adds it first and the CPU kernel runs the sum; spikes as for the graph's add."""
    from snnconv.runtime import cpu_kernel
    from snnconv.runtime.context import Call, running
    from snnconv.runtime.modules import Neuron
    from snnconv.settings import NeuronConfig

    if cpu_kernel.why_not() is not None:
        pytest.skip(f"no CPU kernel: {cpu_kernel.why_not()}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * 3, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4 * 3, 8, 5, 5, generator=g)  # NCHW
    outs = []
    for args in ((x, r), (x + r,)):
        neuron = Neuron(NeuronConfig(signed=True))
        neuron.threshold = torch.rand(8, generator=g) + 0.5 if not outs else outs[0][1]
        with running(Call(steps=4, input_static=False)):
            outs.append((neuron(*args).clone(), neuron.threshold))
        assert neuron.calls == {"kernel": 0, "cpu": 1, "torch": 0}
    assert (outs[0][0] != 0).any() and torch.equal(outs[0][0], outs[1][0])


def test_residual_made_from_code_where_the_kernel_declines(monkeypatch):
    """A neuron whose residual's neuron wrote only uint8 code, and whose own kernel call declines: it makes the
    float spikes from that code ((u - shift) * theta) and adds them; the output is unchanged."""
    from snnconv.runtime import cpu_kernel

    if cpu_kernel.why_not() is not None or int8.mode() is None:
        pytest.skip("needs the CPU kernel and an int8 mode")
    ann = randomize_bn(ResCatNet())
    calib, x = torch.rand(64, 3, 16, 16), torch.rand(16, 3, 16, 16)
    snn = snnconv.convert(ann, T=6, calib=calib)
    reference = snn(x, per_step=True)
    real = cpu_kernel.multistep
    declined = []

    def decline_residual_code(*args, **kw):
        if kw.get("residual_code") is not None:
            declined.append(1)
            return False
        return real(*args, **kw)

    monkeypatch.setattr(cpu_kernel, "multistep", decline_residual_code)
    assert torch.equal(snn(x, per_step=True), reference) and declined


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_chunked_equals_unchunked(chunk):
    """Identical in float64. In float32 oneDNN may pick another convolution algorithm for another batch
    size, so there the bound is float rounding."""
    for dtype in (torch.float64, torch.float32):
        ann = randomize_bn(ResCatNet()).to(dtype)
        x = torch.rand(8, 3, 16, 16, dtype=dtype)
        snn = snnconv.convert(ann, T=10, calib=x)
        full = snn(x, per_step=True)
        snn.settings.chunk = chunk
        chunked = snn(x, per_step=True)
        if dtype == torch.float64:
            assert torch.equal(chunked, full)
            assert torch.allclose(snn(x), full.mean(0), rtol=0, atol=1e-12)
        else:
            assert (chunked - full).abs().max() < 1e-5


def test_peak_memory_falls_with_chunk_size():
    torch.manual_seed(0)
    ann = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 32 * 32, 10),
    ).eval()
    x = torch.rand(8, 3, 32, 32)
    snn = snnconv.convert(ann, T=32, calib=x, passes=["fold_batchnorm", "hoist_static_input"])
    peaks = {}
    for chunk in (32, 8, 1):
        snn.settings.chunk = chunk
        release_scratch()  # drop buffers sized for the previous chunk
        peaks[chunk] = _torch_peak(snn, x)
    assert peaks[32] > peaks[8] > peaks[1], peaks
    assert peaks[32] > 4 * peaks[1]
    # a memory budget picks the chunk: a budget of about 8 steps' activations gives chunk 8's peak or less
    snn.settings.chunk = None
    snn.settings.memory_budget_mb = 8 * snn.settings.step_bytes_per_sample * len(x) / 2**20
    assert snn._chunk(32, len(x)) == 8
    assert _torch_peak(snn, x) <= peaks[8] * 1.05


def _torch_peak(snn, x) -> int:
    """Peak bytes allocated by torch on the CPU during one forward, from the profiler's allocation events."""
    from torch.profiler import ProfilerActivity, profile

    release_scratch()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        snn(x)
    live = peak = 0
    leaves = (e for e in prof.events() if not e.cpu_children and e.cpu_memory_usage != 0)  # no double counting
    events = sorted(leaves, key=lambda e: e.time_range.start)
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize(
    "layer,bn",
    [
        (lambda: nn.Conv2d(3, 5, 3, bias=False), lambda: nn.BatchNorm2d(5)),
        (lambda: nn.Conv2d(3, 5, 3), lambda: nn.BatchNorm2d(5, affine=False)),
        (lambda: nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last), lambda: nn.BatchNorm2d(5)),
        (lambda: nn.Conv1d(3, 5, 3), lambda: nn.BatchNorm1d(5)),
        (lambda: nn.Linear(3, 5), lambda: nn.BatchNorm1d(5)),
    ],
)
def test_folded_batchnorm_equals_layer_then_bn(layer, bn):
    """FoldedBN against the two modules it folds (float64), for every form of either, and refolded after a
    parameter or statistic changes in place; folded once while nothing changes."""
    from snnconv.runtime.modules import FoldedBN

    torch.manual_seed(4)
    lay, norm = layer().double().eval(), bn().double().eval()
    with torch.no_grad():
        for t in (norm.running_mean, norm.running_var, norm.weight, norm.bias):
            if t is not None:
                t.copy_(torch.rand(5) + 0.5)
    norm.eps = 0.25  # large enough that a wrong sign shows
    x = torch.randn(4, 3, *([6, 6] if isinstance(lay, nn.Conv2d) else [7] if isinstance(lay, nn.Conv1d) else []))
    x = x.double()
    fold = FoldedBN(lay, norm, ("layer", "bn"))
    with torch.no_grad():
        assert torch.allclose(fold(x), norm(lay(x)), rtol=0, atol=1e-12)
        w, b = fold.folded()
        assert fold.folded()[0] is w and b.dtype == w.dtype == torch.float64
        if isinstance(lay, nn.Conv2d):
            cl = not lay.weight.is_contiguous()
            assert w.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        norm.running_mean.add_(0.5)
        lay.weight.mul_(-1.5)
        assert fold.folded()[0] is not w
        assert torch.allclose(fold(x), norm(lay(x)), rtol=0, atol=1e-12)
