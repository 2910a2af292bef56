"""What keeping freed memory (runtime/malloc.py) is worth on CPU: each network's snnconv / (T x ANN) time with
glibc's malloc as snnconv sets it and with SNNCONV_CPU_MALLOC=off, and one int8 convolution alone (ResNet-18
CIFAR's layer 1: 64 -> 64 channels, 32 x 32, 128 samples, a 33.5 MiB output).

    python benchmarks/cpu_malloc.py [--threads 1 2] [--rounds 2] [--reps 7] [--nets vgg_mnist resnet18_cifar]

The setting is process-wide and a heap once grown serves later blocks either way, so every measurement runs in
its own interpreter; the two settings alternate, `rounds` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def child(what: str, reps: int) -> dict:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with torch.no_grad():
        if what == "conv":  # one int8 convolution as SpikeLayer runs it ('vnni': [127 u, u] against [hi, lo])
            from snnconv.runtime import integer_spikes as int8
            from snnconv.runtime.malloc import keep_freed_memory

            if os.environ.get("SNNCONV_CPU_MALLOC") != "off":
                keep_freed_memory()  # what the first spiking call does
            g = torch.Generator().manual_seed(0)
            w = torch.randint(-127, 128, (64, 128, 3, 3), generator=g, dtype=torch.int8)
            x = torch.randint(0, 255, (128, 128, 32, 32), generator=g, dtype=torch.uint8)
            x = x.contiguous(memory_format=torch.channels_last)
            s, geometry = torch.full((64,), 1e-3), ((1, 1), (1, 1), (1, 1))
            packed = int8._pack_conv(w, s, *geometry, False, x.shape)
            sys.path.insert(0, HERE)
            from sparsity import _time  # median seconds of reps calls after one warm-up

            return {"conv": _time(lambda: int8._qconv(packed, x, s, None, *geometry), reps) * 1e3}
        sys.path.insert(0, HERE)
        from cpu_inference import build

        snn, _ = build(what, "snnconv", 8, 64)
        ann, _ = build(what, "ann", 8, 64)
        snn(), ann()
        times = {"snn": [], "ann": []}
        for _ in range(reps):  # interleaved, as cpu_inference.py does
            for name, fn in (("snn", snn), ("ann", ann)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        return {**med, "ratio": med["snn"] / (8 * med["ann"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count() or 1])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--nets", nargs="+", default=["vgg_mnist", "resnet18_cifar"])
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.reps)))
        return
    sys.path.insert(0, HERE)
    from cpu_inference import cpu_line

    print(f"CPU: {cpu_line()}; torch {torch.__version__}; T=8, batch 64, median of {a.reps}, {a.rounds} rounds")
    print(f"{'threads':>7}  {'case':16} {'malloc':8} {'per round':30} median")
    for threads in a.threads:
        for what in ["conv", *a.nets]:
            results = {"kept": [], "off": []}
            for _ in range(a.rounds):
                for setting in results:
                    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                    if setting == "off":
                        env["SNNCONV_CPU_MALLOC"] = "off"
                    cmd = [sys.executable, __file__, "--child", what, "--reps", str(a.reps)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                    results[setting].append(r["conv"] if what == "conv" else r["ratio"])
            for setting, values in results.items():
                unit = "ms" if what == "conv" else "x (T x ANN)"
                rounds = " ".join(f"{v:.3f}" if what != "conv" else f"{v:.1f}" for v in values)
                print(f"{threads:>7}  {what:16} {setting:8} {rounds:30} {statistics.median(values):.3f} {unit}")


if __name__ == "__main__":
    main()
