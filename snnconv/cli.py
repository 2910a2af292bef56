"""The `snnconv` command: convert, run, inspect, export. Errors print one line and exit 2; nothing is
left half-written and no input is overwritten."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from snnconv import distributed, interrupt
from snnconv.errors import ConversionError


def _shape(text: str | None, n: int) -> tuple[int, ...] | None:
    """--input-shape C,H,W; refused before allocating n samples of it if they would not fit in memory."""
    from snnconv.settings import check_allocatable

    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ConversionError(f"--input-shape must look like 3,32,32, got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise ConversionError(f"--input-shape must be positive sizes, got {text!r}")
    check_allocatable(shape, n, f"--input-shape {text}")
    return shape


# arguments validated by the options object's own rules (snnconv.settings.RULES), before anything runs
_SETTINGS_ARGS = {
    "T": "T",
    "percentile": "percentile",
    "v_init": "neuron.v_init",
    "memory_budget_mb": "memory_budget_mb",
}
_COUNT_ARGS = ("batch", "limit", "calib_limit")


def _check_args(a) -> None:
    """Everything checkable from the arguments alone, before any file is read or anything is computed."""
    from snnconv.settings import check

    for arg, name in _SETTINGS_ARGS.items():
        value = getattr(a, arg, None)
        if isinstance(value, str):  # run's --T: a list of steps
            _steps(value)
        elif value is not None:
            check(name, value, f"--{arg.replace('_', '-')}")
    if getattr(a, "workers", None) is not None and a.workers < 0:
        raise ConversionError(f"--workers must be 0 or more worker processes, got {a.workers}")
    for arg in _COUNT_ARGS:
        value = getattr(a, arg, None)
        if value is not None and value <= 0:
            raise ConversionError(f"--{arg.replace('_', '-')} must be a positive integer, got {value}")
    if getattr(a, "device", None) is not None:
        _device(a.device)
    inputs = [getattr(a, k, None) for k in ("model", "weights", "calib", "checkpoint", "data", "labels", "target")]
    for flag, out in (("-o", getattr(a, "output", None)), ("--plot", getattr(a, "plot", None))):
        if out is not None:
            _guard_output(flag, out, *inputs)
    if getattr(a, "plot", None):
        _plot_format(Path(a.plot))


def _device(text: str) -> torch.device:
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ConversionError(f"--device {text!r}: not a device torch knows; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConversionError(f"--device {text!r}: snnconv runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConversionError(f"--device {text}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConversionError(f"--device {text}: there are {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _guard_output(flag: str, out: str, *inputs: str | None) -> Path:
    """An output path is never an input (the same file, also through a symbolic or hard link), a folder, or
    in a missing or read-only folder."""
    path = Path(out)
    for i in inputs:
        if i and Path(i).exists() and path.exists() and os.path.samefile(path, i):  # links too
            raise ConversionError(f"{flag} {out}: that file is also an input; choose another output path")
    if path.is_dir():
        raise ConversionError(f"{flag} {out}: is a directory, expected a file path")
    if path.exists() and not path.is_file():  # a device or pipe: renaming over it would replace it
        raise ConversionError(f"{flag} {out}: is not a regular file (a device or pipe); choose a file path")
    if not path.parent.is_dir():
        raise ConversionError(f"{flag} {out}: output folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConversionError(f"{flag} {out}: output folder {path.parent} is not writable")
    return path


def _plot_format(path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as exc:
        raise ConversionError("--plot needs matplotlib: pip install 'snnconv[plot]'") from exc
    fmt = path.suffix.lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ConversionError(f"--plot {path}: unsupported format {fmt!r}; use one of {', '.join(sorted(formats))}")
    return fmt


def _prep(a):
    from snnconv.io import ImagePrep

    return ImagePrep.parse(a.resize, a.crop, a.mean, a.std)


def _image_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("a folder of images (ImageNet style: --resize 256 --crop 224 --mean ... --std ...)")
    g.add_argument("--resize", type=int, help="resize each image's shorter side to this many pixels")
    g.add_argument("--crop", type=int, help="then crop the centre square of this size")
    g.add_argument("--mean", help="subtract per channel from x / 255, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="then divide per channel, e.g. 0.229,0.224,0.225")


def cmd_convert(a) -> int:
    import snnconv
    from snnconv.io import load_model, parse_kwargs

    distributed.init_from_env("cpu")  # calibration runs on the CPU: gloo

    unknown = set(a.skip_pass) - snnconv.passes.OPTIONAL
    if unknown:
        raise ConversionError(
            f"--skip-pass {sorted(unknown)}: not an optional pass; choose from {sorted(snnconv.passes.OPTIONAL)}"
        )
    out = Path(a.output)
    model, source = load_model(a.model, a.weights, parse_kwargs(a.kwargs), a.trust_pickle)
    model_file = Path(a.model).read_bytes() if a.model.endswith((".onnx", ".pt2")) else None
    prep = _prep(a)
    if a.calib:
        from snnconv import datasets

        ds = datasets.open_dataset(a.calib, trust_pickle=a.trust_pickle, prep=prep)
        calib = datasets.loader(ds, 128, limit=a.calib_limit)
    else:
        shape = _shape(a.input_shape, 64)
        if shape is None:
            raise ConversionError(
                "no calibration data: pass --calib FILE (a few hundred training inputs), or "
                "--input-shape C,H,W to calibrate on random inputs"
            )
        print(
            "warning: calibrating on random inputs of the given shape; thresholds will not fit real data "
            "(pass --calib for a useful conversion)",
            file=sys.stderr,
        )
        calib = torch.rand(64, *shape)
    t0 = time.perf_counter()
    passes = sorted(snnconv.passes.OPTIONAL - set(a.skip_pass)) if a.skip_pass else None
    snn = snnconv.convert(
        model,
        T=a.T,
        calib=calib,
        method=a.method,
        percentile=a.percentile,
        per_channel=not a.per_layer,
        neuron=a.neuron,
        reset=a.reset,
        v_init=a.v_init,
        bias_calibration=a.bias_calibration,
        signed_spikes=a.signed_spikes,
        spike_depthwise=a.spike_depthwise,
        memory_budget_mb=a.memory_budget_mb,
        passes=passes,
        calib_batches=None,
    )
    if distributed.is_main():  # every rank holds the same conversion; one writes it
        snnconv.save(snn, out, source=source, model_file=model_file)
        ranks = f" on {distributed.world()} ranks" if distributed.active() else ""
        print(
            f"converted {type(model).__name__}{ranks} in {time.perf_counter() - t0:.1f} s: {len(snn.neurons())} "
            f"neuron layers, T={a.T}; wrote {out}"
        )
    distributed.barrier()
    return 0


def _load(a):
    """The checkpoint's SNN; the ANN from --model (the user's own factory; --kwargs, else the recorded
    ones when the recorded factory is the same) or from the recorded source when the file may name it."""
    import snnconv
    from snnconv import trusted
    from snnconv.checkpoint import recorded_source
    from snnconv.io import load_factory, parse_kwargs

    model = None
    if getattr(a, "model", None):
        recorded = recorded_source(a.checkpoint)
        if a.kwargs:
            kwargs = parse_kwargs(a.kwargs)
        elif recorded.get("factory") == a.model:  # the file's arguments are still the file's words
            kwargs = trusted.file_kwargs(a.model, recorded.get("kwargs"), a.checkpoint)
        else:
            kwargs = {}
        model = load_factory(a.model, kwargs)
    snn = snnconv.load(a.checkpoint, model=model, trust_source=getattr(a, "trust_source", False))
    if getattr(a, "T", None) is not None:
        snn.T = a.T
    return snn


def _steps(text: str | None) -> list[int] | None:
    """--T of run: a number of steps or a list of them (accuracy is reported at each)."""
    from snnconv.settings import check

    if text is None:
        return None
    try:
        ts = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConversionError(f"--T must be a number of steps or a list like 8,16,32, got {text!r}") from None
    for t in ts:
        check("T", t, "--T")
    return ts


def cmd_run(a) -> int:
    from snnconv import datasets
    from snnconv.evaluate import evaluate
    from snnconv.memory import check_fits, peak_bytes, run_bytes
    from snnconv.stats import format_report

    Ts = _steps(a.T)
    device = _device(a.device) if a.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prep = _prep(a)
    distributed.init_from_env(device.type)
    device = torch.device(distributed.local_device(str(device)))
    a.T = None
    snn = _load(a)
    if a.memory_budget_mb is not None:  # checked by the options' rules in _check_args
        snn.settings.memory_budget_mb = a.memory_budget_mb
    ds = datasets.open_dataset(a.data, a.labels, prep=prep)
    shape = datasets.sample_shape(ds)
    if shape != tuple(snn.settings.input_shape):
        raise ConversionError(
            f"{a.data}: samples have shape {shape}, the model was converted for {tuple(snn.settings.input_shape)}"
        )
    labels = getattr(ds, "has_labels", False)
    if labels:
        datasets.check_labels(ds, snn, a.labels or a.data)
    rule = (
        f"labels: from {a.labels}"
        if a.labels
        else getattr(ds, "label_rule", None) or (f"labels: from {a.data}" if labels else "labels: none")
    )
    # the batch each rank runs: --batch, or all of its share of the samples where that is fewer
    samples = min(len(ds), a.limit or len(ds))
    n = min(a.batch, -(-samples // distributed.world()))
    item = ds[0]
    per_step = _outputs_per_sample(snn, (item[0] if isinstance(item, tuple) else item).unsqueeze(0))
    plan, need = run_bytes(snn.settings, max(Ts) if Ts else snn.T, n, per_step, device)
    batches = f"--batch {a.batch}" + (f" ({n} samples per batch here)" if n < a.batch else "")
    check_fits(need, f"--T {plan.T} with {batches}", device, fix="lower --batch or --T")
    loader = datasets.loader(ds, a.batch, a.workers, limit=a.limit, pin=device.type == "cuda")
    r = evaluate(snn, loader, T=Ts, device=device, progress=sys.stderr.isatty())
    peak = distributed.all_reduce(torch.tensor(float(peak_bytes(device))), "max").item()
    if distributed.is_main():
        print(rule)
        print(format_report(r))
        ranks = f", largest of {distributed.world()} ranks" if distributed.active() else ""
        where = "GPU memory allocated" if device.type == "cuda" else "resident memory"
        print(f"\nplanned {plan}\npeak {where}: {peak / 2**20:.0f} MiB{ranks}")
        if a.plot:
            _plot(r, Path(a.plot))
    distributed.barrier()
    return 0


def _plot(r: dict, path: Path) -> None:
    """Agreement with the ANN (top-1, top-5) and, with labels, accuracy beside the ANN's, against T."""
    import matplotlib.pyplot as plt

    from snnconv.io import atomic_write

    fmt = _plot_format(path)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = range(1, r["T"] + 1)
    ax.plot(ts, r["agreement_by_T"], marker=".", label="SNN top-1 = ANN's class")
    if "agreement_top5_by_T" in r:
        ax.plot(ts, r["agreement_top5_by_T"], marker=".", label="ANN's class in SNN top-5")
    if "accuracy_by_T" in r:
        ax.plot(ts, r["accuracy_by_T"], marker=".", label="SNN accuracy")
        ax.axhline(r["ann_accuracy"], color="gray", linestyle="--", label="ANN accuracy")
    title = "agreement with the ANN" + (" and accuracy" if "accuracy_by_T" in r else "")
    ax.set(xscale="log", xlabel="time steps T", ylabel="% of samples", title=f"{title} vs T", ylim=(-2, 102))
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt))
    print(f"wrote {path}")


