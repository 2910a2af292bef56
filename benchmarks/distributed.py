"""Data-parallel conversion and evaluation with torch.distributed: 1 and 2 processes on this CPU (gloo,
launched by torchrun), and 1 GPU (NCCL) where one is lent. Each run calibrates a trained MNIST VGG on its
shard of 512 training images (thresholds merged across ranks) and evaluates the MNIST test set at T=8
(counts merged across ranks); rank 0 writes the results. The report: throughput of each run, whether its
thresholds and accuracy equal the 1-process run's, and its percentile thresholds' largest gap to those of a
process without torch.distributed (pct dth, over layers: max |dth| / the layer's largest threshold).

python benchmarks/distributed.py [--limit 10000] [--gpu] > benchmarks/results/distributed_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def worker(args) -> None:
    import mnist_models
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    import snnconv
    from snnconv import distributed

    device = args.device
    distributed.init_from_env(device)
    device = distributed.local_device(device)
    model = _model(args)
    (xtr, _), (xte, yte) = mnist_models.dataset("mnist", Path(args.mnist))
    calib = TensorDataset(xtr[:512])
    test = TensorDataset(xte[: args.limit], yte[: args.limit])
    out = {}
    for method in ("max", "percentile"):
        shard = DataLoader(calib, batch_size=64, sampler=DistributedSampler(calib, shuffle=False))
        distributed.barrier()
        t0 = time.perf_counter()
        snn = snnconv.convert(model, T=8, calib=shard, calib_batches=None, method=method)
        out[f"{method}_calib_s"] = time.perf_counter() - t0
        out[f"{method}_thresholds"] = {k: v.tolist() for k, v in snn.thresholds().items()}
    snn.to(device)
    distributed.barrier()
    t0 = time.perf_counter()
    r = snnconv.evaluate(snn, test, batch=args.batch, device=device, progress=False, workers=1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out["eval_s"] = time.perf_counter() - t0
    out["result"] = r
    out["world"] = distributed.world()
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(out))
    distributed.shutdown()


def _model(args):
    import mnist_models

    if args.trained:
        return mnist_models.trained("vgg", data_dir=Path(args.mnist))
    torch.manual_seed(0)  # random weights: the equality checks and throughput do not need training (chance accuracy)
    return mnist_models.FACTORIES["vgg"](28).eval()


def _plain_percentile_thresholds(args) -> dict:
    """The percentile thresholds of one process without torch.distributed, on the same 512 images."""
    import mnist_models

    import snnconv

    (xtr, _), _ = mnist_models.dataset("mnist", Path(args.mnist))
    snn = snnconv.convert(_model(args), T=8, calib=xtr[:512], method="percentile")
    return {k: v.tolist() for k, v in snn.thresholds().items()}


def launch(nproc: int, device: str, args) -> dict:
    out = Path(f"/tmp/snnconv_dist_bench_{nproc}_{device}.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # the torchrun command
        "--standalone",
        f"--nproc_per_node={nproc}",
        __file__,
        "worker",
        "--device",
        device,
        "--limit",
        str(args.limit),
        "--batch",
        str(args.batch),
        "--out",
        str(out),
        "--mnist",
        args.mnist,
        *(["--trained"] if args.trained else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    r = json.loads(out.read_text())
    r["wall_s"] = time.perf_counter() - t0
    return r


def _flat(th) -> list[float]:
    """A threshold as listed in the JSON: a float (per layer) or a list (per channel)."""
    return th if isinstance(th, list) else [th]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="bench")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out")
    p.add_argument("--mnist", default="/work/shared/data/mnist", help="folder with MNIST's idx files")
    p.add_argument("--gpu", action="store_true", help="also 1 GPU (NCCL)")
    p.add_argument("--trained", action="store_true", help="train the VGG first (one MNIST epoch, cached)")
    args = p.parse_args()
    if args.what == "worker":
        worker(args)
        return
    runs = [(1, "cpu"), (2, "cpu")] + ([(1, "cuda")] if args.gpu else [])
    flags = (" --gpu" if args.gpu else "") + (" --trained" if args.trained else "")
    print(f"# python benchmarks/distributed.py --limit {args.limit} --batch {args.batch}{flags}")
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs (shared with other jobs: throughput is indicative),")
    print(
        f"# MNIST VGG ({'trained' if args.trained else 'random weights'}), T=8, calibration on 512 training "
        "images, evaluation on the test set; torchrun --standalone"
    )
    results = {}
    for nproc, device in runs:
        results[(nproc, device)] = launch(nproc, device, args)
    ref = results[(1, "cpu")]
    plain = _plain_percentile_thresholds(args)
    head = f"{'run':<18}{'calib max s':>12}{'calib pct s':>12}{'eval s':>9}{'images/s':>10}"
    print(head + f"{'acc T=8':>9}{'same max th':>13}{'same pct th':>13}{'pct dth':>10}{'same acc':>10}")
    for (nproc, device), r in results.items():
        res = r["result"]
        same = {m: r[f"{m}_thresholds"] == ref[f"{m}_thresholds"] for m in ("max", "percentile")}
        same_acc = res["accuracy_by_T"] == ref["result"]["accuracy_by_T"] and res["samples"] == ref["result"]["samples"]
        gap = max(  # the largest percentile-threshold gap to a plain process's, in units of the layer's largest
            max(abs(a - b) for a, b in zip(_flat(th), _flat(plain[k]))) / max(_flat(plain[k]))
            for k, th in r["percentile_thresholds"].items()
        )
        print(
            f"{f'{nproc} x {device}':<18}{r['max_calib_s']:>12.2f}{r['percentile_calib_s']:>12.2f}{r['eval_s']:>9.1f}"
            f"{res['samples'] / r['eval_s']:>10.0f}{res['accuracy_by_T'][-1]:>9.2f}{same['max']!s:>13}"
            f"{same['percentile']!s:>13}{gap:>10.2e}{same_acc!s:>10}"
        )
    print("accuracy by T (1 x cpu):", [round(a, 2) for a in ref["result"]["accuracy_by_T"]])
    two = results[(2, "cpu")]["result"]
    rates = max(abs(two["firing_rates"][k] - v) for k, v in ref["result"]["firing_rates"].items())
    print(
        f"2 x cpu vs 1 x cpu: samples {two['samples']} vs {ref['result']['samples']}, "
        f"largest firing-rate gap {rates:.2e},"
    )
    print(f"  SNN energy {two['snn_energy_uj']:.6f} vs {ref['result']['snn_energy_uj']:.6f} uJ per sample")


if __name__ == "__main__":
    main()
