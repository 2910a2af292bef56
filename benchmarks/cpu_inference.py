"""CPU inference time, side by side in one run: the ANN x T, snnconv (float32 throughout, and with its
int8 spike layers in every mode exact on this CPU), and SpikingJelly 2.0.0's ann2snn (RateCodingRecipe)
in multi-step mode, on the same ANN; with the CPU's flags, the fast paths that ran, firing rates and
peak memory.

    python benchmarks/cpu_inference.py [--T 8] [--batch 64 1] [--reps 5] [--nets ...] [--methods ...]

Timing: all methods of a network are built in one process and run round-robin (one warm-up each), so
machine noise hits them alike; the median of `reps` is reported. Peak memory: each (network, method)
runs once more in a fresh subprocess while a sampler thread records its peak resident memory (RSS).
To time a CPU without VNNI on one that has it, cap oneDNN's instruction set and torch's kernels:
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/cpu_inference.py`.
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
# all cores by default; on a machine shared with other jobs, 1: two OpenMP threads with one descheduled
# spin at every barrier (measured: the ANN 100x slower under a load of 30, ratios meaningless)
THREADS = [os.cpu_count() or 1]
NETS = ("vgg_mnist", "resnet18_cifar", "torchvision_resnet18")
# snnconv_<mode>: every pass, the int8 layers forced to that mode ($SNNCONV_INT8); run where exact here
METHODS = ("ann", "snnconv_float32", "snnconv", "snnconv_binary", "snnconv_sparse", "spikingjelly")
# snnconv_unsigned*: binary spikes (0/theta) instead of the default signed ones (-theta too)
EXTRA = (
    "snnconv_torch_neurons",
    "snnconv_vnni",
    "snnconv_passes_off",
    "snnconv_chunk1",
    "snnconv_unsigned",
    "snnconv_unsigned_float32",
)
FLAGS = {
    "AVX2": "avx2",
    "AVX-512F": "avx512f",
    "AVX512-VNNI": "avx512_vnni",
    "AVX-VNNI": "avx_vnni",
    "AVX512-BF16": "avx512_bf16",
    "AMX-INT8": "amx_int8",
}


def cpu_line() -> str:
    """The CPU model and which of FLAGS it has (Linux /proc/cpuinfo), plus caps set in the environment."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    have = " ".join(f"{name}:{'yes' if flag in flags else 'no'}" for name, flag in FLAGS.items())
    caps = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    return f"{model}; {have}" + (f"; capped: {caps}" if caps else "")


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
    elif name == "resnet18_cifar":
        model, shape = ResNet18Cifar(), (3, 32, 32)
    else:  # torchvision's own ResNet-18 (7x7 stem, max pool) on 32x32 inputs, 10 classes, random weights
        import torchvision

        model, shape = torchvision.models.resnet18(num_classes=10), (3, 32, 32)
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


def runnable(method: str) -> bool:
    """snnconv_vnni / snnconv_binary run only where that mode's oneDNN op is exact on this CPU, snnconv_sparse
    where its kernel compiled."""
    if method in ("snnconv_vnni", "snnconv_binary", "snnconv_sparse"):
        from snnconv.runtime import integer_spikes as int8

        return int8.exact(method.split("_")[1])
    return True


def build(net: str, method: str, T: int, batch: int):
    """(a zero-argument callable running `method` on `net` once, the model it runs or None)."""
    model, shape = _net(net)
    g = torch.Generator().manual_seed(1)
    calib, x = torch.rand(256, *shape, generator=g), torch.rand(batch, *shape, generator=g)
    if method == "ann":
        return (lambda: model(x)), None
    if method.startswith("snnconv"):
        import snnconv
        from snnconv import config

        float32 = sorted(snnconv.passes.OPTIONAL - {"integer_spikes"})  # every pass but the int8 layers
        opts = {
            "snnconv_passes_off": {"passes": []},
            "snnconv_torch_neurons": {"backend": "torch"},  # neurons as torch ops, not the fused CPU kernel
            "snnconv_float32": {"passes": float32},
            "snnconv_unsigned": {"signed_spikes": False},
            "snnconv_unsigned_float32": {"signed_spikes": False, "passes": float32},
        }.get(method, {})
        if method == "snnconv_chunk1":
            opts = {"chunk": 1}
        forced = {"snnconv_vnni": "vnni", "snnconv_binary": "binary", "snnconv_sparse": "sparse"}.get(method)
        with config.Context(**({config.INT8.name: forced} if forced else {})):
            snn = snnconv.convert(model, T=T, calib=calib, **opts)
        return (lambda: snn(x)), snn
    return spikingjelly_runner(model, calib, x, T), None


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


