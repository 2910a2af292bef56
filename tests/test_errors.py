"""Every unsupported form gives a ConversionError naming the op, the graph node and the user's line."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snnconv
from snnconv import ConversionError


def _net(body):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.ln = nn.LayerNorm(4)
            self.gelu = nn.GELU()

        def forward(self, x):
            return body(self, self.fc(x))

    return Net().eval()


CASES = {  # what cannot work: mixing the samples of a batch, ops of no known meaning, recurrent state
    "mean_over_batch": (lambda s, h: F.relu(h).mean(0, keepdim=True), "mean"),
    "global_mean": (lambda s, h: F.relu(h).mean(), "mean"),
    "batch_index": (lambda s, h: F.relu(h)[0:1], "getitem"),
    "batch_transpose": (lambda s, h: F.relu(h).transpose(0, 1), "transpose"),
    "squeeze_all": (lambda s, h: F.relu(h).unsqueeze(1).squeeze(), "squeeze"),
    "cat_batch": (lambda s, h: torch.cat((h, F.relu(h)), 0), "cat"),
    "unknown_op": (lambda s, h: torch.special.i0(h), "i0"),
    "sort": (lambda s, h: torch.sort(F.gelu(h), -1)[0], "sort"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unsupported_op_names_node_and_line(case):
    body, op = CASES[case]
    with pytest.raises(ConversionError) as info:
        snnconv.convert(_net(body), T=4, calib=torch.randn(8, 4))
    msg = str(info.value)
    assert op in msg, msg
    assert re.search(r"%\w+ : \[num_users=\d+\] = call_", msg), msg  # the graph node
    assert "test_errors.py" in msg and "line" in msg, msg  # the user's source line
    assert "fix:" in msg


def test_every_offending_op_listed_in_one_message():
    body = lambda s, h: torch.special.i0(s.gelu(h)) + F.silu(h).mean(0) + torch.sort(h.softmax(-1), -1)[0]  # noqa: E731
    with pytest.raises(ConversionError) as info:
        snnconv.convert(_net(body), T=4, calib=torch.randn(8, 4))
    summary = str(info.value).splitlines()[0]
    assert "3 op(s)" in summary and "i0" in summary and "mean" in summary and "sort" in summary, summary
    assert "GELU" not in summary and "silu" not in summary and "softmax" not in summary


def test_data_dependent_control_flow():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            if h.sum() > 0:  # data-dependent branch
                return F.relu(h)
            return h

    with pytest.raises(ConversionError) as info:
        snnconv.convert(Net(), T=4, calib=torch.randn(8, 4))
    msg = str(info.value)
    assert "cannot trace" in msg and "if h.sum() > 0" in msg and "test_errors.py" in msg and "fix:" in msg


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"T": 0}, "T must be a positive integer"),
        ({"T": 2.5}, "T must be a positive integer"),
        ({"neuron": "izhikevich"}, "neuron must be"),
        ({"reset": "none"}, "reset must be"),
        ({"method": "mean"}, "method must be"),
        ({"percentile": 150}, "percentile"),
        ({"backend": "triton"}, "backend must be"),
        ({"v_init": 2}, "v_init"),
        ({"passes": ["no_such_pass"]}, "unknown passes"),
        ({"threshold": -1.0}, "threshold must be"),
    ],
)
def test_bad_options(kwargs, fragment):
    kwargs = {"T": 4, **kwargs}
    with pytest.raises(ConversionError, match=fragment):
        snnconv.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), calib=torch.randn(8, 4), **kwargs)


def test_missing_or_empty_calibration():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConversionError, match="no calibration data"):
        snnconv.convert(model, T=4)
    with pytest.raises(ConversionError, match="is empty"):
        snnconv.convert(model, T=4, calib=[])
    with pytest.raises(ConversionError, match="is empty"):
        snnconv.convert(model, T=4, calib=torch.empty(0, 4))
    with pytest.raises(ConversionError, match="NaN"):
        snnconv.convert(model, T=4, calib=torch.tensor([[float("nan")] * 4]))
    with pytest.raises(ConversionError, match=r"nn\.Module"):
        snnconv.convert("model.pth", T=4, calib=torch.randn(8, 4))


def test_bad_inputs_at_run_time():
    snn = snnconv.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), T=4, calib=torch.randn(8, 4))
    with pytest.raises(ConversionError, match="expected 2"):
        snn(torch.randn(2, 3, 4))
    with pytest.raises(ConversionError, match="NaN"):
        snn(torch.full((2, 4), float("inf")))
    with pytest.raises(ConversionError, match="floating point"):
        snn(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ConversionError, match="T must be"):
        snn.T = -3
    snn.step_mode = "s"
    with pytest.raises(ConversionError, match="apply to step_mode 'm'"):
        snn(torch.randn(3, 2, 4), time_major=True)
    snn.step_mode = "x"
    with pytest.raises(ConversionError, match="step_mode"):
        snn(torch.randn(2, 4))


def test_calibration_loader_forms():
    """A tensor, a list of tensors and a DataLoader of (x, y) give the same thresholds."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    x = torch.randn(256, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(256)), batch_size=128)
    ths = [snnconv.convert(model, T=4, calib=c).thresholds() for c in (x, list(x.split(128)), loader)]
    for th in ths[1:]:
        assert all(torch.allclose(th[k], ths[0][k]) for k in th)


def test_calibration_batches_name_the_bad_one():
    """The calibration reader: x from (x, y) pairs, empty batches skipped, `limit` batches at most, and each
    bad batch refused with its index."""
    from snnconv.calibrate import batches

    a, b = torch.randn(3, 4), torch.randn(2, 4)
    got = list(batches([(a, 0), torch.empty(0, 4), [b, 1], a], None))
    assert len(got) == 3 and got[0] is a and got[1] is b and got[2] is a
    assert [len(x) for x in batches(torch.randn(300, 4), None)] == [128, 128, 44]
    assert len(list(batches([a, b, a], 2))) == 2 and len(list(batches([a, b, a], 0))) == 0
    for bad, message in (
        ([a, {"x": a}], "calibration batches that are dicts are not supported; yield x or (x, y)"),
        ([a, b, "text"], "calibration batch 2 is a str, not a tensor"),
        ([a, torch.tensor([[1.0, float("inf")]])], "calibration batch 1 contains NaN or Inf; clean the data first"),
        (3.5, "calib must be a tensor, an iterable of tensors or a DataLoader, got float"),
    ):
        with pytest.raises(ConversionError) as info:
            list(batches(bad, None))
        assert str(info.value) == message


def test_calibration_batch_the_graph_cannot_run_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConversionError) as info:
        snnconv.convert(model, T=4, calib=[torch.randn(3, 4), torch.randn(1, 4), torch.randn(2, 5)])
    with pytest.raises(RuntimeError) as direct:
        model(torch.randn(2, 5))
    assert str(info.value) == (
        f"the converted graph fails on calibration batch 2 of shape (2, 5): RuntimeError: {direct.value} (if the "
        "model itself runs on this input, this is an snnconv bug: please report it with `snnconv inspect`)"
    )
