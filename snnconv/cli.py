"""The `snnconv` command: convert, run, inspect, export. Errors print one line and exit 2; nothing is
left half-written and no input is overwritten."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from snnconv.errors import ConversionError


def _shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ConversionError(f"--input-shape must look like 3,32,32, got {text!r}") from None
    if not shape or any(v <= 0 for v in shape):
        raise ConversionError(f"--input-shape must be positive sizes, got {text!r}")
    return shape


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ConversionError(f"--{name} must be a positive integer, got {value}")


def _guard_output(out: str, *inputs: str | None) -> Path:
    path = Path(out)
    for i in inputs:
        if i and Path(i).exists() and path.exists() and path.resolve() == Path(i).resolve():
            raise ConversionError(f"output {out} is also an input: choose another output path")
    if path.is_dir():
        raise ConversionError(f"output {out} is a directory")
    if not path.parent.is_dir():
        raise ConversionError(f"output folder {path.parent} does not exist")
    return path


def cmd_convert(a) -> int:
    import snnconv
    from snnconv.io import load_data, load_model, parse_kwargs

    _positive("T", a.T)
    unknown = set(a.skip_pass) - snnconv.passes.OPTIONAL
    if unknown:
        raise ConversionError(
            f"--skip-pass {sorted(unknown)}: not an optional pass; choose from {sorted(snnconv.passes.OPTIONAL)}"
        )
    out = _guard_output(a.output, a.model, a.weights, a.calib)
    model, source = load_model(a.model, a.weights, parse_kwargs(a.kwargs), a.trust_pickle)
    model_file = Path(a.model).read_bytes() if a.model.endswith((".onnx", ".pt2")) else None
    if a.calib:
        calib, _ = load_data(a.calib, trust_pickle=a.trust_pickle)
        calib = calib[: a.calib_limit]
    else:
        shape = _shape(a.input_shape)
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
        passes=passes,
    )
    snnconv.save(snn, out, source=source, model_file=model_file)
    print(
        f"converted {type(model).__name__} in {time.perf_counter() - t0:.1f} s: {len(snn.neurons())} neuron "
        f"layers, T={a.T}; wrote {out}"
    )
    return 0


def _load(a):
    import snnconv
    from snnconv.io import load_factory, parse_kwargs

    model = load_factory(a.model, parse_kwargs(a.kwargs)) if getattr(a, "model", None) else None
    snn = snnconv.load(a.checkpoint, model=model)
    if getattr(a, "T", None):
        _positive("T", a.T)
        snn.T = a.T
    return snn


def cmd_run(a) -> int:
    from snnconv.io import load_data
    from snnconv.stats import evaluate, format_report

    _positive("batch", a.batch)
    _positive("limit", a.limit)
    snn = _load(a)
    x, y = load_data(a.data, a.labels)
    if a.limit:
        x, y = x[: a.limit], (y[: a.limit] if y is not None else None)
    if tuple(x.shape[1:]) != tuple(snn.settings.input_shape):
        raise ConversionError(
            f"data samples have shape {tuple(x.shape[1:])}, the model was converted for "
            f"{tuple(snn.settings.input_shape)}"
        )
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no CUDA device is available here; use --device cpu")
    r = evaluate(snn, x, y, batch=a.batch, progress=sys.stderr.isatty(), device=device)
    print(format_report(r))
    if a.plot:
        if "accuracy_by_T" not in r:
            raise ConversionError("--plot needs labels (--labels, or data that carries them)")
        _plot(r, _guard_output(a.plot, a.checkpoint, a.data))
    return 0


def _plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConversionError("--plot needs matplotlib: pip install 'snnconv[plot]'") from exc
    from snnconv.io import atomic_write

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ts = range(1, r["T"] + 1)
    ax.plot(ts, r["accuracy_by_T"], marker=".", label="SNN")
    ax.axhline(r["ann_accuracy"], color="gray", linestyle="--", label="ANN")
    ax.set(xscale="log", xlabel="time steps T", ylabel="accuracy %", title="accuracy vs T")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
    print(f"wrote {path}")


def cmd_inspect(a) -> int:
    import snnconv

    if a.target.endswith((".safetensors", ".snn")):
        print(snnconv.inspect(_load(argparse.Namespace(checkpoint=a.target, model=None, kwargs=None))))
        return 0
    from snnconv.io import load_model, parse_kwargs

    model, _ = load_model(a.target, a.weights, parse_kwargs(a.kwargs), a.trust_pickle)
    shape = _shape(a.input_shape)
    if shape is None:
        raise ConversionError("inspecting a model needs --input-shape C,H,W (one sample's shape)")
    snn = snnconv.convert(model, T=a.T or 8, calib=torch.rand(16, *shape))
    print(snnconv.inspect(snn))
    return 0


def cmd_export(a) -> int:
    from snnconv.export import export_onnx
    from snnconv.nir_graph import write_nir

    _positive("batch", a.batch)
    out = _guard_output(a.output, a.checkpoint)
    snn = _load(a)
    if a.format == "nir":
        write_nir(snn, out)
        print(f"wrote {out}: NIR graph, {len(snn.neurons())} IF layers (metadata 'snnconv': v_init, readout)")
        return 0
    export_onnx(snn, out, batch=a.batch)
    print(f"wrote {out}: T={snn.T} unrolled, batch {a.batch}, checked with onnx.checker")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snnconv", description="Convert trained ANNs into spiking networks.")
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
    c.add_argument("--method", choices=["percentile", "max"], default="percentile")
    c.add_argument("--percentile", type=float, default=99.99)
    c.add_argument("--per-layer", action="store_true", help="one threshold per layer (default: per channel)")
    c.add_argument("--neuron", choices=["if", "lif"], default="if")
    c.add_argument("--reset", choices=["soft", "hard"], default="soft")
    c.add_argument("--v-init", type=float, default=0.5, help="initial membrane / threshold")
    c.add_argument("--bias-calibration", action="store_true")
    c.add_argument(
        "--skip-pass",
        action="append",
        default=[],
        metavar="PASS",
        help="leave out an optional pass (repeatable), e.g. integer_spikes for float32 arithmetic "
        "throughout; `python -c 'import snnconv; print(snnconv.passes.describe())'` lists them",
    )
    c.add_argument("--trust-pickle", action="store_true", help="allow weights files that unpickle Python objects")
    c.set_defaults(fn=cmd_convert)

    r = sub.add_parser("run", help="pretrained-weight SNN inference: accuracy by T, firing rates, energy")
    r.add_argument("checkpoint")
    r.add_argument("--data", required=True, help="inputs: .npy/.npz/.pt, idx file, MNIST folder, image folder")
    r.add_argument("--labels", help="labels file (.npy or idx) when the data carries none")
    r.add_argument("--T", type=int, help="time steps (default: the checkpoint's); accuracy shown for each T up to it")
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--limit", type=int, help="use the first N samples")
    r.add_argument("--model", help="package.module:factory, for checkpoints that do not record their source")
    r.add_argument("--kwargs")
    r.add_argument("--plot", help="write an accuracy-vs-T figure here (needs matplotlib)")
    r.add_argument(
        "--device",
        help="cpu or cuda (default: cuda when available); on CUDA neurons run as CuPy kernels where CuPy works",
    )
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="the converted graph, passes, thresholds, neurons, rejected ops")
    i.add_argument("target", help="a converted checkpoint, or a model (factory spec, .onnx or .pt2)")
    i.add_argument("--weights")
    i.add_argument("--kwargs")
    i.add_argument("--input-shape")
    i.add_argument("--T", type=int)
    i.add_argument("--trust-pickle", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    e = sub.add_parser("export", help="export the SNN to ONNX (T unrolled) or NIR (neuromorphic hardware)")
    e.add_argument("checkpoint")
    e.add_argument("--format", choices=["onnx", "nir"], default="onnx", help="onnx (default) or nir (HDF5)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--T", type=int)
    e.add_argument("--batch", type=int, default=1, help="fixed batch size of the exported graph")
    e.add_argument("--model")
    e.add_argument("--kwargs")
    e.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            return args.fn(args)
    except ConversionError as exc:
        if args.debug:
            raise
        print(f"snnconv {args.cmd}: error: {' '.join(str(exc).split(chr(10))[0].split())}", file=sys.stderr)
        detail = str(exc).split("\n")[1:]
        if detail:
            print("\n".join(detail), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
