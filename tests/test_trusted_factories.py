"""A checkpoint names its ANN's constructor; the file is data, so only listed model constructors run.

The walk: every callable reachable as `module:attr` or `module:attr.attr` from every module of the allow-listed
model libraries (timm, torchvision.models, efficientnet_lite_pytorch), less the constructors themselves
(collected here from the libraries' own registries, not from snnconv's table), must be refused, and nothing
it names may be called. Dangerous ones get arguments that would leave a marker file if they ever ran."""

import importlib
import json
import os
import pkgutil
import random
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import snnconv
from snnconv import trusted
from snnconv.cli import main

timm = pytest.importorskip("timm")
tv_models = pytest.importorskip("torchvision.models")
LIBRARIES = ["timm", "torchvision.models", "efficientnet_lite_pytorch"]
MARKER = "marker-ran"


def _modules():
    mods = {}
    for root in LIBRARIES:
        try:
            top = importlib.import_module(root)
        except ImportError:
            continue
        mods[root] = top
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for info in pkgutil.walk_packages(top.__path__, root + "."):
                try:
                    mods[info.name] = importlib.import_module(info.name)
                except Exception:  # optional back ends (tensorflow, HF datasets) not installed
                    continue
    return mods


def _attrs(obj):
    for name in dir(obj):
        try:
            yield name, getattr(obj, name)
        except Exception:
            continue


def _constructors() -> set[int]:
    """ids of the real model constructors, from each library's own registry."""
    ids = {id(timm.create_model), id(tv_models.get_model)}
    ids |= {id(timm.models.model_entrypoint(n)) for n in timm.list_models()}
    ids |= {id(tv_models.get_model_builder(n)) for n in tv_models.list_models()}
    try:
        from efficientnet_lite_pytorch import EfficientNet

        ids.add(id(EfficientNet.from_name))  # bound anew on each access: compared by its function below
        ids.add(id(EfficientNet.from_name.__func__))
    except ImportError:
        pass
    return ids


@pytest.fixture(scope="module")
def walk():
    """{spec: callable} for every callable reachable as module:attr or module:attr.attr, constructors left out."""
    keep = _constructors()
    found = {}
    for mod_name, mod in _modules().items():
        for a, obj in _attrs(mod):
            if callable(obj):
                found[f"{mod_name}:{a}"] = obj
            for b, inner in _attrs(obj):
                if callable(inner):
                    found[f"{mod_name}:{a}.{b}"] = inner
    return {s: f for s, f in found.items() if id(getattr(f, "__func__", f)) not in keep and id(f) not in keep}


def payload_kwargs(fn, marker: str) -> dict:
    """Arguments that make a shell or code gadget leave the marker file if it is ever called."""
    command = f"touch {marker}"
    table = {
        os.system: {"command": command},
        os.popen: {"cmd": command},
        subprocess.getoutput: {"cmd": command},
        subprocess.getstatusoutput: {"cmd": command},
        subprocess.call: {"args": ["touch", marker]},
        subprocess.run: {"args": ["touch", marker]},
        subprocess.check_call: {"args": ["touch", marker]},
        subprocess.check_output: {"args": ["touch", marker]},
        subprocess.Popen: {"args": ["touch", marker]},
    }
    try:
        return table.get(fn, {})
    except TypeError:  # unhashable callables
        return {}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("trusted")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    snn = snnconv.convert(model, T=2, calib=torch.rand(8, 1, 8, 8))
    snnconv.save(snn, d / "ok.safetensors", source={"factory": "nowhere:net", "kwargs": {}})
    torch.save({"x": torch.rand(4, 1, 8, 8), "y": torch.randint(0, 10, (4,))}, d / "test.pt")
    with safe_open(str(d / "ok.safetensors"), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    return d, meta, tensors


def hostile(checkpoint, path, spec, kwargs):
    _, meta, tensors = checkpoint
    save_file(tensors, str(path), metadata={**meta, "source": json.dumps({"factory": spec, "kwargs": kwargs})})


def test_walk_every_gadget_is_refused_by_the_rule(walk, tmp_path, monkeypatch):
    """Every walked spec is refused before anything it names is called (call_factory would be the call)."""
    monkeypatch.setattr("snnconv.io.call_factory", lambda *a: pytest.fail(f"called {a[1]}"))
    marker = str(tmp_path / MARKER)
    assert len(walk) > 100_000  # the walk reached the libraries' modules and what they import
    for spec, fn in walk.items():
        with pytest.raises(snnconv.ConversionError, match=r"evil\.safetensors: .*(refusing|not a model)"):
            trusted.build(spec, payload_kwargs(fn, marker), "evil.safetensors")
    assert not os.path.exists(marker)


def _sample(walk, n, seed=0):
    """One spec per distinct callable, the dangerous ones all, and a seeded sample of the rest."""
    by_object = {}
    for spec, fn in sorted(walk.items()):
        by_object.setdefault(id(fn), spec)
    dangerous = [s for s, f in walk.items() if payload_kwargs(f, "m")]
    rest = sorted(set(by_object.values()) - set(dangerous))
    return sorted(dangerous) + random.Random(seed).sample(rest, min(n, len(rest)))


@pytest.mark.parametrize("how", ["load", "inspect", "run"])
def test_walk_refused_by_load_inspect_and_run(walk, checkpoint, tmp_path, capsys, how):
    """The verbs a user runs on a file, on every dangerous spelling and a sample of every other callable."""
    d = checkpoint[0]
    marker = str(tmp_path / MARKER)
    specs = _sample(walk, 400)
    for spec in specs:
        path = tmp_path / "evil.safetensors"
        hostile(checkpoint, path, spec, payload_kwargs(walk[spec], marker))
        if how == "load":
            with pytest.raises(snnconv.ConversionError, match=r"evil\.safetensors: .*trust_source=True"):
                snnconv.load(path)
        else:
            capsys.readouterr()
            argv = [how, str(path)] + (["--data", str(d / "test.pt")] if how == "run" else [])
            assert main(argv) == 2, spec
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"snnconv {how}: error: {path}: "), (spec, err)
            assert "--trust-source" in err[0]
        assert not os.path.exists(marker), spec
    assert len(specs) > 400


