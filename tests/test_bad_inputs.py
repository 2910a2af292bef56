"""Bad inputs across every verb and the API. Each CLI case asserts exit code 2, exactly one line
`snnconv VERB: error: ...` naming the file or argument, no traceback, and an unchanged file system (the
hash of every file, no new files). Hostile checkpoints assert their payload never ran."""

import hashlib
import json
import shutil
import sys
import textwrap

import numpy as np
import pytest
import torch
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
    snn = snnconv.convert(model, T=4, calib=torch.rand(32, 1, 8, 8))
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
    ]


@pytest.mark.parametrize("index", range(9))
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