def fast_paths(snn, fn) -> tuple[str, dict]:
    """What one run of `snn` executed: int8 spike layers by mode, float convolutions and linear layers,
    neuron layers; and each neuron layer's firing rate (spikes per neuron per step)."""
    import torch.nn as nn

    from snnconv.runtime import integer_spikes as int8
    from snnconv.runtime.modules import FoldedBN

    counts, spikes, sizes, hooks = {}, {}, {}, []

    def count(kind):
        return lambda m, i, o: counts.__setitem__(kind, counts.get(kind, 0) + 1)

    for m in snn.graph_module.modules():
        if isinstance(m, int8.SpikeLayer):
            hooks.append(m.register_forward_hook(count(f"int8-{m.mode}")))
        elif isinstance(m, (nn.Conv2d, nn.Linear, FoldedBN)):
            hooks.append(m.register_forward_hook(count("float32 conv/linear")))
    for name, m in snn.neurons().items():

        def on_neuron(m, i, o, name=name):
            spikes[name] = spikes.get(name, 0) + int((o != 0).sum())
            sizes[name] = sizes.get(name, 0) + o.numel()

        hooks.append(m.register_forward_hook(on_neuron))
    neurons = snn.neurons().values()
    for m in neurons:
        m.calls.update(kernel=0, cpu=0, torch=0)
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    for kind, label in (("cpu", "neurons on the CPU kernel"), ("torch", "neurons on torch ops")):
        if sum(m.calls[kind] for m in neurons):
            counts[label] = sum(m.calls[kind] for m in neurons)
    paths = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    return paths, {k: spikes[k] / max(sizes[k], 1) for k in spikes}


def peak_worker(net: str, method: str, T: int, batch: int) -> dict:
    """In a fresh process: build, warm up, then one run while sampling peak RSS."""
    torch.set_num_threads(THREADS[0])
    with torch.no_grad():
        _, peak = _measure(build(net, method, T, batch)[0], 1)
    return {"peak_mb": peak}


def interleaved_times(net: str, methods, T: int, batch: int, reps: int) -> tuple[dict, dict]:
    """Median time of each method, runs interleaved round-robin so machine noise hits all alike; and
    for each snnconv method, the fast paths it ran and its firing rates."""
    torch.set_num_threads(THREADS[0])
    fns, times, info = {}, {}, {}
    with torch.no_grad():
        for m in methods:
            try:
                fns[m], snn = build(net, m, T, batch)
                if snn is not None:  # the warm-up run, counting what ran
                    info[m] = fast_paths(snn, fns[m])
                else:
                    fns[m]()  # warm-up
                times[m] = []
            except Exception as exc:  # a peer that cannot convert this net is reported, not fatal
                print(f"  {net} {m}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        for _ in range(reps):
            for m, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(ts) * (T if m == "ann" else 1) for m, ts in times.items()}, info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS + EXTRA)
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores; 1 on a loaded machine)"
    )
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        THREADS[0] = args.threads
    if args.worker:
        print(json.dumps(peak_worker(*args.worker, args.T, args.batch[0])))
        return
    from snnconv import config
    from snnconv.runtime import integer_spikes as int8

    methods = ["ann"] + [m for m in args.methods if m != "ann" and runnable(m)]
    print(f"CPU: {cpu_line()}")
    exact = ", ".join(f"{m}:{'exact' if int8.exact(m) else 'not exact'}" for m in ("vnni", "binary"))
    sparse = "compiled" if int8.exact("sparse") else "not compiled"
    print(
        f"int8 spike layers: oneDNN u8 x s8 {exact}; event-driven kernel {sparse}; default mode here: {int8.mode()} "
        f"(${config.INT8.name}={config.INT8.get()})"
    )
    from snnconv.runtime import cpu_kernel

    why = cpu_kernel.why_not()
    print(f"fused CPU neuron kernel: {'compiled, runs' if why is None else 'not running: ' + why}")
    print(
        f"{THREADS[0]} of {os.cpu_count()} threads, torch {torch.__version__}, T={args.T}, batch {args.batch}, "
        f"median of {args.reps} interleaved runs"
    )
    print(
        f"\n{'network':<22}{'batch':>6}  {'method':<17}{'time ms':>9}{'/ (T x ANN)':>12}{'SJ / this':>11}  "
        "fast paths that ran (calls in one run); firing rates (spikes per neuron per step)"
    )
    rows = []
    for batch in args.batch:
        for net in args.nets:
            times, info = interleaved_times(net, methods, args.T, batch, args.reps)
            for method, t in times.items():  # printed as measured: a long run shows what it has so far
                label = "ANN x T" if method == "ann" else method
                sj = times.get("spikingjelly", float("nan")) / t
                line = f"{net:<22}{batch:>6}  {label:<17}{t * 1e3:9.1f}{t / times['ann']:12.2f}{sj:11.2f}"
                if method in info:
                    paths, rates = info[method]
                    r = list(rates.values())
                    line += f"  {paths}; rates mean {sum(r) / len(r):.3f} ({min(r):.3f}-{max(r):.3f}, {len(r)} layers)"
                print(line, flush=True)
                rows.append((net, batch, method))
    if args.no_peak:
        return
    print("\npeak resident memory, MB (each in a fresh process: build, warm up, one run)")
    for net, batch, method in rows:
        cmd = [sys.executable, __file__, "--worker", net, method, "--T", str(args.T), "--batch", str(batch)]
        cmd += ["--threads", str(THREADS[0])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"] if proc.returncode == 0 else float("nan")
        print(f"{net:<22}{batch:>6}  {'ANN' if method == 'ann' else method:<17}{peak:9.0f}", flush=True)


if __name__ == "__main__":
    main()
