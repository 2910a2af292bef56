"""The main job: train a small CNN on scikit-learn's bundled digits, convert it, compare accuracy and time.

python examples/digits.py [--epochs 30] [--T 1 2 4 8 16 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import snnconv


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = x + F.relu(self.conv3(x))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


def digits_data(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train(model: nn.Module, x, y, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(fn, x, y) -> tuple[float, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = torch.cat([fn(b).argmax(1) for b in x.split(256)])
    return (pred == y).float().mean().item() * 100, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    (xtr, ytr), (xte, yte) = digits_data()
    t0 = time.perf_counter()
    ann = train(DigitsCNN(), xtr, ytr, args.epochs)
    print(f"trained DigitsCNN on {len(xtr)} digits in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    snn = snnconv.convert(ann, T=max(args.T), calib=xtr[:512])
    print(
        f"converted in {time.perf_counter() - t0:.2f} s: {len(snn.neurons())} neuron layers, "
        f"state_dict keys unchanged: {list(snn.state_dict()) == list(ann.state_dict())}"
    )
    acc_ann, t_ann = accuracy(ann, xte, yte)
    print(f"\n{'model':>10} {'accuracy %':>11} {'gap':>6} {'time ms':>8} {'time / ANN':>10}")
    print(f"{'ANN':>10} {acc_ann:11.2f} {'':>6} {t_ann * 1e3:8.1f} {1.0:10.1f}")
    for T in args.T:
        snn.T = T
        acc, t = accuracy(snn, xte, yte)
        print(f"{'SNN T=' + str(T):>10} {acc:11.2f} {acc - acc_ann:+6.2f} {t * 1e3:8.1f} {t / t_ann:10.1f}")
    print(f"\n{len(xte)} test digits; IF neurons, soft reset, per-channel 99.99th-percentile thresholds, v0 = theta/2")


if __name__ == "__main__":
    main()
