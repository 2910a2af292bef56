"""torchvision's zoo through snnconv: conversion time, SNN(T=32) vs ANN agreement, CPU time ratio.

    python benchmarks/zoo.py [--size 96] [--models resnet18 ...]   (needs torchvision; random weights)
    python benchmarks/zoo.py --timm --size 32 [--T 64] [--cap 240]  (every timm ReLU/ReLU6 model; needs timm)
    python benchmarks/zoo.py --timm --all --size 32 --cap 120  (every timm architecture: the smallest model of
                                                                 each model-defining module; needs timm)

Agreement: top-1 agreement and relative output error ||SNN - ANN|| / ||ANN|| on 32 fixed random inputs,
thresholds calibrated on 64 other random inputs. Time: SNN(T=8) / (8 x ANN), batch 8, median of 3.
Also runs the zoo tests marked slow: `pytest -m slow tests/test_zoo.py`.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

import snnconv

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")


def _time(fn, reps=3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def row(name: str, size: int) -> str:
    sys.path.insert(0, _TESTS)
    from conftest import _tv_model as build  # the zoo tests' builder (torchvision needed only here)
    from test_zoo import input_size

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


_ALL_CACHE = Path(__file__).resolve().parent / "results" / "zoo_timm_all_candidates.txt"


def timm_families(refresh: bool = False) -> tuple[list[tuple[str, int]], dict[str, str], int]:
    """Every timm architecture, one model each: timm's model-defining module (its family, from
    timm.models._registry's model-to-module map) represented by its smallest model by parameter count
    (built on the meta device; ties: the first name). Returns ([(name, params)], {name: family}, number of
    model names in timm); cached per timm version in results/zoo_timm_all_candidates.txt."""
    import timm
    from timm.models._registry import _model_to_module

    head = f"timm {timm.__version__}"
    if _ALL_CACHE.exists() and not refresh:
        lines = _ALL_CACHE.read_text().splitlines()
        if len(lines) > 1 and lines[0] == head:
            rows = [ln.split() for ln in lines[2:]]
            return [(n, int(p)) for n, p, _ in rows], {n: f for n, _, f in rows}, int(lines[1].split()[0])
    names = timm.list_models()
    best: dict[str, tuple[int, str]] = {}
    for name in names:
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:  # not buildable with defaults: not a candidate (counted in the file's second line)
            continue
        fam, params = _model_to_module.get(name, "?"), sum(p.numel() for p in m.parameters())
        if fam not in best or params < best[fam][0]:
            best[fam] = (params, name)
    rows = sorted((n, p, f) for f, (p, n) in best.items())
    lines = [head, f"{len(names)} model names, {len({_model_to_module.get(n, '?') for n in names})} families"]
    _ALL_CACHE.write_text("\n".join(lines + [f"{n} {p} {f}" for n, p, f in rows]) + "\n")
    return [(n, p) for n, p, _ in rows], {n: f for n, _, f in rows}, len(names)


def _build(name: str, hw: int):
    """timm's model `name` with random weights (seed 0) for hw x hw inputs: img_size=hw where its constructor
    takes it (ViTs, Swin, MLP-Mixers fix their token grid at construction), else the default model."""
    import timm

    torch.manual_seed(0)
    try:
        return timm.create_model(name, pretrained=False, img_size=hw).eval(), True
    except TypeError:  # the constructor takes no img_size
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval(), False


def _phase(name: str) -> None:
    print(f"phase {name}", flush=True)  # the driver reads the last one when it has to kill the process


def ann_near_zero(ann_norm: float, numel: int) -> bool:
    """An ANN output whose RMS is below 1e-6 (lcnetv2_small's zero-initialised head: ||ANN|| 3e-13): a relative
    error against it is meaningless, the row reports 'ANN output ~0' and the absolute error instead."""
    return ann_norm < 1e-6 * max(numel, 1) ** 0.5


def timm_one(name: str, size: int, T: int, img_size: bool = False) -> None:
    """Measure one model in this (fresh) process; print 'phase ...' lines as it goes, then one line
    'row STATUS|LINE' with STATUS 'converted' or 'refused'. Any other exception escapes: the driver records
    it as a crash in the last phase printed. img_size: build the model for each tried input size where its
    constructor takes img_size (else models with a fixed token grid only run at their default size)."""
    import timm

    _phase("build")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    cfg_size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    _phase("ann")
    err = None
    for hw in sorted({size, 2 * size, 4 * size, cfg_size}):  # the smallest size the model accepts
        g = torch.Generator().manual_seed(3)
        calib, x = torch.rand(4, 3, hw, hw, generator=g), torch.rand(2, 3, hw, hw, generator=g)
        try:
            if img_size:
                model = _build(name, hw)[0]
            with torch.no_grad():
                ref = model(x)
            break
        except Exception as exc:
            err = exc
    else:
        raise RuntimeError(f"the ANN itself fails on inputs up to {hw}x{hw}: {type(err).__name__}: {err}")
    _phase(f"convert {hw}")
    t0 = time.perf_counter()
    try:
        snn = snnconv.convert(model, T=T, calib=calib, calib_batches=2)
    except snnconv.ConversionError as exc:
        first = str(exc).splitlines()[0]
        ops = first[first.find("network (") + 9 : first.rfind(")")] if "network (" in first else first[:200]
        whys = dict.fromkeys(ln.strip()[5:] for ln in str(exc).splitlines() if ln.strip().startswith("why: "))
        why = "; ".join(w[:90] for w in whys)  # each distinct reason once
        print(f"row refused|{name:<34} {hw:>4} refused: {ops}" + (f" -- {why}" if why else ""), flush=True)
        return
    t_conv = time.perf_counter() - t0
    _phase("keys")
    keys = list(snn.state_dict()) == list(model.state_dict())
    snn.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(snn.state_dict(), strict=True)
    _phase("snn")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = snn(x)
    t_snn = time.perf_counter() - t0
    diff, ann = (out - ref).norm().item(), ref.norm().item()
    keys = "same, strict load both ways" if keys else "CHANGED"
    if ann_near_zero(ann, ref.numel()):  # a relative error against ~0 means nothing: report the absolute one
        rel_col = f"{'ANN~0':>9}"
    else:
        rel_col = f"{diff / ann:9.4f}"
    line = (
        f"{name:<34} {hw:>4} {t_conv:8.1f} {t_snn:7.1f} {rel_col}  keys {keys}  "
        f"||ANN|| {ann:.3g} ||SNN - ANN|| {diff:.3g}"
    )
    print(f"row converted|{line}", flush=True)


def timm_run(name: str, size: int, T: int, cap: int, mem_gib: float = 0, img_size: bool = False) -> tuple[str, str]:
    """Run timm_one(name) in a forked child of this process (which has imported torch, timm and snnconv but
    built no model: each model starts from the same clean state, and importing once saves ~5 s of CPU per
    model), stopped after `cap` seconds of CPU time (RLIMIT_CPU: what the model costs, whatever else loads
    the machine) or 4 x cap seconds of wall time (a hang): (status, line) with status 'converted', 'refused',
    'timeout' (and the phase it was in), 'memory' or 'crash' (the exception's first line and the phase: 'snn' is
    a crash inside snn(x)).
    `--timm-one NAME` runs the same worker in a fresh Python."""
    import resource
    import select
    import signal
    import traceback

    import timm  # noqa: F401  (imported before the fork: the children share it)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the driver's loop
        os.close(r)
        code = 0
        resource.setrlimit(resource.RLIMIT_CPU, (cap, cap + 10))  # SIGXCPU ends the child
        if mem_gib:  # a huge model fails with an allocation error instead of waking the OOM killer
            resource.setrlimit(resource.RLIMIT_AS, (int(mem_gib * 2**30), resource.getrlimit(resource.RLIMIT_AS)[1]))
        with os.fdopen(w, "w") as pipe:
            sys.stdout = pipe
            try:
                timm_one(name, size, T, img_size)
            except BaseException as exc:
                last = traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines()[0]
                print(f"error {last[:200]}", flush=True)
                code = 1
        os._exit(code)
    os.close(w)
    buf, deadline, timed_out = b"", time.monotonic() + 4 * cap, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
            break
        if select.select([r], [], [], left)[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
    os.close(r)
    _, wstatus = os.waitpid(pid, 0)
    lines = buf.decode(errors="replace").splitlines()
    phase = next((ln[6:] for ln in reversed(lines) if ln.startswith("phase ")), "start")
    for ln in lines:
        if ln.startswith("row "):
            status, line = ln[4:].split("|", 1)
            return status, line
    if timed_out:
        return "timeout", f"{name:<34} timeout after {4 * cap} s of wall time (in {phase})"
    if os.WIFSIGNALED(wstatus) and os.WTERMSIG(wstatus) == signal.SIGXCPU:
        return "timeout", f"{name:<34} timeout after {cap} s of CPU time (in {phase})"
    err = next((ln[6:] for ln in lines if ln.startswith("error ")), None)
    if err is None:
        sig = os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None
        err = f"killed by signal {sig}" if sig else f"exit code {os.waitstatus_to_exitcode(wstatus)}"
    where = "inside snn(x)" if phase == "snn" else f"in {phase}"
    if "can't allocate memory" in err or err.startswith("MemoryError"):
        return "memory", f"{name:<34} over the memory cap ({mem_gib:g} GiB of address space) in {phase}"
    return "crash", f"{name:<34} crash {where}: {err}"


def _read_rows(path: Path) -> dict[str, tuple[str, str]]:
    done = {}
    if path.exists():
        for ln in path.read_text().splitlines():
            if ln.startswith("| ") and not ln.startswith("| status"):
                status, rest = ln[2:].split(" | ", 1)
                done[rest.split()[0]] = (status, rest)
    return done


def timm_summary(cands, done, head, T: int, families: dict | None = None) -> list[str]:
    """The summary block at the top of the results file: counts, refusal reasons, median error."""
    rows = [done[n] for n, _ in cands if n in done]
    counts: dict[str, int] = {}
    for status, _ in rows:
        counts[status] = counts.get(status, 0) + 1
    reasons: dict[str, int] = {}
    for status, line in rows:
        if status == "refused":  # 'mul x6' -> 'mul': group by the ops, not their counts
            why = line.split("refused: ", 1)[1].split(" -- ")[0]
            key = ", ".join(sorted({re.sub(r" x\d+$", "", w.strip()) for w in why.split(",")}))
            reasons[key] = reasons.get(key, 0) + 1
    rels, near_zero = [], []
    for status, line in rows:
        if status != "converted":
            continue
        m = re.search(r"\|\|ANN\|\| (\S+) \|\|SNN - ANN\|\| (\S+)", line)
        if line.split()[4] == "ANN~0":
            near_zero.append((line.split()[0], m.group(1), m.group(2)))
        else:
            rels.append(float(line.split()[4]))
    tally = ", ".join(f"{k} {counts.get(k, 0)}" for k in ("converted", "refused", "timeout", "memory", "crash"))
    what = "families (one model each)" if families else "models"
    out = [*head, f"summary: {len(rows)} of {len(cands)} {what} run: {tally}"]
    if families:
        failed = sum(counts.get(k, 0) for k in ("timeout", "memory", "crash"))
        in_snn = sum(1 for s, line in rows if s == "crash" and "inside snn(x)" in line)
        conv = counts.get("converted", 0)
        out.append(
            f"families: converted {conv} of the {len(rows)} run ({100 * conv / max(len(rows), 1):.1f}%), "
            f"{conv} of all {len(cands)} ({100 * conv / max(len(cands), 1):.1f}%); refused {counts.get('refused', 0)} "
            f"(a ConversionError naming the ops), failed {failed} (timeouts {counts.get('timeout', 0)}, over the "
            f"memory cap {counts.get('memory', 0)}, exceptions {counts.get('crash', 0)}, of which inside snn(x) "
            f"{in_snn})"
        )
    if rels:
        out.append(
            f"median relative error ||SNN - ANN|| / ||ANN|| at T={T} of the converted: {statistics.median(rels):.4f} "
            f"(min {min(rels):.4f}, max {max(rels):.4f}; {len(rels)} models"
            + (f", leaving out {len(near_zero)} whose ANN output is ~0)" if near_zero else ")")
        )
    for name, ann, diff in near_zero:
        out.append(f"ANN output ~0: {name} (||ANN|| {ann}; absolute error ||SNN - ANN|| {diff}, no relative error)")
    for why, k in sorted(reasons.items(), key=lambda kv: -kv[1]):
        out.append(f"refused ({k}): {why}")
    for status in ("timeout", "memory", "crash"):
        for s, line in rows:
            if s == status:
                out.append(f"{status}: {line.strip()}")
    if len(rows) < len(cands):
        out.append(f"{len(cands) - len(rows)} models not run yet: rerun the command (it resumes)")
    return out


def timm_sweep(args) -> None:
    import timm

    families, n_names = None, 0
    if args.all:  # one model per architecture (timm module), small ones first
        cands, families, n_names = timm_families(args.refresh)
        cands = sorted(cands, key=lambda c: c[1])
    else:
        cands = sorted(timm_candidates(args.refresh), key=lambda c: c[1])  # small models first
    if args.models:
        cands = [c for c in cands if c[0] in args.models]
    if args.families_first:  # the smallest model of each family (timm module, name's leading letters) first
        from timm.models._registry import _model_to_module

        family = {n: (_model_to_module.get(n, ""), re.match(r"[a-z]*", n).group()) for n, _ in cands}
        firsts = {}
        for n, p in cands:
            firsts.setdefault(family[n], (n, p))
        cands = list(firsts.values()) + [c for c in cands if c not in firsts.values()]
    out = Path(args.out)
    done = _read_rows(out) if args.resume or args.summary_only else {}
    if args.retry:
        done = {n: r for n, r in done.items() if r[0] not in args.retry and n not in args.retry}
    cmd = "python benchmarks/zoo.py " + " ".join(sys.argv[1:])
    head = [
        cmd,
        f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, random weights, "
        f"one forked process per model, input {args.size}x{args.size} (or the smallest multiple/size the model "
        f"accepts), T={args.T}, batch 2, calibration 4 inputs, cap {args.cap} s of CPU time (4x that of wall "
        f"time) and {args.mem:g} GiB of address space per model; "
        + (
            f"every timm architecture: {len(cands)} families (timm's model-defining modules, "
            f"timm.models._registry's model-to-module map; {n_names} model names in timm), each represented by its "
            "smallest model by parameter count (built on the meta device; built again with img_size=the input size "
            "where the constructor takes it); the families and their models are listed after the table"
            if families
            else f"{len(cands)} timm models whose activations are all ReLU/ReLU6"
        ),
        "machine load (1/5/15-min load average, 2 cores) when this run started: "
        + " / ".join(f"{v:.1f}" for v in os.getloadavg()),
    ]
    if args.summary_only:  # keep the head of the run that measured the rows; add the notes
        lines = out.read_text().splitlines()
        head = lines[: next(i for i, ln in enumerate(lines) if ln.startswith("summary:"))]
        head = [ln for ln in head if not ln.startswith("note: ")]
    head += [f"note: {n}" for n in args.note]
    table = "| status | model | input | convert s | snn(x) s | rel err | state_dict keys  (or the reason)"

    def write():
        lines = [*timm_summary(cands, done, head, args.T, families), "", table]
        lines += [f"| {done[n][0]} | {done[n][1]}" for n, _ in cands if n in done]
        if families:
            lines += ["", f"families swept ({len(cands)}): family (timm module): model, parameters"]
            lines += [f"{families[n]}: {n}, {p}" for n, p in sorted(cands, key=lambda c: families[c[0]])]
        tmp = out.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(out)

    for name, _ in cands:
        if name in done or args.summary_only:
            continue
        done[name] = timm_run(name, args.size, args.T, args.cap, args.mem, img_size=bool(families))
        print(f"{done[name][0]:<10} {done[name][1]}", flush=True)
        write()
    write()
    print("\n".join(timm_summary(cands, done, [], args.T, families)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--timm", action="store_true", help="sweep timm's ReLU/ReLU6 models instead of torchvision's")
    ap.add_argument("--T", type=int, default=64, help="time steps of the timm sweep")
    ap.add_argument("--cap", type=int, default=240, help="CPU seconds per timm model (4x that of wall time)")
    ap.add_argument(
        "--all", action="store_true", help="with --timm: every timm architecture (smallest model of each family)"
    )
    ap.add_argument("--img-size", action="store_true", help="--timm-one: build with img_size= the input size")
    ap.add_argument("--families-first", action="store_true", help="one model of each timm family, then the rest")
    ap.add_argument("--summary-only", action="store_true", help="rewrite --out's summary from its rows, run nothing")
    ap.add_argument("--note", nargs="*", default=[], help="note lines for the head of --out")
    ap.add_argument("--mem", type=float, default=10, help="GiB of address space per timm model (0: no cap)")
    ap.add_argument("--out", default=None, help="results file (default results/zoo_timm.txt, --all: zoo_timm_all.txt)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out (see --retry)")
    ap.add_argument("--refresh", action="store_true", help="rebuild the cached timm candidate list")
    ap.add_argument(
        "--retry",
        nargs="*",
        default=None,
        help="with --resume: run again the rows of these statuses (crash, refused, ...) or models (by name)",
    )
    ap.add_argument("--timm-one", default=None, help="measure one timm model in this process (the sweep's worker)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(
            Path(__file__).resolve().parent / "results" / ("zoo_timm_all.txt" if args.all else "zoo_timm.txt")
        )
    if args.timm_one:
        return timm_one(args.timm_one, args.size, args.T, args.img_size)
    if args.timm:
        return timm_sweep(args)
    sys.path.insert(0, _TESTS)
    from test_zoo import CI, MODERN_CI, MODERN_REST, REST

    args.models = args.models or CI + MODERN_CI + REST + MODERN_REST
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {args.size}x{args.size}")
    print(f"{'model':<22}{'conv s':>9}{'top-1 %':>10}{'rel err':>10}{'T=8 / 8ANN':>12}")
    for name in args.models:
        print(row(name, args.size), flush=True)


if __name__ == "__main__":
    main()
