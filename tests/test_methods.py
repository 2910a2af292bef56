"""Conversion methods against what their theory states: QCFS is exact at T = L, bias calibration shrinks
the layer error, thresholds follow their statistic."""

import pytest
import torch
import torch.nn as nn
from nets import ResCatNet, randomize_bn

import snnconv
from snnconv import QCFS


def test_qcfs_converts_exactly_at_T_equals_L():
    torch.manual_seed(0)
    L = 8
    ann = nn.Sequential(nn.Linear(10, 64), QCFS(levels=L, threshold=1.7), nn.Linear(64, 5)).double().eval()
    x = torch.randn(512, 10, dtype=torch.float64)
    snn = snnconv.convert(ann, T=L, calib=x)
    neuron = next(iter(snn.neurons().values()))
    assert neuron.threshold.item() == pytest.approx(1.7) and neuron.fixed
    assert torch.allclose(snn(x), ann(x), atol=1e-9)  # the mean over T = L steps is QCFS itself
    snn.T = L + 3  # elsewhere only close
    assert not torch.allclose(snn(x), ann(x), atol=1e-9)


def test_qcfs_deep_net_is_closest_at_T_equals_L():
    """Past the first layer the match is in expectation (deeper inputs vary over time): still, T = L is
    where the SNN comes closest to the QCFS ANN."""
    torch.manual_seed(0)
    L = 4
    ann = nn.Sequential(nn.Linear(10, 64), QCFS(L, 2.0), nn.Linear(64, 64), QCFS(L, 2.0), nn.Linear(64, 5)).eval()
    x = torch.randn(512, 10)
    ref = ann(x)
    snn = snnconv.convert(ann, T=L, calib=x)
    err = {}
    for T in (1, 2, L, 2 * L, 4 * L):
        snn.T = T
        err[T] = ((snn(x) - ref).norm() / ref.norm()).item()
    assert min(err, key=err.get) == L and err[L] < 0.3, err


def test_qcfs_trains_its_threshold():
    act = QCFS(4, 1.0)
    y = act(torch.linspace(-1, 3, 50, requires_grad=True))
    y.sum().backward()
    assert act.threshold.grad is not None and act.threshold.grad.abs() > 0
    assert set(torch.unique(y.detach() / 1.0 * 4).tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def _layer_errors(snn, ann_acts, x):
    rec = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: rec.__setitem__(n, o)) for n, m in snn.neurons().items()]
    snn(x)
    for h in hooks:
        h.remove()

    def channel_gap(n):  # |mean SNN rate - mean ANN activation|, per channel, summed
        rate = rec[n].view(snn.T, -1, *rec[n].shape[1:]).mean(0)
        return (rate - ann_acts[n]).transpose(0, 1).reshape(rate.shape[1], -1).mean(1).abs().sum().item()

    return {n: channel_gap(n) for n in rec}


def test_bias_calibration_reduces_layer_error():
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet())
    calib, x = torch.rand(256, 3, 16, 16), torch.rand(128, 3, 16, 16)
    plain = snnconv.convert(ann, T=4, calib=calib, per_channel=False, bias_calibration=False)
    tuned = snnconv.convert(ann, T=4, calib=calib, per_channel=False, bias_calibration=True)
    assert list(tuned.state_dict()) == list(ann.state_dict())
    assert all(n.bias is not None for n in tuned.neurons().values())
    # the ANN's activation at each neuron, from the prepared graph in ANN mode
    acts = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n, m in plain.neurons().items()]
    plain.graph_module(x)
    for h in hooks:
        h.remove()
    e0, e1 = _layer_errors(plain, acts, x), _layer_errors(tuned, acts, x)  # on inputs not calibrated on
    assert all(e1[n] < e0[n] for n in e0), (e0, e1)


