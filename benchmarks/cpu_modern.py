"""CPU speed of converted transformers and smooth-activation CNNs (issue #32), trained weights, beside T x ANN.

    python benchmarks/cpu_modern.py [--nets vit silu_se] [--T 8] [--batch 100] [--threads 2] [--repeats 5]

The Fashion-MNIST nets benchmarks/accuracy.py trains (cached in .cache/), converted with no option set on 2,000
training images, timed on test images: medians of interleaved runs (ANN, SNN, ANN, ...) in one process. Compensated
ops and two-sided neurons run on the torch backend (no fused kernel yet), so these rows measure that path.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch
from mnist_models import MNIST, dataset, trained

import snnconv


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["vit", "silu_se"])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {cpu_flags()}")
    print(f"{'net':<10}{'batch':>6}{'T':>4}{'ANN ms':>10}{'SNN ms':>10}{'SNN / (T x ANN)':>18}{'peak RSS MiB':>14}")
    for arch in args.nets:
        ann = trained(arch, "fashion")
        (xtr, _), (xte, _) = dataset("fashion", MNIST)
        calib = xtr[torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[:2000]]
        snn = snnconv.convert(ann, T=args.T, calib=calib)
        x = xte[: args.batch]
        times = {"ann": [], "snn": []}
        with torch.no_grad():
            ann(x), snn(x)  # warm-up
            for _ in range(args.repeats):
                for name, model in (("ann", ann), ("snn", snn)):
                    t0 = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - t0)
        a, s = statistics.median(times["ann"]) * 1e3, statistics.median(times["snn"]) * 1e3
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row = f"{arch:<10}{args.batch:>6}{args.T:>4}{a:>10.1f}{s:>10.1f}{s / (args.T * a):>18.2f}{rss:>14.0f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
