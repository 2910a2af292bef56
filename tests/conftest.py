"""Shared test helpers, as fixtures (test modules never import each other)."""

import importlib
import sys

import pytest
import torch


def _signed_reference(x, theta, v_init, tau=None):
    """Signed IF/LIF neurons one at a time in Python floats: +theta at H >= theta, -theta at H < 0 while
    the neuron's net spike count is positive."""
    T, n = len(x), len(x[0])
    decay = 1.0 - 1.0 / tau if tau else 1.0
    out = [[0.0] * n for _ in range(T)]
    for i in range(n):
        v, count = v_init * theta, 0
        for t in range(T):
            h = decay * v + x[t][i]
            s = 1 if h >= theta else -1 if (h < 0 and count > 0) else 0
            count += s
            out[t][i] = s * theta
            v = h - s * theta
    return out


@pytest.fixture
def signed_reference():
    """A float64 loop of signed IF/LIF neurons (see _signed_reference), the reference for every signed path."""
    return _signed_reference


def _tv_model(name: str) -> torch.nn.Module:
    """A torchvision architecture as the zoo tests convert it: random weights, BN statistics that are not
    the identity (so BN folding has work to do)."""
    tv = pytest.importorskip("torchvision")
    kw = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
    if name == "vit_b_16":
        kw.update(image_size=32)
    torch.manual_seed(0)
    model = getattr(tv.models, name)(**kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics that are not the identity, so BN folding has work to do
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model


@pytest.fixture
def tv_model():
    return _tv_model


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """user_module(name, source): a module of the user's own (a model factory), written into tmp_path (also the
    working directory), importable by name for this test, imported fresh."""

    def make(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.chdir(tmp_path)
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    return make


def _installed_file(dist: str, suffix: str) -> str:
    """The path of the first file ending in `suffix` that the installed distribution `dist` ships, or a skip.
    Found through the distribution's file list: the package itself is not imported."""
    from importlib import metadata

    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed")
    found = [str(metadata.distribution(dist).locate_file(f)) for f in files if str(f).endswith(suffix)]
    if not found:
        pytest.skip(f"{dist} ships no {suffix}")
    return found[0]


@pytest.fixture
def installed_file():
    """installed_file(dist, suffix): a data file shipped by an installed distribution; skips if it is absent."""
    return _installed_file


def _timm_model(name: str, img_size: int | None = None) -> torch.nn.Module:
    """A timm model with random weights (seed 0), in eval mode; built for img_size x img_size inputs where
    given (ViT, DeiT, Swin fix their token grid at construction)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kw = {"img_size": img_size} if img_size else {}
    return timm.create_model(name, pretrained=False, **kw).eval()


@pytest.fixture
def timm_model():
    """timm_model(name, img_size=None): a timm model as the timm tests convert it (see _timm_model)."""
    return _timm_model


def _same_state_dict(snn, model) -> None:
    """The SNN's state_dict keys are the ANN's, in order, and each loads the other's strictly."""
    assert list(snn.state_dict()) == list(model.state_dict())
    snn.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(snn.state_dict(), strict=True)


@pytest.fixture
def same_state_dict():
    return _same_state_dict