def cmd_inspect(a) -> int:
    import snnconv

    if a.target.endswith((".safetensors", ".snn")):
        a.checkpoint = a.target
        snn = _load(a)
        print(snnconv.inspect(snn))
        print(_memory_plan(snn, a.batch))
        return 0
    from snnconv.io import load_model, parse_kwargs

    model, _ = load_model(a.target, a.weights, parse_kwargs(a.kwargs), a.trust_pickle)
    shape = _shape(a.input_shape, 16)
    if shape is None:
        raise ConversionError("inspecting a model needs --input-shape C,H,W (one sample's shape)")
    snn = snnconv.convert(model, T=a.T if a.T is not None else 8, calib=torch.rand(16, *shape))
    print(snnconv.inspect(snn))
    print(_memory_plan(snn, a.batch))
    return 0


def _outputs_per_sample(snn, x1: torch.Tensor) -> int:
    """The size of one step's output for one sample (ANN mode: one pass over x1 [1, ...])."""
    with torch.no_grad():
        out = snn.graph_module(x1)
    return sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor))


def _memory_plan(snn, batch: int) -> str:
    """The time plan and the memory `run` would hold at once for batches of `batch` samples, as run checks it."""
    from snnconv.memory import peak_bytes, run_bytes

    per_step = _outputs_per_sample(snn, torch.zeros(1, *snn.settings.input_shape))
    plan, need = run_bytes(snn.settings, snn.T, batch, per_step)
    return (
        f"\nplanned {plan} on the CPU: `run` holds {need / 2**20:.0f} MiB at once for such batches"
        f"\npeak resident memory so far: {peak_bytes() / 2**20:.0f} MiB"
    )