@pytest.mark.parametrize("method,per_channel", [("max", False), ("max", True), ("percentile", False)])
def test_thresholds_follow_their_statistic(method, per_channel):
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).eval()
    x = torch.randn(64, 2, 4, 4)
    snn = snnconv.convert(ann, T=4, calib=x, method=method, per_channel=per_channel, percentile=90.0)
    act = torch.relu(ann[0](x))
    th = next(iter(snn.neurons().values())).threshold
    if method == "max":
        expect = act.amax((0, 2, 3)) if per_channel else act.max()
    else:
        expect = torch.quantile(act.reshape(-1), 0.9)
    assert torch.allclose(th, expect)


@pytest.mark.parametrize("chunk", [None, 3])
def test_readout_delay_drops_leading_steps(chunk):
    ann = randomize_bn(ResCatNet())
    x = torch.rand(8, 3, 16, 16)
    snn = snnconv.convert(ann, T=10, calib=x, readout_delay=4, chunk=chunk)
    steps = snn(x, per_step=True)
    assert torch.allclose(snn(x), steps[4:].mean(0), atol=1e-6)
    snn.T = 3  # shorter than the delay: the last step alone
    assert torch.allclose(snn(x), snn(x, per_step=True)[-1], atol=1e-6)


def _reference_bias(snn, ann_graph, x):
    """Bias calibration the slow way: one full SNN run per neuron layer, in graph order, each correcting
    its layer by the gap between the ANN's and the SNN's per-channel mean (every earlier layer corrected)."""
    gm = snn.graph_module
    order = [
        gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target in dict(snn.neurons())
    ]
    acts = {}
    hooks = [n.register_forward_hook(lambda m, i, o: acts.__setitem__(m, o.double())) for n in order]
    ann_graph(x)
    for h in hooks:
        h.remove()
    for n in order:
        seen = {}
        h = n.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("o", o.double()))
        snn(x)
        h.remove()
        gap = (acts[n].transpose(0, 1).flatten(1).mean(1) - seen["o"].transpose(0, 1).flatten(1).mean(1)).float()
        n.bias = gap if n.bias is None else n.bias + gap


def test_one_pass_bias_calibration_equals_layer_by_layer_reruns():
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet())
    calib = torch.rand(48, 3, 16, 16)
    fast = snnconv.convert(ann, T=4, calib=calib, bias_calibration=True, bias_batches=1)
    slow = snnconv.convert(ann, T=4, calib=calib, bias_calibration=False)
    _reference_bias(slow, slow.graph_module, calib)
    for name, n in fast.neurons().items():
        assert torch.allclose(n.bias, slow.neurons()[name].bias, atol=1e-5), name


def test_bias_calibration_streams_sub_batches_within_the_memory_budget():
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet())
    seen = []

    def record(m, i, o):
        seen.append(o.shape[0])

    snn = snnconv.convert(ann, T=4, calib=torch.rand(16, 3, 16, 16), memory_budget_mb=1e-3)
    first = next(iter(snn.neurons().values()))
    h = first.register_forward_hook(record)
    snnconv.calibrate.calibrate_bias(snn, [torch.rand(6, 3, 16, 16)], None)
    h.remove()
    # one sample per SNN call (T steps at once: the budget holds less than one sample); the ANN pass before
    # each call sees that one sample too
    assert seen == [1, 4] * 6, seen


