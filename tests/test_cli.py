"""The snnconv command end to end, and a battery of bad inputs: each gives exit code 2, a one-line error
naming the problem, and leaves no output file behind."""

import gzip
import io
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import snnconv
from snnconv.cli import main

FACTORY = textwrap.dedent("""
    import torch.nn as nn
    import torch.nn.functional as F

    class TinyResNet(nn.Module):  # torchvision style: conv-bn-relu stem, a basic block, avg pool, fc
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(2)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.avgpool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.relu(self.b2(self.c2(x)) + x)
            return self.fc(self.avgpool(x).flatten(1))

    def tiny_resnet(num_classes=10):
        return TinyResNet(num_classes)

    def mixing_net():  # softmin over dim 0 mixes the samples of a batch: no spiking equivalent
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softmin(dim=0))
""")


@pytest.fixture()
def work(tmp_path, user_module):
    tvstyle = user_module("tvstyle", FACTORY)

    torch.manual_seed(0)
    model = tvstyle.tiny_resnet().eval()
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pth")
    x = torch.rand(64, 1, 8, 8)
    np.save(tmp_path / "calib.npy", x.numpy())
    torch.save({"x": torch.rand(40, 1, 8, 8), "y": torch.randint(0, 10, (40,))}, tmp_path / "test.pt")
    return tmp_path, model


def _files(d):
    return {p.name for p in d.iterdir()}


def test_convert_run_export_onnxruntime(work, capsys, monkeypatch):
    d, model = work
    assert (
        main(
            [
                "convert",
                "tvstyle:tiny_resnet",
                "--weights",
                "w.pth",
                "--calib",
                "calib.npy",
                "--T",
                "6",
                "-o",
                "snn.safetensors",
            ]
        )
        == 0
    )
    assert main(["run", "snn.safetensors", "--data", "test.pt", "--T", "8", "--model", "tvstyle:tiny_resnet"]) == 0
    out = capsys.readouterr().out
    assert "accuracy on 40 samples" in out and "firing rates" in out and "pJ/MAC" in out and "T=8" in out
    assert main(["export", "snn.safetensors", "-o", "snn.onnx", "--batch", "5", "--trust-source"]) == 0
    import onnxruntime as ort

    # the export holds the float layers the int8 ones approximate: compared with the SNN built without them
    # (with them, a membrane that lands within 1e-5 of its threshold may fire one step apart)
    monkeypatch.setenv("SNNCONV_INT8", "off")
    snn = snnconv.load(d / "snn.safetensors", trust_source=True)
    x = torch.rand(5, 1, 8, 8)
    y_ort = ort.InferenceSession(str(d / "snn.onnx")).run(None, {"x": x.numpy()})[0]
    assert np.allclose(y_ort, snn(x).numpy(), atol=1e-5)
    # the saved weights load strictly into the plain ANN, and equal the input weights
    from safetensors.torch import load_file

    plain = type(model)()
    plain.load_state_dict(load_file(str(d / "snn.safetensors")), strict=True)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items())


def test_skip_pass_is_recorded_and_honoured(work):
    """--skip-pass leaves a pass out of the conversion, and the checkpoint rebuilds without it."""
    d, _ = work
    assert (
        main(
            [
                "convert",
                "tvstyle:tiny_resnet",
                "--weights",
                "w.pth",
                "--calib",
                "calib.npy",
                "-o",
                "a.safetensors",
                "--skip-pass",
                "integer_spikes",
                "--skip-pass",
                "inplace_add",
            ]
        )
        == 0
    )
    snn = snnconv.load(d / "a.safetensors", model=work[1])
    names = [n for n, _ in snn.pass_log]
    assert "integer_spikes" not in names and "inplace_add" not in names and "fold_batchnorm" in names
    assert not any(type(m).__name__ == "SpikeLayer" for m in snn.modules())


def test_save_load_roundtrip_identical(work):
    d, model = work
    snn = snnconv.convert(model, T=7, calib=torch.rand(32, 1, 8, 8), bias_calibration=True)
    snn.source = {"factory": "tvstyle:tiny_resnet", "kwargs": {}}
    snnconv.save(snn, d / "a.safetensors")
    again = snnconv.load(d / "a.safetensors", trust_source=True)
    x = torch.rand(9, 1, 8, 8)
    assert torch.equal(again(x), snn(x)) and again.T == 7
    assert list(again.state_dict()) == list(model.state_dict())


def test_onnx_file_convert_and_run(work, capsys):
    pytest.importorskip("onnx2torch")
    d, model = work
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.rand(2, 1, 8, 8),),
        buf,
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    (d / "m.onnx").write_bytes(buf.getvalue())
    assert main(["convert", "m.onnx", "--calib", "calib.npy", "--T", "16", "-o", "o.safetensors"]) == 0
    assert main(["run", "o.safetensors", "--data", "test.pt"]) == 0
    assert "accuracy on 40 samples" in capsys.readouterr().out
    snn = snnconv.load(d / "o.safetensors")  # rebuilt from the ONNX model stored in the checkpoint
    x = torch.rand(16, 1, 8, 8)
    ref = model(x)
    assert ((snn(x) - ref).norm() / ref.norm()) < 0.5