def cmd_export(a) -> int:
    from snnconv.export import export_onnx
    from snnconv.nir_graph import write_nir
    from snnconv.settings import check_allocatable

    snn = _load(a)
    out = a.output
    if a.format == "nir":
        write_nir(snn, Path(out), a.nir_neuron)
        form = "I + Threshold + reset edge" if a.nir_neuron == "I" else "IF"
        print(f"wrote {out}: NIR graph, {len(snn.neurons())} neuron layers as {form}")
        return 0
    check_allocatable(snn.settings.input_shape, a.batch, f"--batch {a.batch}")
    export_onnx(snn, Path(out), batch=a.batch)
    print(f"wrote {out}: T={snn.T} unrolled, batch {a.batch}, checked with onnx.checker")
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="snnconv", description="Convert trained ANNs into spiking networks.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser(
        "convert",
        help="convert a model into an SNN checkpoint",
        description="MODEL is package.module:factory (with --weights), an .onnx file, or a "
        ".pt2 torch.export program exported with a dynamic batch dimension.",
    )
    c.add_argument("model")
    c.add_argument(
        "--weights",
        help=".pth/.pt state_dict (nested 'state_dict'/'model' keys and DDP 'module.' "
        "prefixes accepted) or .safetensors",
    )
    c.add_argument("--kwargs", help="JSON keyword arguments for the factory, e.g. '{\"num_classes\": 10}'")
    c.add_argument(
        "--calib", help="calibration inputs: .npy, .npz, .pt, an idx file, an MNIST folder or a folder of images"
    )
    c.add_argument("--calib-limit", type=int, default=512, help="use at most this many calibration inputs")
    c.add_argument("--input-shape", help="one sample's shape (C,H,W) to calibrate on random inputs")
    c.add_argument("-o", "--output", required=True, help="converted checkpoint (.safetensors)")
    c.add_argument("--T", type=int, default=8, help="time steps")
    c.add_argument(
        "--method",
        choices=["search", "percentile", "max"],
        default="search",
        help="thresholds: 'search' (default: the clip below the percentile that best codes the activations "
        "in T steps), the 'percentile' itself, or the 'max'",
    )
    c.add_argument("--percentile", type=float, default=99.99)
    c.add_argument("--per-layer", action="store_true", help="one threshold per layer (default: per channel)")
    c.add_argument("--neuron", choices=["if", "lif"], default="if")
    c.add_argument("--reset", choices=["soft", "hard"], default="soft")
    c.add_argument("--v-init", type=float, default=0.5, help="initial membrane / threshold")
    c.add_argument(
        "--bias-calibration",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="correct each neuron layer's input current by the SNN's measured gap to the ANN (default: on)",
    )
    c.add_argument(
        "--signed-spikes",
        action=argparse.BooleanOptionalAction,
        help="neurons may also fire -theta, taking back an early excess (default: on with --reset soft; "
        "--no-signed-spikes for NIR export)",
    )
    c.add_argument(
        "--spike-depthwise",
        action="store_true",
        help="depthwise convolutions after smooth activations read spikes too (default: the compensated value)",
    )
    c.add_argument(
        "--skip-pass",
        action="append",
        default=[],
        metavar="PASS",
        help="leave out an optional pass (repeatable), e.g. integer_spikes for float32 arithmetic "
        "throughout; `python -c 'import snnconv; print(snnconv.passes.describe())'` lists them",
    )
    c.add_argument("--trust-pickle", action="store_true", help="allow weights files that unpickle Python objects")
    c.add_argument(
        "--memory-budget-mb",
        type=float,
        help="run the SNN in time chunks whose activations fit this many MiB (recorded; `run` uses it)",
    )
    _image_options(c)
    c.set_defaults(fn=cmd_convert)

    r = sub.add_parser("run", help="pretrained-weight SNN inference: accuracy by T, firing rates, energy")
    r.add_argument("checkpoint")
    r.add_argument("--data", required=True, help="inputs: .npy/.npz/.pt, idx file, MNIST folder, image folder")
    r.add_argument("--labels", help="labels file (.npy or idx) when the data carries none")
    r.add_argument(
        "--T",
        help="time steps, or a list like 8,16,32 (default: the checkpoint's); accuracy at each T up to the largest",
    )
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--workers", type=int, help="DataLoader worker processes (default: min(4, CPUs - 1))")
    r.add_argument("--limit", type=int, help="use the first N samples")
    r.add_argument("--model", help="package.module:factory, for checkpoints that do not record their source")
    r.add_argument("--kwargs")
    r.add_argument("--plot", help="write an accuracy-vs-T figure here (needs matplotlib)")
    r.add_argument(
        "--device",
        help="cpu or cuda (default: cuda when available); on CUDA neurons run as CuPy kernels where CuPy works",
    )
    r.add_argument(
        "--trust-source",
        action="store_true",
        help="let the checkpoint name the code that builds the ANN (any factory, an embedded .pt2 program)",
    )
    r.add_argument("--memory-budget-mb", type=float, help="time chunks whose activations fit this many MiB")
    _image_options(r)
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="the converted graph, passes, thresholds, neurons, rejected ops")
    i.add_argument("target", help="a converted checkpoint, or a model (factory spec, .onnx or .pt2)")
    i.add_argument("--weights")
    i.add_argument("--kwargs")
    i.add_argument("--input-shape")
    i.add_argument("--T", type=int)
    i.add_argument("--batch", type=int, default=256, help="batch size the time chunk is planned for")
    i.add_argument("--trust-pickle", action="store_true")
    i.add_argument("--model", help="package.module:factory building the ANN of a checkpoint (its own code)")
    i.add_argument(
        "--trust-source",
        action="store_true",
        help="let the checkpoint name the code that builds the ANN (any factory, an embedded .pt2 program)",
    )
    i.set_defaults(fn=cmd_inspect)

    e = sub.add_parser("export", help="export the SNN to ONNX (T unrolled) or NIR (neuromorphic hardware)")
    e.add_argument("checkpoint")
    e.add_argument("--format", choices=["onnx", "nir"], default="onnx", help="onnx (default) or nir (HDF5)")
    e.add_argument(
        "--nir-neuron",
        choices=["I", "IF"],
        default="I",
        help="NIR neuron form: I (integrator, threshold, reset edge: the spec's own nodes; default) or IF "
        "(for targets such as Sinabs that import only IF)",
    )
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--T", type=int)
    e.add_argument("--batch", type=int, default=1, help="fixed batch size of the exported graph")
    e.add_argument("--model")
    e.add_argument("--kwargs")
    e.add_argument(
        "--trust-source",
        action="store_true",
        help="let the checkpoint name the code that builds the ANN (any factory, an embedded .pt2 program)",
    )
    e.set_defaults(fn=cmd_export)
    p.verbs = {"convert": c, "run": r, "inspect": i, "export": e}
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage mistakes are one line too (argparse would print the usage above it); --help shows usage."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _quiet_warnings() -> None:
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv: list[str] | None = None) -> int:
    """Every failure is one line `snnconv VERB: error: ...` and exit code 2 (--debug: the traceback);
    Ctrl-C is `snnconv VERB: interrupted` and exit code 130, at any point, whatever error it caused or
    whoever dropped its KeyboardInterrupt (snnconv.interrupt). Outputs are written atomically when the
    command succeeds, so neither leaves a partial or temporary file."""
    verb, code, error, args = "snnconv", None, None, None

    def report(code: int, failed: str | None) -> None:
        failed = failed or error
        if code == 130:
            print(f"{verb}: interrupted", file=sys.stderr)
        elif failed is not None:
            first, *detail = failed.split("\n")  # an unsupported-op report lists every op below its summary
            print("\n".join([f"{verb}: error: {' '.join(first.split())}", *detail]), file=sys.stderr)

    try:
        try:
            interrupt.begin()  # first: from here on a Ctrl-C belongs to this command
            try:
                p = parser()
                args, extra = p.parse_known_args(argv)
                if extra:  # name the verb whose options these are not
                    p.verbs[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
            except SystemExit as exc:  # --help, or a usage error already printed
                code = exc.code if isinstance(exc.code, int) else 2
            else:
                verb = f"snnconv {args.cmd}"
                code = _command(args)
        except KeyboardInterrupt:
            code = 130
        except Exception as exc:
            if getattr(args, "debug", False) and not interrupt.interrupted():
                raise
            code, error = 2, _describe(exc)
    except KeyboardInterrupt:  # another Ctrl-C while the first failure was being described
        code = 130
    finally:
        while True:
            try:
                code = interrupt.end(code, report, exiting=argv is None)
            except KeyboardInterrupt:
                if interrupt.ended():  # after the command: the caller's Ctrl-C
                    raise
                code = 130  # landed as end() was called, before it held Ctrl-C off: end it again
                continue
            break
    return code


def _command(args) -> int:
    with warnings.catch_warnings():
        _quiet_warnings()
        _check_args(args)
        try:
            return args.fn(args)
        except Exception as exc:
            if "DataLoader worker" not in str(exc) or args.debug:
                raise
            from snnconv.datasets import reraise_worker_error

            raise reraise_worker_error(exc) from exc
        finally:
            distributed.shutdown()


def _describe(exc: Exception) -> str:
    """The error line (and, for a ConversionError, the lines it lists below it)."""
    if isinstance(exc, ConversionError):
        return str(exc)
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return f"out of memory ({_first_line(exc)}); try a smaller --batch or --T"
    return (
        f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback, and please "
        "report it)"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split())[:300] if lines else "no message"


if __name__ == "__main__":
    sys.exit(main())
