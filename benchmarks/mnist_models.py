"""The MNIST networks the benchmarks train (one epoch, CPU) and cache under .cache/."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv.data import load_mnist

CACHE = Path(__file__).resolve().parent.parent / ".cache"
MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def vgg_mnist() -> nn.Module:
    """VGG-style: 4 conv-BN-ReLU, 2 max pools, 1 hidden linear-ReLU: 5 neuron layers."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True),
                         nn.Dropout(0.2), nn.Linear(128, 10))


def trained(name: str, factory, data_dir: Path = MNIST, epochs: int = 1, seed: int = 0) -> nn.Module:
    """Train once (Adam, batch 64, `epochs` epochs) and cache the state_dict; later calls load it."""
    model = factory()
    path = CACHE / f"{name}_e{epochs}_s{seed}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    x, y = load_mnist(data_dir, "train")
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    print(f"trained {name} for {epochs} epoch(s) in {time.perf_counter() - t0:.0f} s")
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()
