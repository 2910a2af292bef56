"""Bad inputs across every verb and the API. Each CLI case asserts exit code 2, exactly one line
`snnconv VERB: error: ...` naming the file or argument, no traceback, and an unchanged file system (the
hash of every file, no new files). Hostile checkpoints assert their payload never ran."""

import hashlib
import json
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
from nets import PLAIN
from safetensors import safe_open
from safetensors.torch import save_file

import snnconv
from snnconv.cli import main

NETS = textwrap.dedent("""
    import torch.nn as nn

    class Tiny(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(16, num_classes)

        def forward(self, x):
            return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))

    def tiny(num_classes=10):
        return Tiny(num_classes)

    def raises():
        raise RuntimeError("the factory itself is broken")

    def not_a_module():
        return 42
""")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One folder with a factory module, weights, data and a converted checkpoint, built once."""
    d = tmp_path_factory.mktemp("base")
    (d / "badnets.py").write_text(NETS)
    (d / "broken_syntax.py").write_text("def tiny(:\n    pass\n")
    (d / "raises_on_import.py").write_text("raise RuntimeError('import-time failure')\n")
    sys.path.insert(0, str(d))
    import badnets

    torch.manual_seed(0)
    model = badnets.tiny().eval()
    torch.save(model.state_dict(), d / "w.pth")
    np.save(d / "calib.npy", torch.rand(32, 1, 8, 8).numpy())
    torch.save({"x": torch.rand(20, 1, 8, 8), "y": torch.randint(0, 10, (20,))}, d / "test.pt")
    np.save(d / "labels.npy", np.random.default_rng(0).integers(0, 10, 32))
    snn = snnconv.convert(model, T=4, calib=torch.rand(32, 1, 8, 8), **PLAIN)  # binary: NIR export cases
    snnconv.save(snn, d / "ok.safetensors", source={"factory": "badnets:tiny", "kwargs": {}})
    yield d, model
    sys.path.remove(str(d))


@pytest.fixture()
def work(base, tmp_path, monkeypatch):
    src, model = base
    d = tmp_path / "w"
    shutil.copytree(src, d)
    monkeypatch.chdir(d)
    return d, model


def snapshot(d):
    """path -> sha256 of every file under d (new, removed or changed files all show)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def rewrite_meta(path, out, edit):
    """Copy a checkpoint with its metadata changed by edit(meta) (meta's JSON fields already parsed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["conversion"], meta["source"] = json.loads(meta["conversion"]), json.loads(meta["source"])
    edit(meta)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if v is not None}
    save_file(tensors, str(out), metadata=meta)


def run_cli(d, capsys, argv):
    """main(argv) in-process: (exit code, stderr lines); asserts the file system did not change."""
    before = snapshot(d)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert snapshot(d) == before, f"{argv} changed files: {set(snapshot(d).items()) ^ set(before.items())}"
    return code, err


def assert_one_line(code, err, verb, *fragments):
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert err[0].startswith(f"snnconv {verb}: error: "), err
    assert "Traceback" not in err[0]
    for f in fragments:
        assert f in err[0], (f, err[0])


# ---------------------------------------------------------------------------------------------------------
# hostile checkpoints: loading is never running code the file names


PAYLOAD = "pwned.txt"


def hostile_sources(d):
    """(name, source record) of checkpoints that would run code: each payload would create pwned.txt."""
    (d / "evilmod.py").write_text(f"open({str(d / PAYLOAD)!r}, 'w').write('ran at import')\ndef net():\n    pass\n")
    return [
        ("os.system", {"factory": "os:system", "kwargs": {"command": f"touch {d / PAYLOAD}"}}),
        ("subprocess", {"factory": "subprocess:call", "kwargs": {"args": ["touch", str(d / PAYLOAD)]}}),
        ("builtins.exec", {"factory": "builtins:exec", "kwargs": {"source": f"open('{d / PAYLOAD}', 'w')"}}),
        ("module on sys.path", {"factory": "evilmod:net", "kwargs": {}}),
        ("lookalike package", {"factory": "torchvision_models_evil:net", "kwargs": {}}),
        ("private attribute", {"factory": "torchvision.models:__getattr__", "kwargs": {}}),
        ("pretrained download", {"factory": "torchvision.models:resnet18", "kwargs": {"weights": "DEFAULT"}}),
        ("hub model name", {"factory": "timm:create_model", "kwargs": {"model_name": "hf-hub:evil/net"}}),
        ("checkpoint path", {"factory": "timm:create_model", "kwargs": {"checkpoint_path": "/etc/passwd"}}),
        ("download method", {"factory": "efficientnet_lite_pytorch:EfficientNet.from_pretrained", "kwargs": {}}),
        ("dunder chain", {"factory": "torchvision.models:resnet18.__globals__", "kwargs": {}}),
    ]


@pytest.mark.parametrize("index", range(11))
def test_hostile_factory_never_runs(work, capsys, index):
    d, _ = work
    name, source = hostile_sources(d)[index]
    rewrite_meta(d / "ok.safetensors", d / "evil.safetensors", lambda m: m.update(source=source))
    for verb, argv in [
        ("inspect", ["inspect", "evil.safetensors"]),
        ("run", ["run", "evil.safetensors", "--data", "test.pt"]),
        ("export", ["export", "evil.safetensors", "-o", "evil.onnx"]),
    ]:
        code, err = run_cli(d, capsys, argv)
        assert_one_line(code, err, verb, "evil.safetensors", "--trust-source")
        assert not (d / PAYLOAD).exists(), (name, verb)
    with pytest.raises(snnconv.ConversionError, match="trust_source=True"):
        snnconv.load(d / "evil.safetensors")
    assert not (d / PAYLOAD).exists(), name
    assert "evilmod" not in sys.modules


def test_own_factory_needs_model_or_trust(work, capsys):
    """A checkpoint of the user's own factory loads with --model naming it (recorded kwargs reused) or
    --trust-source; without either it is refused."""
    d, model = work
    code, err = run_cli(d, capsys, ["inspect", "ok.safetensors"])
    assert_one_line(code, err, "inspect", "ok.safetensors", "'badnets:tiny'", "--model")
    assert main(["inspect", "ok.safetensors", "--model", "badnets:tiny"]) == 0
    assert main(["inspect", "ok.safetensors", "--trust-source"]) == 0
    x = torch.rand(3, 1, 8, 8)
    a, b = snnconv.load(d / "ok.safetensors", model=model), snnconv.load(d / "ok.safetensors", trust_source=True)
    assert torch.equal(a(x), b(x))


def test_embedded_export_program_needs_trust(work, capsys, monkeypatch):
    """A checkpoint embedding a .pt2 program is deserialised code: refused unless trusted; torch.export.load
    is never reached (stand-in payload: a torch.export.load that writes the payload file)."""
    d, model = work
    program = torch.export.export(model, (torch.rand(2, 1, 8, 8),), dynamic_shapes=[{0: torch.export.Dim("batch")}])
    torch.export.save(program, d / "m.pt2")
    assert main(["convert", "m.pt2", "--calib", "calib.npy", "-o", "e.safetensors"]) == 0
    real_load = torch.export.load

    def payload(*args, **kwargs):
        (d / PAYLOAD).write_text("ran")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.export, "load", payload)
    code, err = run_cli(d, capsys, ["run", "e.safetensors", "--data", "test.pt"])
    assert_one_line(code, err, "run", "e.safetensors", "torch.export program", "--trust-source")
    with pytest.raises(snnconv.ConversionError, match="trust_source=True"):
        snnconv.load(d / "e.safetensors")
    assert not (d / PAYLOAD).exists()
    assert main(["run", "e.safetensors", "--data", "test.pt", "--trust-source"]) == 0
    assert (d / PAYLOAD).exists()  # trusted: the stand-in loader ran, so the refusal above was real


# ---------------------------------------------------------------------------------------------------------
# the battery: (id, setup(d, monkeypatch) or None, argv, verb, fragments of the one line)


def _save(name, array):
    return lambda d, mp: np.save(d / name, array, allow_pickle=array.dtype == object)


def _write(name, data):
    return lambda d, mp: (d / name).write_bytes(data) if isinstance(data, bytes) else (d / name).write_text(data)


def _mkdir(name):
    return lambda d, mp: (d / name).mkdir()


def _read_only(name):
    """A read-only folder. As root (CI containers) permissions do not stop writes, so creating the
    temporary file there fails the way a read-only folder would, while the real mkstemp runs elsewhere."""

    def setup(d, mp):
        import tempfile

        (d / name).mkdir()
        os.chmod(d / name, 0o555)
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and os.path.basename(os.path.normpath(dir)) == name:
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        mp.setattr(tempfile, "mkstemp", mkstemp)

    return setup


def _tamper(edit, name="t.safetensors"):
    return lambda d, mp: rewrite_meta(d / "ok.safetensors", d / name, edit)


def _settings(**changes):
    def edit(m):
        m["conversion"]["settings"].update(changes)

    return edit


def _drop_tensor(d, mp):
    with safe_open(str(d / "ok.safetensors"), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "conv.weight"}
    save_file(tensors, str(d / "t.safetensors"), metadata=meta)


def _pt2(d, mp):
    import badnets

    program = torch.export.export(
        badnets.tiny().eval(), (torch.rand(2, 1, 8, 8),), dynamic_shapes=[{0: torch.export.Dim("batch")}]
    )
    torch.export.save(program, d / "m.pt2")
    data = (d / "m.pt2").read_bytes()
    (d / "cut.pt2").write_bytes(data[: len(data) // 2])
    (d / "m.pt2").unlink()


def _huge_npy(d, mp):
    """A .npy whose header declares 238 GiB of float32 over a 64-byte payload."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1, 8, 8), }"
    header += " " * (63 - len(header) % 64) + "\n"
    (d / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64))


