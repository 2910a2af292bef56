"""CPU inference time, side by side in one run: the ANN x T, snnconv with passes off and on, and
SpikingJelly 2.0.0's ann2snn (RateCodingRecipe) in multi-step mode, on the same ANN.

    python benchmarks/cpu_inference.py [--T 8] [--batch 64] [--reps 5]

Timing: all methods of a network are built in one process and run round-robin (one warm-up each), so
machine noise hits them alike; the median of `reps` is reported. Peak memory: each (network, method)
runs once more in a fresh subprocess while a sampler thread records its peak resident memory (RSS).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NETS = ("vgg_mnist", "resnet18_cifar")
METHODS = ("ann", "snnconv_passes_off", "snnconv_float32", "snnconv", "snnconv_chunk1", "spikingjelly")


def _net(name: str):
    sys.path.insert(0, HERE)
    from mnist_models import CACHE, vgg_mnist
    from models import ResNet18Cifar

    torch.manual_seed(0)
    if name == "vgg_mnist":
        model, shape = vgg_mnist(), (1, 28, 28)
        cached = sorted(CACHE.glob("vgg_mnist_*.pt")) if CACHE.is_dir() else []
        if cached:  # the trained weights if the accuracy benchmark left them; random weights time the same
            model.load_state_dict(torch.load(cached[0], weights_only=True))
    else:
        model, shape = ResNet18Cifar(), (3, 32, 32)
    return model.eval(), shape


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(fn, reps: int) -> tuple[float, float]:
    peak, stop = [_rss_mb()], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    fn()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    stop.set()
    th.join()
    return statistics.median(times), peak[0]


def build(net: str, method: str, T: int, batch: int):
    """A zero-argument callable running `method` on `net` once, plus its input batch."""
    model, shape = _net(net)
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(256, *shape, generator=g), torch.rand(batch, *shape, generator=g)
    if method == "ann":
        return lambda: model(x)
    if method.startswith("snnconv"):
        import snnconv

        float32 = sorted(snnconv.passes.OPTIONAL - {"integer_spikes"})  # every pass but the int8 convolutions
        opts = {
            "snnconv_passes_off": {"passes": []},
            "snnconv_float32": {"passes": float32},
            "snnconv": {},
            "snnconv_chunk1": {"chunk": 1},
        }[method]
        snn = snnconv.convert(model, T=T, calib=calib, **opts)
        return lambda: snn(x)
    return spikingjelly_runner(model, calib, x, T)


def spikingjelly_runner(model, calib: torch.Tensor, x: torch.Tensor, T: int):
    """The peer: SpikingJelly 2.0.0's RateCodingRecipe (99.9%) on a copy of `model`, run multi-step."""
    from spikingjelly.activation_based import ann2snn, functional

    loader = [(c,) for c in calib.split(64)]
    recipe = ann2snn.RateCodingRecipe(dataloader=loader, mode="99.9%")
    sj = ann2snn.Converter(recipe, device=str(x.device)).convert(copy.deepcopy(model))
    functional.set_step_mode(sj, "m")
    x_seq = x.unsqueeze(0).repeat(T, *([1] * x.dim()))

    def run():
        functional.reset_net(sj)
        return sj(x_seq).mean(0)

    return run


def peak_worker(net: str, method: str, T: int, batch: int) -> dict:
    """In a fresh process: build, warm up, then one run while sampling peak RSS."""
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.no_grad():
        _, peak = _measure(build(net, method, T, batch), 1)
    return {"peak_mb": peak}


def interleaved_times(net: str, methods, T: int, batch: int, reps: int) -> dict:
    """Median time of each method, runs interleaved round-robin so machine noise hits all alike."""
    torch.set_num_threads(os.cpu_count() or 1)
    fns, times = {}, {}
    with torch.no_grad():
        for m in methods:
            try:
                fns[m] = build(net, m, T, batch)
                fns[m]()  # warm-up
                times[m] = []
            except Exception as exc:  # a peer that cannot convert this net is reported, not fatal
                print(f"  {net} {m}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        for _ in range(reps):
            for m, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(ts) * (T if m == "ann" else 1) for m, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(peak_worker(*args.worker, args.T, args.batch)))
        return
    print(
        f"CPU: {os.cpu_count()} threads, torch {torch.__version__}, T={args.T}, batch={args.batch}, "
        f"median of {args.reps} interleaved runs"
    )
    rows = []
    for net in args.nets:
        times = interleaved_times(net, METHODS, args.T, args.batch, args.reps)
        for method, t in times.items():
            cmd = [sys.executable, __file__, "--worker", net, method, "--T", str(args.T), "--batch", str(args.batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"] if proc.returncode == 0 else float("nan")
            rows.append((net, method, t, peak, t / times["ann"], times.get("spikingjelly", float("nan")) / t))
    print(f"\n{'network':<16}{'method':<22}{'time ms':>9}{'peak RSS MB':>13}{'/ (T x ANN)':>12}{'SJ / this':>11}")
    for net, method, t, peak, vs_ann, vs_sj in rows:
        label = "ANN x T" if method == "ann" else method
        print(f"{net:<16}{label:<22}{t * 1e3:9.1f}{peak:13.0f}{vs_ann:12.2f}{vs_sj:11.2f}")


if __name__ == "__main__":
    main()
