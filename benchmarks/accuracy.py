"""Accuracy vs T: the ANN, snnconv's conversion methods and SpikingJelly's converter on the same trained ANN.

    python benchmarks/accuracy.py [--data mnist digits] [--arch vgg resnet] [--test 2000] [--T 32]
                                  [--methods default] [--no-peer] [--device cpu]

Networks are trained here on CPU and cached (.cache/). One run of T_max steps gives the accuracy at every
T <= T_max (the dynamics are causal: the first T steps of a longer run are a T-step run). SpikingJelly
2.0.0 (the peer, RateCodingRecipe 'Max' and '99.9%') runs only where it imports.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from mnist_models import MNIST, dataset, trained

import snnconv

REPORT_T = (1, 2, 4, 8, 16, 32)
METHODS = {
    "snnconv default (channel p99.99, θ/2)": {},
    "snnconv layer p99.99": {"per_channel": False},
    "snnconv channel max": {"method": "max"},
    "snnconv channel p99.99, v0 = 0": {"v_init": 0.0},
    "snnconv default + bias calibration": {"bias_calibration": True},
    "snnconv burst <=4 spikes/step (non-binary)": {"max_spikes": 4},
    # the int8 spike convolutions (CPU) against plain float32 arithmetic; on CUDA the two rows are one path
    "snnconv default, float32 convolutions": {"passes": sorted(snnconv.passes.OPTIONAL - {"integer_spikes"})},
}
# readout delay changes which steps are averaged, so its rows come from the same per-step outputs
DELAYS = (2, 4)


def accuracy_by_T(step_outputs: torch.Tensor, y: torch.Tensor, delay: int = 0) -> list[float]:
    """step_outputs [T, N, classes] -> accuracy (%) after each step of the mean over steps
    min(delay, t)..t, as SpikingModel computes it with readout_delay."""
    cs = step_outputs.cumsum(0)
    accs = []
    for t in range(len(cs)):
        d = min(delay, t)
        total = cs[t] - (cs[d - 1] if d > 0 else 0)
        accs.append((total.argmax(-1) == y).float().mean().item() * 100)
    return accs


def run_snnconv(ann, calib, x, y, T, opts, batch=500) -> torch.Tensor:
    """Per-step outputs [T, N, classes] of one T-step run."""
    bias = opts.get("bias_calibration", False)
    snn = snnconv.convert(ann, T=8 if bias else T, calib=calib, **opts)  # bias is calibrated for T = 8
    snn.T = T
    return torch.cat([snn(b, per_step=True) for b in x.split(batch)], 1)


def run_spikingjelly(ann, calib, x, y, T, mode, batch=500):
    from spikingjelly.activation_based import ann2snn, functional

    loader = [(c,) for c in calib.split(100)]
    net = ann2snn.Converter(ann2snn.RateCodingRecipe(dataloader=loader, mode=mode), device=str(x.device)).convert(
        copy.deepcopy(ann)
    )
    outs = []
    with torch.no_grad():
        for b in x.split(batch):
            functional.reset_net(net)
            outs.append(torch.stack([net(b) for _ in range(T)]))
    return accuracy_by_T(torch.cat(outs, 1), y)


def table(title, ann_acc, rows, T):
    ts = [t for t in REPORT_T if t <= T]
    lines = [
        f"\n{title}",
        f"{'method':<42}" + "".join(f"{'T=' + str(t):>8}" for t in ts),
        f"{'ANN':<42}" + "".join(f"{ann_acc:8.2f}" for _ in ts),
    ]
    for name, accs in rows.items():
        lines.append(f"{name:<42}" + "".join(f"{accs[t - 1]:8.2f}" for t in ts))
    return "\n".join(lines)


def evaluate(arch, data, args):
    ann = trained(arch, data, args.data_dir, device=args.device).to(args.device)
    (xtr, _), (xte, yte) = dataset(data, args.data_dir)
    xte, yte = xte[: args.test].to(args.device), yte[: args.test].to(args.device)
    calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[: args.calib]].to(args.device)
    with torch.no_grad():
        ann_acc = (torch.cat([ann(b).argmax(1) for b in xte.split(1000)]) == yte).float().mean().item() * 100
    rows = {}
    methods = {"snnconv (QCFS threshold, θ/2)": {}} if "qcfs" in arch else METHODS
    if args.methods:
        methods = {k: v for k, v in methods.items() if any(m in k for m in args.methods)}
    for name, opts in methods.items():
        t0 = time.perf_counter()
        outs = run_snnconv(ann, calib, xte, yte, args.T, opts)
        rows[name] = accuracy_by_T(outs, yte)
        if not opts:
            for d in DELAYS:
                rows[f"snnconv default, readout delay {d}"] = accuracy_by_T(outs, yte, d)
        print(f"  {data}/{arch} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_peer and "qcfs" not in arch:
        try:
            import spikingjelly  # noqa: F401
        except ImportError:
            print("  SpikingJelly not installed: peer rows skipped")
        else:
            for mode in ("Max", "99.9%"):
                t0 = time.perf_counter()
                rows[f"SpikingJelly 2.0.0 RateCoding {mode}"] = run_spikingjelly(ann, calib, xte, yte, args.T, mode)
                print(f"  {data}/{arch} SpikingJelly {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    return table(f"{data} test ({len(xte)} images), {arch}, accuracy %", ann_acc, rows, args.T)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["mnist", "digits"])
    ap.add_argument("--arch", nargs="+", default=["vgg", "resnet", "vgg_qcfs4"])
    ap.add_argument("--data-dir", default=str(MNIST))
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--methods", nargs="+", help="only the snnconv rows whose name contains one of these")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (snnconv then runs its CuPy kernels)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    tables = [evaluate(arch, data, args) for data in args.data for arch in args.arch]
    print("\n".join(tables))


if __name__ == "__main__":
    main()
