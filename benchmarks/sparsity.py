"""Does skipping zeros pay on CPU? Dense int8 spike layers (runtime/integer_spikes.py, this CPU's mode)
against event-driven ones that touch only the spikes, at firing rates 1-30%, same layer, same spikes.

    python benchmarks/sparsity.py [--batch 512] [--reps 7] [--threads N]

Event-driven here: the spikes as a CSR matrix times the float32 weights (torch.sparse.mm, MKL): a
gather-add of one weight row per spike. A linear layer reads the spikes as they are; a convolution
reads its im2col patches (F.unfold of the 0/1 spikes), the CSR matrix built from them inside the
timed call, as a runtime would have to. The break-even rate is where the event-driven time crosses the
dense one; the firing rates cpu_inference.py reports say which side the networks are on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv.runtime import integer_spikes as int8
from snnconv.runtime.modules import Neuron, NeuronConfig

RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layers(batch: int):
    """(name, layer, spike shape): the VGG's hidden linear and its 64 -> 64 convolution, and ResNet-18's
    256 -> 256 convolution at CIFAR size."""
    return (
        ("linear 3136->128", nn.Linear(3136, 128), (batch, 3136)),
        ("conv 64->64 3x3 14x14", nn.Conv2d(64, 64, 3, padding=1), (batch, 64, 14, 14)),
        ("conv 256->256 3x3 8x8", nn.Conv2d(256, 256, 3, padding=1), (batch, 256, 8, 8)),
    )


def event_driven(layer: nn.Module):
    w = layer.weight.detach()
    wt = w.reshape(w.shape[0], -1).t().contiguous()  # [inputs, outputs]: one row per input a spike adds

    def run(x01: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.Linear):
            return torch.sparse.mm(x01.to_sparse_csr(), wt) + layer.bias
        n, _, h, wd = x01.shape
        cols = F.unfold(x01, layer.kernel_size, padding=layer.padding).transpose(1, 2).reshape(n * h * wd, -1)
        y = torch.sparse.mm(cols.float().to_sparse_csr(), wt) + layer.bias
        return y.view(n, h, wd, -1).permute(0, 3, 1, 2)

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512, help="T x N rows (T=8, batch 64)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
    mode = int8.mode() or "binary-emulated"
    print(f"{args.threads} threads, torch {torch.__version__}, dense int8 mode {mode}, median of {args.reps}")
    print(f"{'layer':<24}{'rate':>6}{'dense int8 ms':>15}{'event ms':>10}{'event/dense':>13}")
    with torch.no_grad():
        for name, layer, shape in layers(args.batch):
            neuron = Neuron(NeuronConfig())
            neuron.threshold = torch.tensor(1.0)
            dense = int8.SpikeLayer(layer, neuron, (name, "spikes"), mode)
            sparse = event_driven(layer)
            for rate in RATES:
                x = (torch.rand(shape) < rate).float()
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                x01 = x.contiguous()  # 0/1 float32: what unfold and the CSR conversion take
                ref = layer(x)
                err = (sparse(x01) - ref).abs().max().item()
                assert err <= 1e-3 * ref.abs().max().item(), (name, rate, err)  # the same layer
                td = _time(lambda f=dense, x=x, t=neuron.threshold: f.run(x, t), args.reps)
                te = _time(lambda f=sparse, x=x01: f(x), args.reps)
                print(f"{name:<24}{rate:6.2f}{td * 1e3:15.2f}{te * 1e3:10.2f}{te / td:13.2f}", flush=True)


if __name__ == "__main__":
    main()
