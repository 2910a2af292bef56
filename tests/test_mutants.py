"""Tests added for mutants that survived benchmarks/mutation.py: behaviour the other tests left unpinned."""

import torch
import torch.nn as nn

import snnconv
from snnconv.calibrate import calibrate_bias


def _mlp():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def test_bias_calibration_uses_bias_batches_and_leaves_the_ann_graph_clean():
    ann = _mlp()
    g = torch.Generator().manual_seed(11)
    b1, b2 = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g) * 2 + 1
    one = snnconv.convert(ann, T=4, calib=[b1, b2], bias_calibration=True, bias_batches=1)
    # the same conversion without bias calibration, then bias calibration by hand on the first batch only
    ref = snnconv.convert(ann, T=4, calib=[b1, b2])
    assert not any(n.bias is not None for n in ref.neurons().values())
    calibrate_bias(ref, [b1], None)
    both = snnconv.convert(ann, T=4, calib=[b1, b2], bias_calibration=True, bias_batches=2)
    for name, n in one.neurons().items():
        assert torch.equal(n.bias, ref.neurons()[name].bias), name
    assert any(not torch.equal(n.bias, both.neurons()[k].bias) for k, n in one.neurons().items())
    # no observer or hook is left behind: outside a call the graph is the ANN again
    with torch.no_grad():
        assert torch.allclose(one.graph_module(b2), ann(b2), atol=1e-5)
    assert all(n.observer is None and not n._forward_hooks for n in one.neurons().values())
