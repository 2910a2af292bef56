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
def test_timm_model_converts_and_agrees(name, same_state_dict):
    size, T, tol = CI[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(16, 3, size, size, generator=g), torch.rand(3, 3, size, size, generator=g)
    snn = snnconv.convert(model, T=T, calib=calib)
    same_state_dict(snn, model)
    with torch.no_grad():
        ref, out = model(x), snn(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < tol, rel


# since #32 (compensated GELU/SiLU/hardswish, LayerNorm, softmax, attention, SE gates, split-attention):
# name: (input size, whether the constructor takes img_size). Times measured with the machine's 2 cores
# shared (load ~7): the ones over a minute there carry the `slow` marker.
MODERN = {
    "vit_tiny_patch16_224": (32, True),  # patch embedding, cls token, LayerNorm, fused SDPA, GELU MLP
    "deit_tiny_patch16_224": (32, True),  # the same blocks, DeiT's training recipe
    "convnext_atto": (32, False),  # depthwise 7x7, LayerNorm2d (permute + layer_norm), layer scale, GELU
    "efficientnet_b0": (32, False),  # SiLU, squeeze-excitation gates (sigmoid x tensor)
    "mobilenetv3_small_100": (32, False),  # hardswish, hardsigmoid SE gates, ReLU
    "resnest14d": (32, False),  # the smallest ResNeSt: split attention (softmax over radix groups)
    "mobilevit_xxs": (32, False),  # unfold/fold to patches as reshapes whose sizes are k times the batch (B * P)
    "test_vit_relpos": (32, True),  # relative-position MLP (Linear -> ReLU) on a constant table: no neurons
}
SLOW = {"vit_tiny_patch16_224", "deit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"}


def _converts_and_approaches(model, size, same_state_dict):
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(4, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)
    snn = snnconv.convert(model, T=64, calib=calib)
    same_state_dict(snn, model)
    with torch.no_grad():
        ref = model(x)
        rel64 = ((snn(x) - ref).norm() / ref.norm()).item()
        snn.T = 8
        rel8 = ((snn(x) - ref).norm() / ref.norm()).item()
    assert rel64 < rel8 or rel64 < 0.01, (rel8, rel64)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(MODERN)])
def test_timm_modern_model_converts_and_approaches_the_ann(name, timm_model, same_state_dict):
    size, takes_img_size = MODERN[name]
    _converts_and_approaches(timm_model(name, size if takes_img_size else None), size, same_state_dict)


# Swin's window partition/reverse reads sizes k times the batch (B_ = B * nW, B_ // nW): fold_batch_sizes
# rebuilds them from the reshaped tensor's batch factor. Convert ~70 s here under load ~5: slow.
@pytest.mark.slow
def test_timm_swin_converts_and_approaches_the_ann(timm_model, same_state_dict):
    _converts_and_approaches(timm_model("swin_tiny_patch4_window7_224", 32), 32, same_state_dict)
