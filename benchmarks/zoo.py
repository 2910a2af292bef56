"""torchvision's zoo through snnconv: conversion time, SNN(T=32) vs ANN agreement, CPU time ratio.

    python benchmarks/zoo.py [--size 96] [--models resnet18 ...]   (needs torchvision; random weights)

Agreement: top-1 agreement and relative output error ||SNN - ANN|| / ||ANN|| on 32 fixed random inputs,
thresholds calibrated on 64 other random inputs. Time: SNN(T=8) / (8 x ANN), batch 8, median of 3.
Also runs the zoo tests marked slow: `pytest -m slow tests/test_zoo.py`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_zoo import CI, REST, UNSUPPORTED, build, input_size

import snnconv


def _time(fn, reps=3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def row(name: str, size: int) -> str:
    model = build(name)
    hw = max(size, 80) if name == "inception_v3" else input_size(name) if name == "vit_b_16" else size
    g = torch.Generator().manual_seed(3)
    calib, x = torch.rand(64, 3, hw, hw, generator=g), torch.rand(32, 3, hw, hw, generator=g)
    t0 = time.perf_counter()
    try:
        snn = snnconv.convert(model, T=32, calib=calib)
    except snnconv.ConversionError as exc:
        first = str(exc).splitlines()[0]
        return f"{name:<22} rejected: {first[first.find('network (') + 9 : first.rfind(')')]}"
    t_conv = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(x)
        out = torch.cat([snn(b) for b in x.split(8)])
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item() * 100
        rel = ((out - ref).norm() / ref.norm()).item()
        xb = x[:8]
        snn.T = 8
        t_ann, t_snn = _time(lambda: model(xb)), _time(lambda: snn(xb))
    return f"{name:<22}{t_conv:9.2f}{agree:10.1f}{rel:10.4f}{t_snn / (8 * t_ann):12.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--models", nargs="+", default=CI + REST + sorted(UNSUPPORTED))
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size}x{args.size}")
    print(f"{'model':<22}{'conv s':>9}{'top-1 %':>10}{'rel err':>10}{'T=8 / 8ANN':>12}")
    for name in args.models:
        print(row(name, args.size), flush=True)


if __name__ == "__main__":
    main()
