"""The networks the accuracy benchmarks train on CPU and cache in .cache/: MNIST (one epoch), digits (30),
Fashion-MNIST (Debian's `dataset-fashion-mnist`: a VGG and a ResNet with a stem max pool, a few epochs)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv import QCFS
from snnconv.data import load_mnist

CACHE = Path(__file__).resolve().parent.parent / ".cache"
_ROOT = Path(__file__).resolve().parent.parent
MNIST = next(
    (
        p
        for p in (_ROOT.parent / "shared" / "data" / "mnist", _ROOT.parent.parent / "shared" / "data" / "mnist")
        if p.is_dir()
    ),
    _ROOT.parent / "shared" / "data" / "mnist",
)  # beside the checkout or one level up
FASHION = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def _act(qcfs_levels: int | None) -> nn.Module:
    return nn.ReLU(inplace=True) if qcfs_levels is None else QCFS(qcfs_levels, threshold=4.0)


def vgg_mnist(hw: int = 28, qcfs_levels: int | None = None) -> nn.Module:
    """VGG-style: 4 conv-BN-act, 2 max pools, a hidden linear-act: 5 neuron layers."""

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), _act(qcfs_levels)]

    return nn.Sequential(
        *block(1, 32),
        *block(32, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (hw // 4) ** 2, 128),
        _act(qcfs_levels),
        nn.Dropout(0.2),
        nn.Linear(128, 10),
    )


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem + 3 residual blocks (7 neuron layers), global average pool, linear head."""

    def __init__(self, hw: int = 28):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(_Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 64, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class StemPoolResNet(nn.Module):
    """Conv-BN-ReLU stem, 2x2 max pool, four basic residual blocks (9 neuron layers), global average pool."""

    def __init__(self, hw: int = 28):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        )
        self.blocks = nn.Sequential(_Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 64, 1), _Block(64, 128, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


FACTORIES = {
    "vgg": vgg_mnist,
    "resnet": SmallResNet,
    "vgg_qcfs4": lambda hw=28: vgg_mnist(hw, qcfs_levels=4),
    "resnet_pool": StemPoolResNet,
}
EPOCHS = {"digits": 30, "mnist": 1, "fashion": 3}  # by data, or (arch, data)
SUBSET: dict = {}  # (arch, data) -> training images used (the first n of a fixed shuffle), where not all


def digits_data():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def dataset(name: str, data_dir: Path = MNIST):
    if name == "digits":
        return digits_data()
    root = FASHION if name == "fashion" else data_dir
    return load_mnist(root, "train"), load_mnist(root, "test")


def trained(arch: str, data: str = "mnist", data_dir: Path = MNIST, seed: int = 0, device: str = "cpu") -> nn.Module:
    """Train once (Adam, batch 64, cosine learning rate from 1e-3, on `device`; initial weights and batch
    order from `seed`) and cache the state_dict; later calls load it."""
    hw = 8 if data == "digits" else 28
    torch.manual_seed(seed)
    model = FACTORIES[arch](hw)
    epochs = EPOCHS.get((arch, data), EPOCHS[data])
    subset = SUBSET.get((arch, data))
    path = CACHE / f"{arch}_{data}_e{epochs}_s{seed}{f'_n{subset}' if subset else ''}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    (x, y), _ = dataset(data, data_dir)
    if subset:
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:subset]
        x, y = x[keep], y[keep]
    x, y, model = x.to(device), y.to(device), model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if data == "fashion" else None
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if epochs > 1:
            print(f"  {arch}/{data} epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for idx in torch.randperm(len(x), device=device).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if sched is not None:
                sched.step()
    print(f"trained {arch} on {data} for {epochs} epoch(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    CACHE.mkdir(exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return model.cpu().eval()
