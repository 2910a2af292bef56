"""Accuracy vs T on MNIST: the ANN, snnconv's methods and SpikingJelly's converter, on one trained ANN.

    python benchmarks/accuracy_mnist.py [--data ../shared/data/mnist] [--test 10000] [--T 32]

One run of T_max steps gives accuracy at every T <= T_max (the dynamics are causal: the first T steps
of a longer run are a T-step run). SpikingJelly (the peer) is used only if it imports.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from mnist_models import MNIST, trained, vgg_mnist

import snnconv
from snnconv.data import load_mnist

REPORT_T = (1, 2, 4, 8, 16, 32)


def accuracy_by_T(step_outputs, y) -> list[float]:
    """step_outputs: [T, N, classes]; accuracy (%) of the running mean after each step."""
    pred = step_outputs.cumsum(0).argmax(-1)
    return ((pred == y).float().mean(1) * 100).tolist()


def run_snnconv(snn, x, y, T, batch=500):
    snn.T = T
    outs = torch.cat([snn(b, per_step=True) for b in x.split(batch)], 1)
    return accuracy_by_T(outs, y)


def run_spikingjelly(ann, calib, x, y, T, mode, batch=500):
    from spikingjelly.activation_based import ann2snn, functional
    loader = [(c,) for c in calib.split(100)]
    net = ann2snn.Converter(ann2snn.RateCodingRecipe(dataloader=loader, mode=mode), device="cpu").convert(
        copy.deepcopy(ann))
    outs = []
    with torch.no_grad():
        for b in x.split(batch):
            functional.reset_net(net)
            outs.append(torch.stack([net(b) for _ in range(T)]))
    return accuracy_by_T(torch.cat(outs, 1), y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(MNIST))
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args(argv)
    ann = trained("vgg_mnist", vgg_mnist, data_dir=args.data)
    xtr, _ = load_mnist(args.data, "train")
    xte, yte = load_mnist(args.data, "test")
    xte, yte = xte[:args.test], yte[:args.test]
    calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[:args.calib]]
    with torch.no_grad():
        ann_acc = (torch.cat([ann(b).argmax(1) for b in xte.split(1000)]) == yte).float().mean().item() * 100
    rows = {}
    methods = {
        "snnconv default (p99.99, θ/2)": {},
        "snnconv max": {"method": "max"},
        "snnconv p99.9": {"percentile": 99.9},
        "snnconv per-channel p99.99": {"per_channel": True},
        "snnconv p99.99, v0=0": {"v_init": 0.0},
    }
    for name, kw in methods.items():
        t0 = time.perf_counter()
        rows[name] = run_snnconv(snnconv.convert(ann, T=args.T, calib=calib, **kw), xte, yte, args.T)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_peer:
        try:
            import spikingjelly  # noqa: F401
            for mode in ("Max", "99.9%"):
                t0 = time.perf_counter()
                rows[f"SpikingJelly 2.0.0 RateCoding {mode}"] = run_spikingjelly(ann, calib, xte, yte, args.T, mode)
                print(f"SpikingJelly {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
        except ImportError:
            print("SpikingJelly not installed: peer columns skipped")
    ts = [t for t in REPORT_T if t <= args.T]
    print(f"\nMNIST test ({len(xte)} images), VGG-style CNN, ANN accuracy {ann_acc:.2f}%")
    print(f"{'method':<40}" + "".join(f"{'T=' + str(t):>8}" for t in ts))
    print(f"{'ANN':<40}" + "".join(f"{ann_acc:8.2f}" for _ in ts))
    for name, accs in rows.items():
        print(f"{name:<40}" + "".join(f"{accs[t - 1]:8.2f}" for t in ts))


if __name__ == "__main__":
    main()
