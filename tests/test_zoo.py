"""torchvision's model zoo: each model traces, converts, keeps its state_dict keys, runs in both step modes
with the same output and approaches the ANN as T grows; models with activations IF neurons cannot
represent fail with one ConversionError listing every offending op. A few models run in CI; the rest
carry the `slow` marker (`pytest -m slow`, and benchmarks/zoo.py)."""

import pytest
import torch
from nets import TORCHVISION_ZOO

import snnconv

tv = pytest.importorskip("torchvision")

CI = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "googlenet", "squeezenet1_1"]
REST = [n for n in TORCHVISION_ZOO if n not in CI]
# smooth activations, SE gates, LayerNorm, attention (passes/compensate.py): converted since #32
MODERN_CI = ["efficientnet_b0", "mobilenet_v3_small", "vit_b_16"]
MODERN_REST = ["convnext_tiny", "regnet_y_400mf"]


def input_size(name: str) -> int:
    return 80 if name == "inception_v3" else 32 if name == "vit_b_16" else 64


@pytest.mark.parametrize("name", CI + MODERN_CI + [pytest.param(n, marks=pytest.mark.slow) for n in REST + MODERN_REST])
def test_zoo_model_converts(name, tv_model, same_state_dict):
    model = tv_model(name)
    hw = input_size(name)
    g = torch.Generator().manual_seed(2)
    calib, x = torch.rand(8, 3, hw, hw, generator=g), torch.rand(2, 3, hw, hw, generator=g)
    snn = snnconv.convert(model, T=4, calib=calib)
    same_state_dict(snn, model)
    # both step modes, over the same 4 steps
    y_m = snn(x, per_step=True)
    snn.step_mode = "s"
    snn.reset()
    y_s = torch.stack([snn(x) for _ in range(4)])
    snn.step_mode = "m"
    scale = y_m.abs().max().item() + 1e-12
    assert (y_m - y_s).abs().max().item() <= 1e-4 * scale, name
    # the ANN limit: a conversion for more steps comes closer
    ref = model(x)
    scale = ref.norm() + 1e-12  # torchvision's ViT starts with a zero head
    err = {4: ((snn(x) - ref).norm() / scale).item()}
    snn32 = snnconv.convert(model, T=32, calib=calib)
    err[32] = ((snn32(x) - ref).norm() / scale).item()
    assert err[32] < err[4] or err[32] < 1e-3, err


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])
def test_zoo_step_modes_same_spikes_in_float64(name, tv_model):
    """In float64 every spike of every neuron is the same in both modes; outputs differ only by the
    rounding of matrix products over T*N rows instead of N (~1e-15)."""
    model = tv_model(name).double()
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    snn = snnconv.convert(model, T=3, calib=x)
    rec = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: rec.setdefault(n, []).append(o.clone()))
        for n, m in snn.neurons().items()
    ]
    y_m = snn(x, per_step=True)
    spikes_m = {n: v[0] for n, v in rec.items()}
    rec.clear()
    snn.step_mode = "s"
    snn.reset()
    y_s = torch.stack([snn(x) for _ in range(3)])
    for h in hooks:
        h.remove()
    for n, v in rec.items():
        assert torch.equal(torch.cat(v), spikes_m[n]), n
    assert torch.allclose(y_m, y_s, rtol=0, atol=1e-12)


def test_zoo_weights_file_through_cli(tmp_path, capsys, tv_model):
    from snnconv.cli import main

    model = tv_model("resnet18")
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    import numpy as np

    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((8, 3, 64, 64), dtype=np.float32))
    out = tmp_path / "r18.safetensors"
    assert (
        main(
            [
                "convert",
                "torchvision.models:resnet18",
                "--weights",
                str(tmp_path / "r18.pth"),
                "--calib",
                str(tmp_path / "calib.npy"),
                "-o",
                str(out),
                "--T",
                "4",
            ]
        )
        == 0
    )
    snn = snnconv.load(out)
    x = torch.rand(2, 3, 64, 64)
    ref = snnconv.convert(model, T=4, calib=torch.from_numpy(np.load(tmp_path / "calib.npy")))
    assert torch.allclose(snn(x), ref(x), atol=1e-5)
