"""Accuracy vs T: the ANN, snnconv's conversion methods and SpikingJelly's converter on the same trained ANN.

    python benchmarks/accuracy.py [--nets fashion:resnet_pool fashion:vgg mnist:vgg] [--test 10000]
                                  [--calib 2000] [--T 32] [--methods default ...] [--no-peer] [--device cpu]

Networks are trained here on CPU and cached (.cache/; Fashion-MNIST: `apt-get install dataset-fashion-mnist`).
Rows fitted to T (the default: threshold search, bias calibration, signed spikes; and its ablations) are
converted once per T of the table and run T steps. Rows that do not depend on T come from one run of T_max
steps (the dynamics are causal: the first T steps of a longer run are a T-step run). SpikingJelly 2.0.0
(the peer, RateCodingRecipe 'Max' and '99.9%') runs where it imports. Conversion time of the default is
reported as a multiple of one ANN pass over the calibration set times T (the issue's yardstick).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from mnist_models import MNIST, dataset, trained

import snnconv

REPORT_T = (1, 2, 4, 8, 16, 32)
PLAIN = {"method": "percentile", "bias_calibration": False, "signed_spikes": False}  # v0.1's default
FITTED = {  # converted for each T
    "snnconv default (search + bias cal. + signed)": {},
    "  without signed spikes": {"signed_spikes": False},
    "  without threshold search (p99.99)": {"method": "percentile"},
    "  bias calibration only (p99.99)": {"method": "percentile", "signed_spikes": False},
    "  depthwise convolutions read spikes too": {"spike_depthwise": True},  # nets with smooth activations only
}
ONE_RUN = {  # one conversion, every T from one run
    "snnconv plain: channel p99.99 (v0.1 default)": PLAIN,
    "snnconv plain, signed spikes": {**PLAIN, "signed_spikes": True},
    "snnconv burst <=4 spikes/step (non-binary)": {**PLAIN, "max_spikes": 4},
}


def accuracy_by_T(step_outputs: torch.Tensor, y: torch.Tensor) -> list[float]:
    """step_outputs [T, N, classes] -> accuracy (%) of the mean output after each step."""
    cs = step_outputs.cumsum(0)
    return [(cs[t].argmax(-1) == y).float().mean().item() * 100 for t in range(len(cs))]


def run_one(ann, calib, x, y, T, opts, batch=500) -> list[float]:
    snn = snnconv.convert(ann, T=T, calib=calib, **opts)
    with torch.no_grad():
        return accuracy_by_T(torch.cat([snn(b, per_step=True) for b in x.split(batch)], 1), y)


def run_fitted(ann, calib, x, y, T, opts, batch=500) -> tuple[list[float], dict[int, float]]:
    """Accuracy at each T of the table (others nan), converting for that T; and the conversion times (s)."""
    accs, times = [float("nan")] * T, {}
    for t in (t for t in REPORT_T if t <= T):
        t0 = time.perf_counter()
        snn = snnconv.convert(ann, T=t, calib=calib, **opts)
        times[t] = time.perf_counter() - t0
        with torch.no_grad():
            pred = torch.cat([snn(b).argmax(-1) for b in x.split(batch)])
        accs[t - 1] = (pred == y).float().mean().item() * 100
    return accs, times


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
    w = max(len(n) for n in rows) + 2
    lines = [f"\n{title}", f"{'method':<{w}}" + "".join(f"{'T=' + str(t):>8}" for t in ts)]
    lines.append(f"{'ANN':<{w}}" + "".join(f"{ann_acc:8.2f}" for _ in ts))
    for name, accs in rows.items():
        lines.append(f"{name:<{w}}" + "".join(f"{accs[t - 1]:8.2f}" for t in ts))
    return "\n".join(lines)


def evaluate(data, arch, args):
    ann = trained(arch, data, args.data_dir, device=args.device).to(args.device)
    (xtr, _), (xte, yte) = dataset(data, args.data_dir)
    xte, yte = xte[: args.test].to(args.device), yte[: args.test].to(args.device)
    calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[: args.calib]].to(args.device)
    with torch.no_grad():
        ann_acc = (torch.cat([ann(b).argmax(1) for b in xte.split(1000)]) == yte).float().mean().item() * 100
        ann(calib[:256])  # warm-up, then one ANN pass over the calibration set: the conversion-time yardstick
        t0 = time.perf_counter()
        for b in calib.split(128):
            ann(b)
        t_ann = time.perf_counter() - t0
    rows, notes = {}, []
    pick = (
        (lambda names: {k: v for k, v in names.items() if any(m in k for m in args.methods)}) if args.methods else dict
    )
    for name, opts in pick(FITTED).items():
        t0 = time.perf_counter()
        rows[name], times = run_fitted(ann, calib, xte, yte, args.T, opts)
        if not opts:
            ratios = "  ".join(f"T={t}: {s:.2f} s = {s / (t_ann * t):.2f}x" for t, s in times.items())
            notes.append(f"default conversion time / (one ANN pass over {len(calib)} calibration images x T): {ratios}")
            drops = [(t, rows[name][t - 1] - rows[name][2 * t - 1]) for t in REPORT_T if 2 * t <= args.T]
            worst = max(drops, key=lambda d: d[1])
            notes.append(f"default, largest drop from T to 2T: {worst[1]:.2f} points at T={worst[0]} (goal <= 0.3)")
        print(f"  {data}/{arch} {name.strip()}: {time.perf_counter() - t0:.0f} s", flush=True)
    for name, opts in pick(ONE_RUN).items():
        t0 = time.perf_counter()
        rows[name] = run_one(ann, calib, xte, yte, args.T, opts)
        print(f"  {data}/{arch} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_peer:
        try:
            import spikingjelly  # noqa: F401
        except ImportError:
            notes.append("SpikingJelly not installed: peer rows skipped")
        else:
            for mode in ("99.9%", "Max"):
                t0 = time.perf_counter()
                rows[f"SpikingJelly 2.0.0 RateCoding {mode}"] = run_spikingjelly(ann, calib, xte, yte, args.T, mode)
                print(f"  {data}/{arch} SpikingJelly {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    title = f"{data} test ({len(xte)} images), {arch}, calibration {len(calib)} training images, accuracy %"
    return table(title, ann_acc, rows, args.T) + "".join(f"\n{n}" for n in notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["fashion:resnet_pool", "fashion:vgg", "mnist:vgg"], help="data:arch")
    ap.add_argument("--data-dir", default=str(MNIST))
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--T", type=int, default=32)
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--methods", nargs="+", help="only the snnconv rows whose name contains one of these")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; rows fitted per T: {FITTED}", flush=True)
    for net in args.nets:
        data, arch = net.split(":")
        print(evaluate(data, arch, args), flush=True)


if __name__ == "__main__":
    main()
