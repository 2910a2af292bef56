"""GPU neuron kernel: time and achieved bandwidth vs a device-to-device copy of the same bytes (the floor),
the torch backend, and torch.compile of the torch backend.

    python benchmarks/gpu_neuron.py [--T 4 8 16 32] [--logN 20 22 24 26] [--dtypes float32 float16]
                                    [--layouts scalar per_channel per_channel_cl]

Layouts: 'scalar' one threshold, a flat [T, N] input; 'per_channel' N neurons as [N / 2^14, 64, 16, 16]
NCHW with 64 per-channel thresholds (the conversion's default); 'per_channel_cl' the same channels-last
(what a CPU conversion's channels-last convolutions hand the neurons): kernel share must stay 100%.

Bytes counted: x read once (T*N elements), spikes written once (T*N), membrane read and written (2*N f32).
Times: median of CUDA-event timings after warm-up, rotating among input buffers to defeat L2.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch

from snnconv.runtime import cupy_backend, torch_backend


def timed(fn, reps=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def if_loop(x, v, theta):
    """The torch backend's arithmetic, functional, for torch.compile."""
    outs = []
    for t in range(x.shape[0]):
        v = v + x[t]
        o = (v >= theta) * theta
        v = v - o
        outs.append(o.to(x.dtype))
    return torch.stack(outs), v


C, HW = 64, 16  # per-channel layouts: [N / (C * HW * HW), C, HW, HW]


def tensors(layout: str, dtype: torch.dtype, T: int, N: int, nbuf: int):
    """(inputs [T, ...] x nbuf, out, v, theta) for N neurons in `layout`."""
    if layout == "scalar":
        shape, theta = (N,), torch.tensor(0.5, device="cuda")
    else:
        shape = (N // (C * HW * HW), C, HW, HW)
        theta = (torch.rand(C, device="cuda") * 0.5 + 0.25).view(-1, 1, 1)
    fmt = torch.channels_last if layout == "per_channel_cl" else torch.contiguous_format

    def make(t):  # [T, ...] as the neuron sees it: a view of a [T * n, ...] tensor in `fmt`
        return t.flatten(0, 1).contiguous(memory_format=fmt).view(t.shape) if len(shape) == 4 else t

    xs = [make(torch.rand(T, *shape, device="cuda").to(dtype)) for _ in range(nbuf)]
    out = make(torch.empty(T, *shape, device="cuda", dtype=dtype))
    v = torch.full(shape, 0.25, device="cuda").contiguous(memory_format=fmt)
    return xs, out, v, theta


def measure(dtype: torch.dtype, T: int, logN: int, compiled, layout: str = "scalar"):
    N = 1 << logN
    if T * N * dtype.itemsize * 2 * 2 > torch.cuda.mem_get_info()[0] * 0.8 or (layout != "scalar" and logN < 14):
        return None
    nbuf = 2 if T * N * dtype.itemsize > (1 << 28) else 4
    xs, out, v, theta = tensors(layout, dtype, T, N, nbuf)
    nbytes = 2 * T * N * dtype.itemsize + 2 * N * 4
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src))
    it = itertools.cycle(xs)
    kw = dict(steps=T, static=False, soft_reset=True, v_reset=0.0, decay=1.0, out=out)
    calls = {}
    t_k = timed(lambda: cupy_backend.multistep(next(it), v, theta, calls=calls, **kw))
    if calls.get("torch"):
        raise RuntimeError(f"{layout}: the kernel left {calls['torch']} calls to torch")
    t_t = timed(lambda: torch_backend.multistep(next(it), v, theta, **kw), reps=5)
    t_c = timed(lambda: compiled(next(it), v, theta), reps=10) if compiled else float("nan")
    torch.cuda.empty_cache()
    return (
        layout,
        str(dtype).split(".")[1],
        T,
        f"2^{logN}",
        nbytes / t_copy / 1e9,
        t_k * 1e3,
        nbytes / t_k / 1e9,
        100 * t_copy / t_k,
        t_t * 1e3,
        t_c * 1e3,
        t_t / t_k,
        t_c / t_k,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--logN", type=int, nargs="+", default=[20, 22, 24, 26])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    ap.add_argument("--layouts", nargs="+", default=["scalar", "per_channel", "per_channel_cl"])
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    cupy_backend.check_available()
    print(f"device: {torch.cuda.get_device_name()}")
    torch._dynamo.config.recompile_limit = 64  # one compile per (T, dtype)
    compiled = None if args.no_compile else torch.compile(if_loop, dynamic=True)
    header = (
        f"{'layout':>15} {'dtype':>8} {'T':>3} {'N':>6} {'copy GB/s':>10} {'kernel ms':>10} {'GB/s':>7} {'% copy':>7} "
        f"{'torch ms':>9} {'compile ms':>10} {'vs torch':>9} {'vs compile':>10}"
    )
    print(header)
    rows = []
    for layout, dtype_name, T, logN in itertools.product(args.layouts, args.dtypes, args.T, args.logN):
        row = measure(getattr(torch, dtype_name), T, logN, compiled, layout)
        if row is None:
            continue
        rows.append(row)
        print(
            f"{row[0]:>15} {row[1]:>8} {row[2]:>3} {row[3]:>6} {row[4]:10.0f} {row[5]:10.3f} {row[6]:7.0f} "
            f"{row[7]:6.1f}% {row[8]:9.3f} {row[9]:10.3f} {row[10]:8.1f}x {row[11]:9.1f}x",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
