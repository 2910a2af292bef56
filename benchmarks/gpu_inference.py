"""GPU inference time of whole converted networks: the ANN x T, snnconv with its torch backend and with
its CuPy kernels, and SpikingJelly 2.0.0 (multi-step, where it imports), on the same ANN.

    python benchmarks/gpu_inference.py [--T 8] [--batch 256]

snnconv rows (all with the default per-channel thresholds unless named):
- snnconv_torch / snnconv_cupy: converted on the GPU (the passes keep NCHW there), torch backend / kernels;
- snnconv_cupy_cpu_plan: the default passes run on the CPU (channels-last convolutions where they choose
  it), then `.to('cuda')`: what `snnconv run --device cuda` does with a checkpoint converted on a CPU;
- snnconv_cupy_per_layer: one threshold per layer (scalar), converted on the GPU.
Column `kernel`: the share of neuron calls the fused kernel served (the rest ran on the torch backend).
Median of CUDA-event timings after warm-up, methods interleaved; peak memory from
torch.cuda.max_memory_allocated during one run of each.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from cpu_inference import NETS, _net, spikingjelly_runner

import snnconv

METHODS = ("ann", "snnconv_torch", "snnconv_cupy", "snnconv_cupy_cpu_plan", "snnconv_cupy_per_layer", "spikingjelly")


def build(net: str, method: str, T: int, batch: int):
    """(a function running one batch, the converted SNN or None)."""
    model, shape = _net(net)
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(256, *shape, generator=g), torch.rand(batch, *shape, generator=g).cuda()
    if method == "snnconv_cupy_cpu_plan":  # the CPU's layout plan, then moved
        snn = snnconv.convert(model, T=T, calib=calib).cuda()  # backend "auto": the kernel column says which ran
        return (lambda: snn(x)), snn
    model, calib = model.cuda(), calib.cuda()
    if method == "ann":
        return (lambda: model(x)), None
    if method.startswith("snnconv"):
        kw = {"per_channel": False} if method.endswith("per_layer") else {}
        snn = snnconv.convert(model, T=T, calib=calib, backend=method.split("_")[1], **kw)
        return (lambda: snn(x)), snn
    return spikingjelly_runner(model, calib, x, T), None


def kernel_share(snn) -> str:
    if snn is None:
        return "-"
    calls = [n.calls for n in snn.neurons().values()]
    k, total = sum(c["kernel"] for c in calls), sum(c["kernel"] + c["torch"] for c in calls)
    return f"{100 * k / max(total, 1):.0f}%"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, T={args.T}, batch={args.batch}")
    print(f"{'network':<16}{'method':<24}{'time ms':>9}{'peak MB':>9}{'/ (T x ANN)':>12}{'SJ / this':>11}{'kernel':>8}")
    for net in NETS:
        fns, snns, times, peaks = {}, {}, {}, {}
        with torch.no_grad():
            for m in METHODS:
                try:
                    fns[m], snns[m] = build(net, m, args.T, args.batch)
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
                f"{net:<16}{label:<24}{t:9.2f}{peaks[m]:9.0f}{t / med['ann']:12.2f}"
                f"{med.get('spikingjelly', float('nan')) / t:11.2f}{kernel_share(snns[m]):>8}"
            )


if __name__ == "__main__":
    main()