CONV = ["convert", "badnets:tiny", "--weights", "w.pth"]
OUT = ["-o", "out.safetensors"]
GOOD = ["--calib", "calib.npy", *OUT]
RUN = ["run", "ok.safetensors", "--model", "badnets:tiny"]
EXPORT = ["export", "ok.safetensors", "--model", "badnets:tiny"]
TRUN = ["run", "t.safetensors", "--data", "test.pt", "--trust-source"]
HUGE = "100000,100000,100000"

CASES = [
    # convert: the model and its factory
    ("factory raises on import", None, ["convert", "raises_on_import:tiny", *GOOD], "convert", ["import-time failure"]),
    ("factory syntax error", None, ["convert", "broken_syntax:tiny", *GOOD], "convert", ["syntax error", "line 1"]),
    ("factory module missing", None, ["convert", "nosuch_mod_xyz:net", *GOOD], "convert", ["cannot import"]),
    ("factory raises", None, ["convert", "badnets:raises", *GOOD], "convert", ["badnets:raises", "itself is broken"]),
    ("factory not a module", None, ["convert", "badnets:not_a_module", *GOOD], "convert", ["not an nn.Module"]),
    ("kwargs rejected", None, [*CONV, "--kwargs", '{"depth": 3}', *GOOD], "convert", ["rejected --kwargs", "depth"]),
    ("kwargs wrong type", None, [*CONV, "--kwargs", '{"num_classes": "ten"}', *GOOD], "convert", ["--kwargs"]),
    ("kwargs not an object", None, [*CONV, "--kwargs", "[1, 2]", *GOOD], "convert", ["--kwargs must be a JSON"]),
    ("weights is a folder", _mkdir("wdir"), [*CONV[:-1], "wdir", *GOOD], "convert", ["wdir", "directory"]),
    (
        "corrupt pt2",
        _write("bad.pt2", b"PK\x03\x04" + b"\x00" * 64),
        ["convert", "bad.pt2", *GOOD],
        "convert",
        ["bad.pt2", "not a readable torch.export program"],
    ),
    ("truncated pt2", _pt2, ["convert", "cut.pt2", *GOOD], "convert", ["cut.pt2", "not a readable"]),
    # convert: outputs
    (
        "read-only output folder",
        _read_only("ro"),
        [*CONV, "--calib", "calib.npy", "-o", "ro/o.safetensors"],
        "convert",
        ["ro/o.safetensors", "writ"],
    ),
    (
        "output is a folder",
        _mkdir("sub"),
        [*CONV, "--calib", "calib.npy", "-o", "sub"],
        "convert",
        ["-o sub", "directory"],
    ),
    (
        "output is the calibration data",
        None,
        [*CONV, "--calib", "calib.npy", "-o", "calib.npy"],
        "convert",
        ["-o calib.npy", "also an input"],
    ),
    ("output is the weights", None, [*CONV, "--calib", "calib.npy", "-o", "./w.pth"], "convert", ["also an input"]),
    (
        "output hard-linked to an input",
        lambda d, mp: os.link(d / "calib.npy", d / "hard.npy"),
        [*CONV, "--calib", "calib.npy", "-o", "hard.npy"],
        "convert",
        ["-o hard.npy", "also an input"],
    ),
    (
        "output symlinked to an input",
        lambda d, mp: os.symlink("w.pth", d / "link.pth"),
        [*CONV, "--calib", "calib.npy", "-o", "link.pth"],
        "convert",
        ["-o link.pth", "also an input"],
    ),
    (
        "npy header larger than the file",
        _huge_npy,
        [*CONV, "--calib", "huge.npy", *OUT],
        "convert",
        ["huge.npy", "header declares", "truncated or corrupt"],
    ),
    (
        "output folder missing",
        None,
        [*CONV, "--calib", "calib.npy", "-o", "no/o.safetensors"],
        "convert",
        ["does not exist"],
    ),
    # convert: calibration data
    ("empty npy file", _write("e.npy", b""), [*CONV, "--calib", "e.npy", *OUT], "convert", ["e.npy", "not a readable"]),
    (
        "text file as npy",
        _write("t.npy", b"garbage\n"),
        [*CONV, "--calib", "t.npy", *OUT],
        "convert",
        ["t.npy", "not a readable"],
    ),
    (
        "text file as npz",
        _write("t.npz", b"garbage\n"),
        [*CONV, "--calib", "t.npz", *OUT],
        "convert",
        ["t.npz", "not a readable"],
    ),
    (
        "empty array",
        _save("e.npy", np.zeros((0, 1, 8, 8), np.float32)),
        [*CONV, "--calib", "e.npy", *OUT],
        "convert",
        ["e.npy", "N > 0"],
    ),
    (
        "object array",
        _save("o.npy", np.array([{"a": 1}], dtype=object)),
        [*CONV, "--calib", "o.npy", *OUT],
        "convert",
        ["o.npy", "Python objects"],
    ),
    (
        "string array",
        _save("s.npy", np.array([["a", "b"]])),
        [*CONV, "--calib", "s.npy", *OUT],
        "convert",
        ["s.npy", "expected numbers"],
    ),
    (
        "complex array",
        _save("c.npy", np.ones((4, 1, 8, 8), np.complex64)),
        [*CONV, "--calib", "c.npy", *OUT],
        "convert",
        ["c.npy", "expected numbers"],
    ),
    (
        "object npz",
        lambda d, mp: np.savez(d / "o.npz", x=np.array([{}], dtype=object)),
        [*CONV, "--calib", "o.npz", *OUT],
        "convert",
        ["o.npz", "Python objects"],
    ),
    (
        "npz without x",
        lambda d, mp: np.savez(d / "n.npz", a=np.zeros(3)),
        [*CONV, "--calib", "n.npz", *OUT],
        "convert",
        ["n.npz", "expected arrays 'x'"],
    ),
    ("empty npz file", _write("e.npz", b""), [*CONV, "--calib", "e.npz", *OUT], "convert", ["e.npz", "not a readable"]),
    (
        "1-d data",
        _save("v.npy", np.ones(5, np.float32)),
        [*CONV, "--calib", "v.npy", *OUT],
        "convert",
        ["v.npy", "[N, ...]"],
    ),
    (
        "data the model rejects",
        _save("c3.npy", np.ones((4, 3, 8, 8), np.float32)),
        [*CONV, "--calib", "c3.npy", *OUT],
        "convert",
        ["fails on the calibration data"],
    ),
    (
        "pt data of strings",
        lambda d, mp: torch.save({"x": ["a", "b"]}, d / "s.pt"),
        [*CONV, "--calib", "s.pt", *OUT],
        "convert",
        ["s.pt", "numeric"],
    ),
    # convert: options
    ("T zero", None, [*CONV, *GOOD, "--T", "0"], "convert", ["--T must be a positive integer"]),
    ("T negative", None, [*CONV, *GOOD, "--T", "-3"], "convert", ["--T must be a positive integer"]),
    ("T not a number", None, [*CONV, *GOOD, "--T", "eight"], "convert", ["--T", "invalid int value"]),
    ("percentile zero", None, [*CONV, *GOOD, "--percentile", "0"], "convert", ["--percentile must be"]),
    ("percentile nan", None, [*CONV, *GOOD, "--percentile", "nan"], "convert", ["--percentile must be"]),
    ("v-init above 1", None, [*CONV, *GOOD, "--v-init", "2"], "convert", ["--v-init must be"]),
    ("calib-limit zero", None, [*CONV, *GOOD, "--calib-limit", "0"], "convert", ["--calib-limit must be"]),
    ("unknown option", None, [*CONV, *GOOD, "--frobnicate"], "convert", ["unrecognized arguments: --frobnicate"]),
    ("bad neuron choice", None, [*CONV, *GOOD, "--neuron", "izh"], "convert", ["--neuron", "invalid choice"]),
    ("input shape too large", None, [*CONV, "--input-shape", HUGE, *OUT], "convert", ["--input-shape", "GiB"]),
    ("input shape negative", None, [*CONV, "--input-shape=1,-8,8", *OUT], "convert", ["--input-shape", "positive"]),
    ("input shape garbage", None, [*CONV, "--input-shape", "a,b", *OUT], "convert", ["--input-shape must look like"]),
    # run: labels and data
    (
        "labels 2-d",
        _save("l2.npy", np.zeros((32, 2), np.int64)),
        [*RUN, "--data", "calib.npy", "--labels", "l2.npy"],
        "run",
        ["l2.npy", "shape (32, 2)"],
    ),
    (
        "labels out of range",
        _save("lr.npy", np.full(32, 12)),
        [*RUN, "--data", "calib.npy", "--labels", "lr.npy"],
        "run",
        ["lr.npy", "label 12", "10 outputs"],
    ),
    (
        "labels negative",
        _save("ln.npy", np.full(32, -1)),
        [*RUN, "--data", "calib.npy", "--labels", "ln.npy"],
        "run",
        ["ln.npy", "negative"],
    ),
    (
        "labels fractional",
        _save("lf.npy", np.full(32, 0.5)),
        [*RUN, "--data", "calib.npy", "--labels", "lf.npy"],
        "run",
        ["lf.npy", "whole numbers"],
    ),
    (
        "labels too few",
        _save("l3.npy", np.zeros(3, np.int64)),
        [*RUN, "--data", "calib.npy", "--labels", "l3.npy"],
        "run",
        ["l3.npy", "3 labels for 32 inputs"],
    ),
    (
        "labels object array",
        _save("lo.npy", np.array([None] * 32, dtype=object)),
        [*RUN, "--data", "calib.npy", "--labels", "lo.npy"],
        "run",
        ["lo.npy", "Python objects"],
    ),
    (
        "labels unknown format",
        _write("l.txt", "1\n2\n"),
        [*RUN, "--data", "calib.npy", "--labels", "l.txt"],
        "run",
        ["l.txt", "unknown labels format"],
    ),
    (
        "labels in the data out of range",
        lambda d, mp: torch.save({"x": torch.rand(4, 1, 8, 8), "y": torch.tensor([0, 1, 2, 99])}, d / "d.pt"),
        [*RUN, "--data", "d.pt"],
        "run",
        ["d.pt", "label 99"],
    ),
    ("data empty file", _write("e.npy", b""), [*RUN, "--data", "e.npy"], "run", ["e.npy", "not a readable"]),
    ("data missing", None, [*RUN, "--data", "nope.npy"], "run", ["nope.npy", "no such file"]),
    (
        "data of another shape",
        _save("w9.npy", np.zeros((3, 1, 9, 9), np.float32)),
        [*RUN, "--data", "w9.npy"],
        "run",
        ["w9.npy", "(1, 9, 9)"],
    ),
    # run: outputs and options
    (
        "plot over the labels",
        None,
        [*RUN, "--data", "calib.npy", "--labels", "labels.npy", "--plot", "labels.npy"],
        "run",
        ["--plot labels.npy", "also an input"],
    ),
    (
        "plot over the checkpoint",
        None,
        [*RUN, "--data", "test.pt", "--plot", "ok.safetensors"],
        "run",
        ["also an input"],
    ),
    (
        "plot format unsupported",
        None,
        [*RUN, "--data", "test.pt", "--plot", "acc.xyz"],
        "run",
        ["'xyz'", "unsupported"],
    ),
    ("plot folder missing", None, [*RUN, "--data", "test.pt", "--plot", "no/acc.png"], "run", ["does not exist"]),
    (
        "plot folder read-only",
        _read_only("ro"),
        [*RUN, "--data", "test.pt", "--plot", "ro/acc.png"],
        "run",
        ["ro/acc.png", "writ"],
    ),
    ("T zero on run", None, [*RUN, "--data", "test.pt", "--T", "0"], "run", ["--T must be a positive integer"]),
    ("T negative on run", None, [*RUN, "--data", "test.pt", "--T", "-2"], "run", ["--T must be a positive integer"]),
    (
        "T beyond the step limit",
        None,
        [*RUN, "--data", "test.pt", "--T", "1000000000"],
        "run",
        ["--T must be a positive integer", "1000000000"],
    ),
    (
        "memory budget nan",
        None,
        [*RUN, "--data", "test.pt", "--memory-budget-mb", "nan"],
        "run",
        ["--memory-budget-mb must be"],
    ),
    ("resize zero", None, [*RUN, "--data", "test.pt", "--resize", "0"], "run", ["--resize"]),
    ("batch zero", None, [*RUN, "--data", "test.pt", "--batch", "0"], "run", ["--batch must be"]),
    ("limit zero", None, [*RUN, "--data", "test.pt", "--limit", "0"], "run", ["--limit must be"]),
    (
        "device unknown",
        None,
        [*RUN, "--data", "test.pt", "--device", "gpu0"],
        "run",
        ["--device 'gpu0'", "not a device"],
    ),
    ("device of another kind", None, [*RUN, "--data", "test.pt", "--device", "meta"], "run", ["cpu or cuda"]),
    (
        "device index out of range",
        None,
        [*RUN, "--data", "test.pt", "--device", "cuda:77"],
        "run",
        ["--device cuda:77"],
    ),
    (
        "run factory raises",
        None,
        ["run", "ok.safetensors", "--model", "badnets:raises", "--data", "test.pt"],
        "run",
        ["itself is broken"],
    ),
    (
        "run kwargs rejected",
        None,
        [*RUN, "--kwargs", '{"width": 2}', "--data", "test.pt"],
        "run",
        ["rejected --kwargs"],
    ),
    # tampered checkpoints
    (
        "missing settings",
        _tamper(lambda m: m["conversion"].pop("settings")),
        TRUN,
        "run",
        ["t.safetensors", "conversion.settings is missing"],
    ),
    (
        "negative input shape",
        _tamper(_settings(input_shape=[1, -8, 8])),
        TRUN,
        "run",
        ["t.safetensors", "settings.input_shape must be"],
    ),
    (
        "huge input shape",
        _tamper(_settings(input_shape=[100000, 100000, 100000])),
        TRUN,
        "run",
        ["t.safetensors", "input_shape", "GiB"],
    ),
    (
        "thresholds of the wrong length",
        _tamper(lambda m: m["conversion"]["thresholds"].update({"_snn.relu": [1.0, 2.0, 3.0]})),
        TRUN,
        "run",
        ["t.safetensors", "thresholds._snn.relu has 3 values", "4 channels"],
    ),
    (
        "threshold negative",
        _tamper(lambda m: m["conversion"]["thresholds"].update({"_snn.relu": -1.0})),
        TRUN,
        "run",
        ["t.safetensors", "thresholds._snn.relu must be a positive"],
    ),
    (
        "threshold a string",
        _tamper(lambda m: m["conversion"]["thresholds"].update({"_snn.relu": "big"})),
        TRUN,
        "run",
        ["thresholds._snn.relu"],
    ),
    (
        "thresholds of another graph",
        _tamper(lambda m: m["conversion"].update(thresholds={"other": 1.0})),
        TRUN,
        "run",
        ["t.safetensors", "neurons"],
    ),
    ("T a string", _tamper(_settings(T="8")), TRUN, "run", ["t.safetensors", "settings.T must be", "'8'"]),
    ("T zero in the file", _tamper(_settings(T=0)), TRUN, "run", ["settings.T must be"]),
    (
        "neuron kind unknown",
        _tamper(lambda m: m["conversion"]["settings"]["neuron"].update(kind="izh")),
        TRUN,
        "run",
        ["settings.neuron.kind must be"],
    ),
    (
        "neuron field unknown",
        _tamper(lambda m: m["conversion"]["settings"]["neuron"].update(gain=2)),
        TRUN,
        "run",
        ["settings.neuron must be"],
    ),
    ("unknown pass recorded", _tamper(_settings(passes=["rm_rf"])), TRUN, "run", ["settings.passes must be"]),
    ("backend unknown", _tamper(_settings(backend="triton")), TRUN, "run", ["settings.backend must be"]),
    (
        "conversion not JSON",
        _tamper(lambda m: m.update(conversion="{not json")),
        TRUN,
        "run",
        ["t.safetensors", "corrupt checkpoint metadata"],
    ),
    (
        "metadata nested too deep",
        _tamper(lambda m: m.update(conversion="[" * 100000 + "]" * 100000)),
        TRUN,
        "run",
        ["t.safetensors", "corrupt checkpoint metadata"],
    ),
    ("source not an object", _tamper(lambda m: m.update(source=[1])), TRUN, "run", ["'source' must be a JSON object"]),
    ("weights missing from the file", _drop_tensor, TRUN, "run", ["t.safetensors", "missing keys: conv.weight"]),
    (
        "checkpoint truncated",
        lambda d, mp: (d / "t.safetensors").write_bytes((d / "ok.safetensors").read_bytes()[:300]),
        TRUN,
        "run",
        ["t.safetensors", "not a readable snnconv checkpoint"],
    ),
    ("checkpoint is a folder", _mkdir("t.safetensors"), TRUN, "run", ["t.safetensors", "directory"]),
    # inspect
    (
        "inspect T zero",
        None,
        ["inspect", "ok.safetensors", "--model", "badnets:tiny", "--T", "0"],
        "inspect",
        ["--T must be a positive integer"],
    ),
    (
        "inspect model T zero",
        None,
        ["inspect", "badnets:tiny", "--input-shape", "1,8,8", "--T", "0"],
        "inspect",
        ["--T must be"],
    ),
    ("inspect without a shape", None, ["inspect", "badnets:tiny"], "inspect", ["needs --input-shape"]),
    ("inspect huge shape", None, ["inspect", "badnets:tiny", "--input-shape", HUGE], "inspect", ["GiB"]),
    (
        "inspect syntax error",
        None,
        ["inspect", "broken_syntax:tiny", "--input-shape", "1,8,8"],
        "inspect",
        ["syntax error"],
    ),
    (
        "inspect corrupt pt2",
        _write("bad.pt2", b"garbage"),
        ["inspect", "bad.pt2", "--input-shape", "1,8,8"],
        "inspect",
        ["bad.pt2", "not a readable"],
    ),
    (
        "inspect tampered",
        _tamper(_settings(per_channel="yes")),
        ["inspect", "t.safetensors", "--trust-source"],
        "inspect",
        ["t.safetensors", "settings.per_channel must be"],
    ),
    # export
    (
        "export over a pipe",
        lambda d, mp: os.mkfifo(d / "pipe"),
        [*EXPORT, "-o", "pipe"],
        "export",
        ["-o pipe", "not a regular file"],
    ),
    ("export over the checkpoint", None, [*EXPORT, "-o", "ok.safetensors"], "export", ["also an input"]),
    ("export read-only folder", _read_only("ro"), [*EXPORT, "-o", "ro/m.onnx"], "export", ["ro/m.onnx", "writ"]),
    ("export folder missing", None, [*EXPORT, "-o", "no/m.onnx"], "export", ["does not exist"]),
    ("export to a folder", _mkdir("sub"), [*EXPORT, "-o", "sub"], "export", ["directory"]),
    ("export T zero", None, [*EXPORT, "-o", "m.onnx", "--T", "0"], "export", ["--T must be a positive integer"]),
    ("export T negative", None, [*EXPORT, "-o", "m.onnx", "--T", "-1"], "export", ["--T must be a positive integer"]),
    ("export batch zero", None, [*EXPORT, "-o", "m.onnx", "--batch", "0"], "export", ["--batch must be"]),
    ("export batch too large", None, [*EXPORT, "-o", "m.onnx", "--batch", "1000000000000"], "export", ["GiB"]),
    (
        "export tampered",
        _tamper(_settings(chunk=-2)),
        ["export", "t.safetensors", "--trust-source", "-o", "m.onnx"],
        "export",
        ["settings.chunk must be"],
    ),
    (
        "export format unknown",
        None,
        [*EXPORT, "-o", "m.x", "--format", "tflite"],
        "export",
        ["--format", "invalid choice"],
    ),
    (
        "export nir read-only folder",
        _read_only("ro"),
        [*EXPORT, "-o", "ro/m.nir", "--format", "nir"],
        "export",
        ["ro/m.nir", "writ"],
    ),
    # no verb
    ("no verb", None, [], None, ["required"]),
    ("unknown verb", None, ["frob"], None, ["invalid choice"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(work, capfd, monkeypatch, case):
    d, _ = work
    name, setup, argv, verb, fragments = case
    if setup:
        setup(d, monkeypatch)
    before = snapshot(d)
    capfd.readouterr()
    code = main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2, (name, code, err)
    assert len(err) == 1, (name, err)
    assert err[0].startswith(f"snnconv {verb}: error: " if verb else "snnconv: error: "), err
    assert "Traceback" not in err[0]
    for f in fragments:
        assert f in err[0], (name, f, err[0])
    assert snapshot(d) == before, f"{name} changed files: {set(snapshot(d).items()) ^ set(before.items())}"
    assert not list(d.rglob("*.tmp")), name


# ---------------------------------------------------------------------------------------------------------
# the Python API: the same refusals as snnconv.ConversionError (a ValueError)


def _api_cases(d, model):
    snn = snnconv.load(d / "ok.safetensors", model=model)
    rewrite_meta(d / "ok.safetensors", d / "t.safetensors", _settings(input_shape=[1, -8, 8]))
    os.mkfifo(d / "pipe")  # a pipe (never /dev/null: a regression would replace it)
    state = snn.conversion_state()
    return [
        ("save to a folder", lambda: snnconv.save(snn, d), "is a directory"),
        ("save to a missing folder", lambda: snnconv.save(snn, d / "no" / "x.safetensors"), "does not exist"),
        ("save over a pipe", lambda: snnconv.save(snn, d / "pipe"), "not a regular file"),
        ("load a folder", lambda: snnconv.load(d), "is a directory"),
        ("load a missing file", lambda: snnconv.load(d / "nope.safetensors"), "no such file"),
        ("load with a non-module model", lambda: snnconv.load(d / "ok.safetensors", model="tiny"), "nn.Module"),
        ("load tampered", lambda: snnconv.load(d / "t.safetensors", model=model), "settings.input_shape must be"),
        ("convert T zero", lambda: snnconv.convert(model, T=0, calib=torch.rand(4, 1, 8, 8)), "T must be"),
        ("convert T a string", lambda: snnconv.convert(model, T="8", calib=torch.rand(4, 1, 8, 8)), "T must be"),
        (
            "convert per_channel not bool",
            lambda: snnconv.convert(model, calib=torch.rand(4, 1, 8, 8), per_channel="no"),
            "per_channel must be",
        ),
        (
            "convert tau",
            lambda: snnconv.convert(model, calib=torch.rand(4, 1, 8, 8), neuron="lif", tau=1),
            "tau must be",
        ),
        (
            "convert calib_batches",
            lambda: snnconv.convert(model, calib=torch.rand(4, 1, 8, 8), calib_batches=0),
            "calib_batches must be",
        ),
        ("T set to zero", lambda: setattr(snn, "T", 0), "T must be"),
        (
            "state without thresholds",
            lambda: snn.load_conversion_state({"settings": state["settings"]}),
            "thresholds is missing",
        ),
        (
            "state with a bad setting",
            lambda: snn.load_conversion_state({**state, "settings": {**state["settings"], "readout_delay": -1}}),
            "settings.readout_delay must be",
        ),
        (
            "state with NaN threshold",
            lambda: snn.load_conversion_state({**state, "thresholds": {"_snn.relu": float("nan")}}),
            "thresholds._snn.relu must be",
        ),
    ]


@pytest.mark.parametrize("index", range(16))
def test_api_bad_input(work, index):
    d, model = work
    name, call, fragment = _api_cases(d, model)[index]
    before = snapshot(d)
    with pytest.raises(snnconv.ConversionError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert fragment in str(info.value) and "\n" not in str(info.value), (name, str(info.value))
    assert snapshot(d) == before, name


# ---------------------------------------------------------------------------------------------------------
# real processes: Ctrl-C during a run, and stderr free of torch's logged tracebacks

DRIVER = """
import pathlib, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if CI started us ignoring it
import snnconv.evaluate  # noqa: F401  (the module; snnconv.evaluate the attribute is the function)
from snnconv.cli import main

stats = sys.modules["snnconv.evaluate"]
real = stats.evaluate

def evaluate(*args, **kwargs):  # say when evaluation started, then keep evaluating until interrupted
    pathlib.Path("started").write_text("")
    while True:
        real(*args, **kwargs)

stats.evaluate = evaluate
sys.exit(main(sys.argv[1:]))
"""


def _env(d):
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])}


def test_ctrl_c_exits_130_with_one_line(work):
    import signal
    import subprocess
    import time

    d, _ = work
    (d / "driver.py").write_text(DRIVER)
    before = snapshot(d)
    argv = [*RUN, "--data", "test.pt", "--T", "64", "--plot", "acc.png"]
    proc = subprocess.Popen(
        [sys.executable, "driver.py", *argv],
        cwd=d,
        env=_env(d),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3000):  # up to 5 minutes: importing torch takes minutes on a saturated machine
            if (d / "started").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (d / "started").exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)  # a worker being started under load delays the shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["snnconv run: interrupted"], err
    (d / "started").unlink()
    assert snapshot(d) == before  # no plot, no temporary file


