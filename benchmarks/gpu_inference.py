"""GPU inference time of whole converted networks: the ANN x T, snnconv with its torch backend and with
its CuPy kernels, and SpikingJelly 2.0.0 (multi-step, where it imports), on the same ANN.

    python benchmarks/gpu_inference.py [--T 8] [--batch 256]

Median of CUDA-event timings after warm-up, methods interleaved; peak memory from
torch.cuda.max_memory_allocated during one run of each.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from cpu_inference import NETS, _net, spikingjelly_runner

import snnconv


def build(net: str, method: str, T: int, batch: int):
    model, shape = _net(net)
    model = model.cuda()
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(256, *shape, generator=g).cuda(), torch.rand(batch, *shape, generator=g).cuda()
    if method == "ann":
        return lambda: model(x)
    if method.startswith("snnconv"):
        snn = snnconv.convert(model, T=T, calib=calib, backend=method.split("_")[1])
        return lambda: snn(x)
    return spikingjelly_runner(model, calib, x, T)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    methods = ("ann", "snnconv_torch", "snnconv_cupy", "spikingjelly")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, T={args.T}, batch={args.batch}")
    print(f"{'network':<16}{'method':<16}{'time ms':>9}{'peak MB':>9}{'/ (T x ANN)':>12}{'SJ / this':>11}")
    for net in NETS:
        fns, times, peaks = {}, {}, {}
        with torch.no_grad():
            for m in methods:
                try:
                    fns[m] = build(net, m, args.T, args.batch)
                    for _ in range(3):
                        fns[m]()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    fns[m]()
                    torch.cuda.synchronize()
                    peaks[m], times[m] = torch.cuda.max_memory_allocated() / 2**20, []
                except Exception as exc:
                    print(f"  {net} {m}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
                    fns.pop(m, None)
            for _ in range(args.reps):
                for m, fn in fns.items():
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    fn()
                    b.record()
                    b.synchronize()
                    times[m].append(a.elapsed_time(b))
        med = {m: statistics.median(ts) * (args.T if m == "ann" else 1) for m, ts in times.items()}
        for m, t in med.items():
            label = "ANN x T" if m == "ann" else m
            print(
                f"{net:<16}{label:<16}{t:9.2f}{peaks[m]:9.0f}{t / med['ann']:12.2f}"
                f"{med.get('spikingjelly', float('nan')) / t:11.2f}"
            )


if __name__ == "__main__":
    main()