def test_named_gadget_refused_before_any_import(checkpoint, tmp_path):
    """The reported payload, in a fresh interpreter: refused, nothing of timm imported, no command run."""
    path = tmp_path / "evil.safetensors"
    marker = tmp_path / "PWNED"
    hostile(checkpoint, path, "timm.models._builder:os.system", {"command": f"touch {marker}"})
    code = (
        "import sys, snnconv\n"
        f"try:\n    snnconv.load({str(path)!r})\nexcept snnconv.ConversionError as e:\n    print(e)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "refusing to import and call 'timm.models._builder:os.system'" in out
    assert out.strip().splitlines()[-1] == "[]"
    assert not marker.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "snnconv.cli", "inspect", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    "spec, kwargs",
    [
        ("timm:create_model", {"model_name": "resnet10t", "num_classes": 10}),
        ("timm.models:resnet10t", {"num_classes": 10, "pretrained": False}),
        ("torchvision.models:resnet18", {"num_classes": 10, "weights": None}),
        ("torchvision.models:get_model", {"name": "resnet18", "num_classes": 10}),
    ],
)
def test_listed_constructors_load_as_data(checkpoint, tmp_path, spec, kwargs):
    """Each listed spelling rebuilds the same SNN from the file alone, no flag needed."""
    torch.manual_seed(0)
    model = snnconv.io.load_factory(spec, kwargs).eval()
    snn = snnconv.convert(model, T=2, calib=torch.rand(2, 3, 16, 16))
    snnconv.save(snn, tmp_path / "m.safetensors", source={"factory": spec, "kwargs": kwargs})
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(snnconv.load(tmp_path / "m.safetensors")(x), snn(x))


@pytest.mark.parametrize(
    "spec, kwargs, fragment",
    [
        ("timm:create_model", {"model_name": "resnet10t", "checkpoint_path": "/etc/passwd"}, "checkpoint_path"),
        ("timm:create_model", {"model_name": "resnet10t", "pretrained": True}, "pretrained"),
        ("timm:create_model", {"model_name": "resnet10t", "pretrained_cfg_overlay": {"file": "/x"}}, "overlay"),
        ("timm:create_model", {"model_name": "hf-hub:evil/net"}, "model_name"),
        ("timm:create_model", {"model_name": "resnet10t", "num_classes": "10"}, "num_classes"),
        ("torchvision.models:resnet18", {"weights": "DEFAULT"}, "weights"),
        ("torchvision.models:get_model", {"name": "os"}, "name"),
        ("torchvision.models:list_models", {}, "not a model its library lists"),
        ("torchvision.models:get_model_builder", {}, "not a model its library lists"),
        ("timm.models:load_checkpoint", {}, "not a model its library lists"),
        ("timm.models.resnet:resnet18", {}, "refusing to import"),
        ("timm:create_model.__globals__", {}, "refusing to import"),
        ("efficientnet_lite_pytorch:EfficientNet.from_pretrained", {"model_name": "efficientnet-lite0"}, "refusing"),
        ("efficientnet_lite_pytorch:EfficientNet.from_name", {"model_name": "x", "weights_path": "/x"}, "refusing"),
    ],
)
def test_arguments_checked_per_constructor(spec, kwargs, fragment):
    with pytest.raises(snnconv.ConversionError, match=f"^f.safetensors: .*{fragment}"):
        trusted.build(spec, kwargs, "f.safetensors")


def test_file_kwargs_checked_when_user_names_the_factory(checkpoint, tmp_path, capsys):
    """--model names the code; the file's recorded kwargs are still the file's words: checked by the same
    table (timm.create_model refuses checkpoint_path), and only typed --kwargs are the user's."""
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10).eval()
    snn = snnconv.convert(model, T=2, calib=torch.rand(2, 3, 16, 16))
    path = tmp_path / "m.safetensors"
    read_target = tmp_path / "read-me.pth"
    torch.save(model.state_dict(), read_target)
    source = {
        "factory": "timm:create_model",
        "kwargs": {"model_name": "resnet10t", "checkpoint_path": str(read_target)},
    }
    snnconv.save(snn, path, source=source)
    capsys.readouterr()
    assert main(["inspect", str(path), "--model", "timm:create_model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint_path" in err[0] and str(path) in err[0], err
    typed = json.dumps({"model_name": "resnet10t", "num_classes": 10})
    assert main(["inspect", str(path), "--model", "timm:create_model", "--kwargs", typed]) == 0
