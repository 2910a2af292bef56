"""torchvision's zoo through snnconv: conversion time, SNN(T=32) vs ANN agreement, CPU time ratio.

    python benchmarks/zoo.py [--size 96] [--models resnet18 ...]   (needs torchvision; random weights)
    python benchmarks/zoo.py --timm --size 64 [--T 64] [--cap 120]  (every timm ReLU/ReLU6 model; needs timm)

Agreement: top-1 agreement and relative output error ||SNN - ANN|| / ||ANN|| on 32 fixed random inputs,
thresholds calibrated on 64 other random inputs. Time: SNN(T=8) / (8 x ANN), batch 8, median of 3.
Also runs the zoo tests marked slow: `pytest -m slow tests/test_zoo.py`.
"""

from __future__ import annotations

import argparse
import gc
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


# ---- timm: every model whose activations are all ReLU/ReLU6 (random weights)

_TIMM_CACHE = Path(__file__).resolve().parent / "results" / "zoo_timm_candidates.txt"
_NOT_RELU = {  # activation classes by lower-case name (torch's and timm's own)
    "silu", "swish", "gelu", "gelutanh", "quickgelu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "mish",
    "leakyrelu", "elu", "prelu", "celu", "selu", "softplus", "softmax", "glu", "swiglu", "swiglupacked",
    "hardswishme", "hardsigmoidme", "swishme", "mishme", "gluv2", "softsign", "logsigmoid", "tanhshrink",
    "softshrink", "hardshrink", "rrelu", "threshold", "sigmoidme", "relusquared", "starrelu", "gelumish",
}  # fmt: skip


def timm_candidates(refresh: bool = False) -> list[tuple[str, int]]:
    """(name, parameter count) of every timm model with ReLU/ReLU6 modules and no other activation module,
    built on the meta device; cached per timm version in results/zoo_timm_candidates.txt."""
    import timm
    import torch.nn as nn

    head = f"timm {timm.__version__}"
    if _TIMM_CACHE.exists() and not refresh:
        lines = _TIMM_CACHE.read_text().splitlines()
        if lines and lines[0] == head:
            return [(n, int(p)) for n, p in (ln.split() for ln in lines[1:])]
    others = (nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.LeakyReLU, nn.ELU)
    others += (nn.PReLU, nn.Softmax)
    out = []
    for name in timm.list_models():
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:
            continue
        types = {type(x) for x in m.modules()}
        relu = any(issubclass(t, (nn.ReLU, nn.ReLU6)) for t in types)
        if relu and not any(t.__name__.lower() in _NOT_RELU or issubclass(t, others) for t in types):
            out.append((name, sum(p.numel() for p in m.parameters())))
    _TIMM_CACHE.write_text("\n".join([head] + [f"{n} {p}" for n, p in out]) + "\n")
    return out


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def timm_row(name: str, size: int, T: int, cap: int) -> tuple[str, str]:
    """(status, line): status 'converted', 'refused', 'failed', 'crash' (inside snn(x)) or 'timeout'."""
    import signal

    import timm

    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(cap)
    stage = "build"
    try:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        cfg_size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        stage = "ann"
        for hw in dict.fromkeys((size, 2 * size, cfg_size)):  # the smallest size the model accepts
            g = torch.Generator().manual_seed(3)
            calib, x = torch.rand(4, 3, hw, hw, generator=g), torch.rand(2, 3, hw, hw, generator=g)
            try:
                with torch.no_grad():
                    ref = model(x)
                break
            except Exception as exc:
                err = exc
        else:
            return "failed", f"{name:<34} ANN fails on inputs up to {hw}x{hw}: {type(err).__name__}"
        stage = "convert"
        t0 = time.perf_counter()
        try:
            snn = snnconv.convert(model, T=T, calib=calib, calib_batches=2)
        except snnconv.ConversionError as exc:
            first = str(exc).splitlines()[0]
            why = first[first.find("network (") + 9 : first.rfind(")")] if "network (" in first else first[:150]
            return "refused", f"{name:<34} {hw:>4} refused: {why}"
        t_conv = time.perf_counter() - t0
        keys = list(snn.state_dict()) == list(model.state_dict())
        snn.load_state_dict(model.state_dict(), strict=True)
        model.load_state_dict(snn.state_dict(), strict=True)
        stage = "snn"
        with torch.no_grad():
            out = snn(x)
        rel = ((out - ref).norm() / ref.norm()).item()
        return "converted", f"{name:<34} {hw:>4} {t_conv:8.1f} {rel:9.4f}  keys {'same' if keys else 'CHANGED'}"
    except _Timeout:
        return "timeout", f"{name:<34} timeout after {cap} s (in {stage})"
    except Exception as exc:
        status = "crash" if stage == "snn" else "failed"
        msg = str(exc).splitlines()[0][:150] if str(exc) else ""
        return status, f"{name:<34} {status} in {stage}: {type(exc).__name__}: {msg}"
    finally:
        signal.alarm(0)


def timm_sweep(args) -> None:
    import timm

    cands = sorted(timm_candidates(args.refresh), key=lambda c: c[1])  # small models first
    if args.models:
        cands = [c for c in cands if c[0] in args.models]
    out = Path(args.out)
    done = {}
    if args.resume and out.exists():
        for ln in out.read_text().splitlines():
            if ln.startswith("| "):
                status, rest = ln[2:].split(" | ", 1)
                done[rest.split()[0]] = (status, rest)
    cmd = "python benchmarks/zoo.py " + " ".join(sys.argv[1:])
    head = [
        cmd,
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, random weights,",
        f"input {args.size}x{args.size} (or the smallest size the model accepts), T={args.T}, batch 2, "
        f"calibration 4 inputs, cap {args.cap} s per model; {len(cands)} timm models whose activations are all "
        "ReLU/ReLU6",
        "| status | model | input | convert s | rel err | state_dict keys  (or the reason)",
    ]
    counts: dict[str, int] = {}
    rows = []
    with open(out, "w") as f:
        f.write("\n".join(head) + "\n")
        for name, _ in cands:
            status, line = done.get(name) or timm_row(name, args.size, args.T, args.cap)
            counts[status] = counts.get(status, 0) + 1
            rows.append((status, line))
            f.write(f"| {status} | {line}\n")
            f.flush()
            print(f"{status:<10} {line}", flush=True)
            gc.collect()
        summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        f.write(f"summary: {len(cands)} models: {summary}\n")
    print("summary:", summary)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--timm", action="store_true", help="sweep timm's ReLU/ReLU6 models instead of torchvision's")
    ap.add_argument("--T", type=int, default=64, help="time steps of the timm sweep")
    ap.add_argument("--cap", type=int, default=120, help="seconds per timm model")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "zoo_timm.txt"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    ap.add_argument("--refresh", action="store_true", help="rebuild the cached timm candidate list")
    args = ap.parse_args(argv)
    if args.timm:
        return timm_sweep(args)
    args.models = args.models or CI + REST + sorted(UNSUPPORTED)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size}x{args.size}")
    print(f"{'model':<22}{'conv s':>9}{'top-1 %':>10}{'rel err':>10}{'T=8 / 8ANN':>12}")
    for name in args.models:
        print(row(name, args.size), flush=True)


if __name__ == "__main__":
    main()