def test_torch_export_program_convert_and_run(work, capsys):
    d, model = work
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=[{0: torch.export.Dim("batch")}])
    torch.export.save(program, d / "m.pt2")
    assert main(["convert", "m.pt2", "--calib", "calib.npy", "--T", "16", "-o", "e.safetensors"]) == 0
    assert main(["run", "e.safetensors", "--data", "test.pt", "--trust-source"]) == 0
    assert "accuracy on 40 samples" in capsys.readouterr().out
    snn = snnconv.load(d / "e.safetensors", trust_source=True)  # rebuilt from the program stored in the checkpoint
    x = torch.rand(16, 1, 8, 8)
    ref = model(x)
    assert ((snn(x) - ref).norm() / ref.norm()) < 0.5
    fixed = torch.export.export(model, (torch.rand(2, 1, 8, 8),))  # batch size baked in: refused, clearly
    torch.export.save(fixed, d / "fixed.pt2")
    assert main(["convert", "fixed.pt2", "--calib", "calib.npy", "-o", "f.safetensors"]) == 2
    assert "fixed batch size 2" in capsys.readouterr().err
    assert not (d / "f.safetensors").exists()


def test_console_script_error_is_one_line(work):
    d, _ = work
    exe = os.path.join(os.path.dirname(sys.executable), "snnconv")
    if not os.path.exists(exe):
        pytest.skip("console script not installed")
    proc = subprocess.run(
        [exe, "convert", "tvstyle:tiny_resnet", "--weights", "nope.pth", "--calib", "calib.npy", "-o", "x.safetensors"],
        capture_output=True,
        text=True,
        cwd=d,
        env={**os.environ, "PYTHONPATH": str(d)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.pth: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def _bad_inputs(d):
    """(name, prepare, argv, fragment of the error)."""

    def write(name, data):
        (d / name).write_bytes(data) if isinstance(data, bytes) else (d / name).write_text(data)

    good = ["--calib", "calib.npy", "-o", "out.safetensors"]
    conv = ["convert", "tvstyle:tiny_resnet", "--weights"]
    cases = [
        ("missing weights", None, [*conv, "missing.pth", *good], "missing.pth: no such file"),
        (
            "corrupt weights",
            lambda: write("bad.pth", b"garbage" + os.urandom(300)),
            [*conv, "bad.pth", *good],
            "not a readable",
        ),
        (
            "truncated weights",
            lambda: write("trunc.pth", (d / "w.pth").read_bytes()[:500]),
            [*conv, "trunc.pth", *good],
            "not a readable",
        ),
        (
            "wrong keys",
            lambda: torch.save({"a.weight": torch.zeros(2)}, d / "wk.pth"),
            [*conv, "wk.pth", *good],
            "missing keys",
        ),
        ("shape mismatch", None, [*conv, "w.pth", "--kwargs", '{"num_classes": 5}', *good], "has shape"),
        ("unknown factory module", None, ["convert", "nosuchpkg.models:net", *good], "cannot import"),
        ("unknown factory function", None, ["convert", "tvstyle:nothing", *good], "no callable"),
        ("factory without colon", None, ["convert", "tvstyle.tiny_resnet", *good], "must look like"),
        ("bad kwargs json", None, [*conv, "w.pth", "--kwargs", "{num:", *good], "--kwargs must be"),
        (
            "pickle running code",
            lambda: write("evil.pth", pickle.dumps(Evil())),
            [*conv, "evil.pth", *good],
            "refusing to unpickle",
        ),
        (
            "NaN calibration",
            lambda: np.save(d / "nan.npy", np.full((4, 1, 8, 8), np.nan, np.float32)),
            [*conv, "w.pth", "--calib", "nan.npy", "-o", "out.safetensors"],
            "NaN",
        ),
        (
            "Inf calibration",
            lambda: np.save(d / "inf.npy", np.full((4, 1, 8, 8), np.inf, np.float32)),
            [*conv, "w.pth", "--calib", "inf.npy", "-o", "out.safetensors"],
            "NaN or Inf",
        ),
        (
            "missing calibration",
            None,
            [*conv, "w.pth", "--calib", "none.npy", "-o", "out.safetensors"],
            "none.npy: no such file",
        ),
        (
            "object npy",
            lambda: np.save(d / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
            [*conv, "w.pth", "--calib", "obj.npy", "-o", "out.safetensors"],
            "holds Python objects",
        ),
        (
            "empty calibration",
            lambda: np.save(d / "empty.npy", np.zeros((0, 1, 8, 8), np.float32)),
            [*conv, "w.pth", "--calib", "empty.npy", "-o", "out.safetensors"],
            "N > 0",
        ),
        (
            "unknown data format",
            lambda: write("c.csv", "1,2,3"),
            [*conv, "w.pth", "--calib", "c.csv", "-o", "out.safetensors"],
            "unknown data format",
        ),
        (
            "truncated idx",
            lambda: write(
                "t-images-idx3-ubyte.gz",
                gzip.compress(
                    b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2 + b"\x00" * 100
                ),
            ),
            [*conv, "w.pth", "--calib", "t-images-idx3-ubyte.gz", "-o", "out.safetensors"],
            "truncated",
        ),
        ("T zero", None, [*conv, "w.pth", "--T", "0", *good], "--T must be a positive"),
        ("T negative", None, [*conv, "w.pth", "--T", "-4", *good], "--T must be a positive"),
        ("output is input", None, [*conv, "w.pth", "--calib", "calib.npy", "-o", "w.pth"], "is also an input"),
        (
            "output folder missing",
            None,
            [*conv, "w.pth", "--calib", "calib.npy", "-o", "no/dir/o.safetensors"],
            "does not exist",
        ),
        ("no calibration", None, [*conv, "w.pth", "-o", "out.safetensors"], "no calibration data"),
        (
            "corrupt onnx",
            lambda: write("bad.onnx", b"garbage" + os.urandom(200)),
            ["convert", "bad.onnx", *good],
            "not a valid ONNX",
        ),
        ("unsupported op", None, ["convert", "tvstyle:mixing_net", *good], "cannot be converted"),
        ("unknown pass", None, [*conv, "w.pth", "--skip-pass", "fold_bn", *good], "not an optional pass"),
        (
            "corrupt checkpoint",
            lambda: write("bad.safetensors", b"garbage" + os.urandom(100)),
            ["run", "bad.safetensors", "--data", "test.pt"],
            "not a readable snnconv checkpoint",
        ),
        (
            "plain weights as checkpoint",
            lambda: __import__("safetensors.torch").torch.save_file(
                {"a": torch.zeros(2)}, str(d / "plain.safetensors")
            ),
            ["run", "plain.safetensors", "--data", "test.pt"],
            "not an snnconv checkpoint",
        ),
    ]
    return cases


def _make_checkpoint(d):
    assert (
        main(["convert", "tvstyle:tiny_resnet", "--weights", "w.pth", "--calib", "calib.npy", "-o", "ok.safetensors"])
        == 0
    )


RUN_CASES = [
    (
        "data shape mismatch",
        lambda d: np.save(d / "wrong.npy", np.zeros((3, 1, 9, 9), np.float32)),
        ["run", "ok.safetensors", "--data", "wrong.npy", "--trust-source"],
        "samples have shape",
    ),
    (
        "label count mismatch",
        lambda d: np.save(d / "lab.npy", np.zeros(3, np.int64)),
        ["run", "ok.safetensors", "--data", "calib.npy", "--labels", "lab.npy", "--trust-source"],
        "3 labels for 64 inputs",
    ),
    (
        "batch zero",
        None,
        ["run", "ok.safetensors", "--data", "test.pt", "--batch", "0", "--trust-source"],
        "--batch must be",
    ),
    pytest.param(
        (
            "cuda without a GPU",
            None,
            ["run", "ok.safetensors", "--data", "test.pt", "--device", "cuda", "--trust-source"],
            "no CUDA device",
        ),
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU"),
        id="cuda without a GPU",
    ),
    ("export over checkpoint", None, ["export", "ok.safetensors", "-o", "ok.safetensors"], "is also an input"),
]


@pytest.mark.parametrize("index", range(27))
def test_bad_input_battery(work, capsys, index):
    d, _ = work
    name, prepare, argv, fragment = _bad_inputs(d)[index]
    if name == "corrupt onnx":
        pytest.importorskip("onnx2torch")
    if prepare:
        prepare()
    before = _files(d)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, name
    assert fragment in err[0], (name, err)
    assert "Traceback" not in "\n".join(err)
    if name != "unsupported op":  # that one lists every offending op under its first line
        assert len(err) == 1, (name, err)
    assert _files(d) == before, f"{name} left files behind: {_files(d) - before}"
    assert not (d / "pwned.txt").exists()


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] if isinstance(c, tuple) else c.values[0][0] for c in RUN_CASES])
def test_bad_run_inputs(work, capsys, case):
    d, _ = work
    _make_checkpoint(d)
    name, prepare, argv, fragment = case
    if prepare:
        prepare(d)
    before = _files(d)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], (name, err)
    assert _files(d) == before


def test_trust_pickle_flag_allows_full_checkpoints(work):
    d, model = work
    torch.save(model, d / "whole.pth")  # a pickled module, not a state_dict
    assert (
        main(
            ["convert", "tvstyle:tiny_resnet", "--weights", "whole.pth", "--calib", "calib.npy", "-o", "o1.safetensors"]
        )
        == 2
    )
    assert (
        main(
            [
                "convert",
                "tvstyle:tiny_resnet",
                "--weights",
                "whole.pth",
                "--calib",
                "calib.npy",
                "-o",
                "o2.safetensors",
                "--trust-pickle",
            ]
        )
        == 0
    )


def test_inspect_lists_rejected_ops(work, capsys):
    assert main(["inspect", "tvstyle:mixing_net", "--input-shape", "1,8,8"]) == 2
    err = capsys.readouterr().err
    assert "Softmin" in err and "why:" in err
    assert main(["inspect", "tvstyle:tiny_resnet", "--input-shape", "1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "fold_batchnorm" in out and "threshold" in out
