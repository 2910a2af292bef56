"""timm models as their authors wrote them (random weights, small inputs): they convert, keep their state_dict
keys (strict load both ways) and approach the ANN at large T. The full sweep over every timm ReLU/ReLU6 model
is `python benchmarks/zoo.py --timm` (results/zoo_timm.txt)."""

import pytest
import torch

import snnconv

timm = pytest.importorskip("timm")

# name: (input size, T, largest relative error ||SNN - ANN|| / ||ANN||) -- what each one exercises
CI = {
    "test_resnet": (32, 128, 0.05),  # timm's own tiny ResNet: BatchNormAct-free stem, create_act layers
    "resnet10t": (32, 128, 0.05),  # tiered stem, avg-pool downsampling
    "resnetv2_18": (32, 128, 0.1),  # pre-activation blocks with torch._assert shape checks
    "mobilenetv2_035": (32, 128, 0.1),  # ReLU6, depthwise, BatchNormAct2d (_assert)
    "tf_mobilenetv3_small_minimal_100": (32, 128, 0.2),  # TF "same" padding from x.size(): concrete-shape trace
}


@pytest.mark.parametrize("name", sorted(CI))
def test_timm_model_converts_and_agrees(name):
    size, T, tol = CI[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(16, 3, size, size, generator=g), torch.rand(3, 3, size, size, generator=g)
    snn = snnconv.convert(model, T=T, calib=calib)
    assert list(snn.state_dict()) == list(model.state_dict())
    snn.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(snn.state_dict(), strict=True)
    with torch.no_grad():
        ref, out = model(x), snn(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