def test_bias_calibration_sub_batches_hold_what_the_budget_fits():
    """Without a model budget, budget_mb (MiB) sets the sub-batch: as many samples as have their T steps of
    activations (settings.step_bytes_per_sample each step) within it."""
    torch.manual_seed(0)
    snn = snnconv.convert(randomize_bn(ResCatNet()), T=4, calib=torch.rand(16, 3, 16, 16))
    per_sample = snn.settings.step_bytes_per_sample * snn.T
    assert per_sample > 0 and snn.settings.memory_budget_mb is None
    first = next(iter(snn.neurons().values()))
    for fits in (2, 3):
        seen = []
        h = first.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape[0]))
        snnconv.calibrate.calibrate_bias(
            snn, [torch.rand(6, 3, 16, 16)], None, budget_mb=(fits + 0.5) * per_sample / 2**20
        )
        h.remove()
        assert seen == [fits, 4 * fits] * (6 // fits), seen


def test_stats_observer_against_torch_reductions():
    """The calibration observer: per-channel (dim 1) or per-layer max over every batch, and the percentile
    torch.quantile's over all batches' values together."""
    from snnconv.calibrate import Stats, by_channel

    g = torch.Generator().manual_seed(13)
    y4, y2, y1 = torch.rand(6, 3, 4, 5, generator=g), torch.rand(7, 3, generator=g), torch.rand(9, generator=g)
    assert torch.equal(by_channel(y4), y4.permute(1, 0, 2, 3).reshape(3, -1))
    assert torch.equal(by_channel(y2), y2.T) and torch.equal(by_channel(y1), y1.view(1, 9))
    batches = [torch.rand(5, 3, 4, 4, generator=g) * (i + 1) for i in range(3)]
    for per_channel in (True, False):
        stats = Stats(per_channel, 0.9)
        for b in batches:
            stats(b)
        rows = torch.cat([by_channel(b) if per_channel else b.reshape(1, -1) for b in batches], 1)
        mx, q = rows.amax(1), torch.quantile(rows.double(), 0.9, dim=1).float()
        if not per_channel:
            mx, q = mx.reshape(()), q.reshape(())
        assert torch.equal(stats.threshold("max"), mx)
        torch.testing.assert_close(stats.threshold("percentile"), q, rtol=1e-6, atol=0)
        assert stats.threshold("max").shape == ((3,) if per_channel else ())
    long = torch.rand(1, 1 << 21, generator=g)  # long batches: every value counts, none sampled
    stats = Stats(False, 0.9999)
    for part in long.split(1 << 20, 1):
        stats(part)
    exact = torch.quantile(long.double(), 0.9999, dim=1).reshape(())
    torch.testing.assert_close(stats.threshold("percentile").double(), exact, rtol=1e-6, atol=0)
    assert stats.threshold("max") == long.max()


def _rate_code_error(a: torch.Tensor, theta: torch.Tensor, levels: int, v_init: float) -> torch.Tensor:
    """Per row of a [rows, M] float64: the summed squared error of the L-level rate code of each value."""
    th = theta.unsqueeze(1)
    q = th / levels * torch.clamp(torch.floor(a * levels / th + v_init), 0, levels)
    return ((q - a) ** 2).sum(1)


@pytest.mark.parametrize("levels", [2, 4, 16])
def test_threshold_search_picks_the_least_rate_code_error(levels):
    """The histogram search's choice, evaluated exactly on the raw values, is within 1% of the best
    candidate's exact error; at small T it clips well below the percentile threshold."""
    from snnconv.calibrate import SEARCH_SCALES, ClipError

    g = torch.Generator().manual_seed(levels)
    a = torch.distributions.Exponential(torch.tensor([1.0, 3.0, 0.5])).sample((6000,)).T.double()  # [3, M]
    a[:, : a.shape[1] // 3] = 0  # ReLU: a third of the values are zero
    a = a[:, torch.randperm(a.shape[1], generator=g)]
    top = torch.quantile(a, 0.9999, dim=1).float()
    err = ClipError(top, per_channel=True)
    for part in a.split(2500, dim=1):  # two batches [N, C] in the layout of a linear layer's output
        err(part.T.float())
    chosen = err.best_threshold(levels, 0.5).double()
    exact = torch.stack([_rate_code_error(a, s * top.double(), levels, 0.5) for s in SEARCH_SCALES.tolist()])
    assert (_rate_code_error(a, chosen, levels, 0.5) <= 1.01 * exact.min(0).values).all()
    if levels <= 4:
        assert (chosen < 0.8 * top.double()).all()


def test_threshold_search_lowers_the_snn_error_at_small_T():
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet())
    calib, x = torch.rand(256, 3, 16, 16), torch.rand(128, 3, 16, 16)
    ref = ann(x)
    errors = {}
    for method in ("percentile", "search"):
        snn = snnconv.convert(ann, T=4, calib=calib, method=method, bias_calibration=False)
        errors[method] = ((snn(x) - ref).norm() / ref.norm()).item()
    assert errors["search"] < 0.8 * errors["percentile"], errors


def test_signed_spikes_convert_and_round_trip(tmp_path, monkeypatch, signed_reference):
    """Through convert() and the runtime: a signed SNN fed time-major inputs of both signs emits, step by
    step, what the float64 loop of signed neurons gives; keys stay the ANN's; a checkpoint brings it back."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    calib = torch.rand(256, 4, dtype=torch.float64)
    snn = snnconv.convert(ann, T=8, calib=calib, signed_spikes=True, per_channel=False, bias_calibration=False)
    assert list(snn.state_dict()) == list(ann.state_dict())
    x = torch.rand(8, 5, 4, dtype=torch.float64) * 2 - 1  # [T, N, ...], currents of both signs
    per_step = snn(x, time_major=True, per_step=True)
    theta = next(iter(snn.neurons().values())).threshold.item()
    spikes = torch.tensor(signed_reference(ann[0](x).reshape(8, -1).tolist(), theta, 0.5), dtype=torch.float64)
    assert (spikes < 0).any()
    assert torch.allclose(per_step, ann[2](spikes.view(8, 5, 6)), atol=1e-12)
    snnconv.save(snn, tmp_path / "s.safetensors")
    # converted in float64, `snn` has no int8 layers; the float32 reload would get them (signed spikes run
    # int8 too): off here, so the two compare bit for bit
    monkeypatch.setenv("SNNCONV_INT8", "off")
    back = snnconv.load(tmp_path / "s.safetensors", model=nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
    back.load_state_dict(ann.float().state_dict())
    out = snn.float()(x.float(), time_major=True)
    assert back.settings.neuron.signed and torch.equal(back(x.float(), time_major=True), out)
    with pytest.raises(snnconv.ConversionError, match="signed_spikes needs reset 'soft'"):
        snnconv.convert(ann, T=4, calib=calib, signed_spikes=True, reset="hard")


def test_stats_merge_reduces_max_by_max_and_histograms_by_sum(monkeypatch):
    """Stats.merge under torch.distributed, two ranks simulated in one process: rank 1's tensors are recorded,
    then rank 0 merges against them. The merged max and percentile are those of one observer that saw both
    ranks' values: the max and torch.quantile of all of them (up to float rounding)."""
    from snnconv import calibrate, distributed

    g = torch.Generator().manual_seed(5)
    mine, theirs = torch.rand(64, 3, 4, 4, generator=g), torch.rand(64, 3, 4, 4, generator=g) * 5
    rank0, rank1, both = (calibrate.Stats(True, 0.9) for _ in range(3))
    rank0(mine), rank1(theirs), both(mine), both(theirs)
    monkeypatch.setattr(distributed, "active", lambda: True)
    sent = []
    monkeypatch.setattr(distributed, "all_reduce", lambda t, op="sum": sent.append((t.clone(), op)) or t)
    monkeypatch.setattr(distributed, "all_gather", lambda t: sent.append((t.clone(), "gather")) or [t])
    rank1.merge()
    received = iter(sent)

    def all_reduce(t, op="sum"):
        other, their_op = next(received)
        assert op == their_op  # the ranks call the same collectives in the same order
        return torch.maximum(t, other) if op == "max" else t + other

    def all_gather(t):
        other, their_op = next(received)
        assert their_op == "gather"
        return [t, other]

    monkeypatch.setattr(distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed, "all_gather", all_gather)
    rank0.merge()
    assert next(received, None) is None
    assert torch.equal(rank0.max, both.max)
    monkeypatch.setattr(distributed, "active", lambda: False)
    exact = torch.quantile(calibrate.by_channel(torch.cat([mine, theirs])).double(), 0.9, dim=1).float()
    torch.testing.assert_close(rank0.threshold("percentile"), exact, rtol=1e-6, atol=0)
    assert torch.equal(rank0.threshold("percentile"), both.threshold("percentile"))
    assert torch.equal(rank0.histogram.counts, both.histogram.counts)  # the fallback's counts merge too