def test_pt2_parse_error_in_a_process_is_one_line(work):
    import subprocess

    d, _ = work
    (d / "bad.pt2").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
    proc = subprocess.run(
        [sys.executable, "-m", "snnconv.cli", "convert", "bad.pt2", "--calib", "calib.npy", "-o", "o.safetensors"],
        cwd=d,
        env=_env(d),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snnconv convert: error: bad.pt2: not a readable"), proc.stderr
    assert not (d / "o.safetensors").exists()


def test_load_rebuilds_without_calibrating(work, monkeypatch):
    """load() takes thresholds from the file: no calibration runs (no random input decides anything), and
    the rebuilt SNN computes exactly what the saved one did."""
    d, model = work
    snn = snnconv.convert(model, T=5, calib=torch.rand(32, 1, 8, 8), per_channel=False, readout_delay=1)
    snnconv.save(snn, d / "a.safetensors", source={"factory": "badnets:tiny", "kwargs": {}})

    def no_calibration(*args, **kwargs):
        raise AssertionError("load() calibrated")

    monkeypatch.setattr(sys.modules["snnconv.convert"], "calibrate", no_calibration)
    again = snnconv.load(d / "a.safetensors", model=model)
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(again(x), snn(x))
    assert again.T == 5 and again.settings.readout_delay == 1 and again.settings.per_channel is False


def test_allow_listed_factory_loads_without_trust(work):
    """A checkpoint naming a torchvision architecture with plain arguments loads as data, no flag needed."""
    tv = pytest.importorskip("torchvision")
    d, _ = work
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).eval()
    snn = snnconv.convert(net, T=2, calib=torch.rand(4, 3, 32, 32))
    snnconv.save(
        snn, d / "r.safetensors", source={"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}}
    )
    again = snnconv.load(d / "r.safetensors")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again(x), snn(x))
