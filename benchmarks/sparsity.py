"""Does skipping zeros pay on CPU? The same spiking layer, same signed spikes, at firing rates 2-40%: float32
(oneDNN), each dense int8 mode exact here (oneDNN u8 x s8, runtime/integer_spikes.py), and the event-driven
integer kernel ('sparse', runtime/sparse_layer.py: one weight row added per spike), side by side.

    python benchmarks/sparsity.py [--batch 512] [--reps 5] [--threads N] [--rates ...]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/sparsity.py   # a CPU without VNNI

The break-even rate is where 'sparse' stops being the fastest; the firing rates cpu_inference.py reports say
which side the networks are on. Each integer path is checked against the float32 layer before it is timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

from snnconv.runtime import integer_spikes as int8
from snnconv.runtime.modules import Neuron
from snnconv.settings import NeuronConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_inference import cpu_line

RATES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4)


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layers(batch: int):
    """(name, layer, spike shape): the VGG's layers and ResNet-18's (CIFAR size) 3x3 convolutions per stage."""
    return (
        ("linear 3136->128", nn.Linear(3136, 128), (batch, 3136)),
        ("conv 32->32 3x3 28x28", nn.Conv2d(32, 32, 3, padding=1), (batch, 32, 28, 28)),
        ("conv 64->64 3x3 32x32", nn.Conv2d(64, 64, 3, padding=1), (batch, 64, 32, 32)),
        ("conv 128->128 3x3 16x16", nn.Conv2d(128, 128, 3, padding=1), (batch, 128, 16, 16)),
        ("conv 256->256 3x3 8x8", nn.Conv2d(256, 256, 3, padding=1), (batch, 256, 8, 8)),
        ("conv 512->512 3x3 4x4", nn.Conv2d(512, 512, 3, padding=1), (batch, 512, 4, 4)),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512, help="T x N rows (T=8, batch 64)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rates", type=float, nargs="+", default=RATES)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    modes = [m for m in ("vnni", "binary", "sparse") if int8.exact(m)]
    print(f"CPU: {cpu_line()}")
    print(f"{args.threads} threads, torch {torch.__version__}, median of {args.reps}; mode chosen here: {int8.mode()}")
    print(f"{'layer':<25}{'rate':>6}{'float32 ms':>12}" + "".join(f"{m + ' ms':>12}" for m in modes) + "  fastest")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer, shape in layers(args.batch):
            neuron = Neuron(NeuronConfig(signed=True))
            neuron.threshold = torch.tensor(1.0)
            paths = {m: int8.SpikeLayer(layer, neuron, (name, "spikes"), m) for m in modes}
            for rate in args.rates:
                r = torch.rand(shape, generator=g)
                x = (r < rate * 0.7).float() - ((r >= rate * 0.7) & (r < rate)).float()  # 30% of spikes negative
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                ref = layer(x)
                for m, path in paths.items():  # the same layer, to the weights' 15-16-bit rounding
                    err = (path.run(x, neuron.threshold) - ref).abs().max().item()
                    assert err <= 1e-3 * ref.abs().max().item(), (name, rate, m, err)
                times = {"float32": _time(lambda f=layer, x=x: f(x), args.reps)}
                for m, path in paths.items():
                    times[m] = _time(lambda p=path, x=x, t=neuron.threshold: p.run(x, t), args.reps)
                cells = "".join(f"{t * 1e3:12.1f}" for t in times.values())
                print(f"{name:<25}{rate:6.2f}{cells}  {min(times, key=times.get)}", flush=True)


if __name__ == "__main__":
    main()
