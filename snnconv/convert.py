"""convert(): trace -> prepare passes -> calibrate -> lower passes -> SpikingModel."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from snnconv import passes as pipeline
from snnconv.calibrate import batches, calibrate, calibrate_bias
from snnconv.errors import ConversionError
from snnconv.model import SpikingModel
from snnconv.runtime.materialise import materialise
from snnconv.runtime.modules import Neuron
from snnconv.settings import API_NAMES, NeuronConfig, Settings
from snnconv.trace import annotate, trace


def _adopt(gm, ann: nn.Module) -> None:
    """Point the GraphModule at the ANN's own modules, so passes and the SNN share every one of them. The
    top-level dict is a copy: modules the passes add must not show up in the ANN (a Sequential runs them)."""
    # tensors fx lifted out of forward() (`_tensor_constant0`: a cached tensor, not a parameter or buffer) are
    # buffers of the GraphModule only; they stay, as the ANN's non-persistent buffers (state_dict unchanged)
    lifted = {k: v for k, v in gm._buffers.items() if k not in ann._buffers and v is not None}
    for name, value in lifted.items():
        ann.__dict__.pop(name, None)  # fx's tracer set it on the traced module as a plain attribute
        ann.register_buffer(name, value, persistent=False)
    gm._parameters, gm._buffers, gm._modules = ann._parameters, ann._buffers, dict(ann._modules)
    gm._non_persistent_buffers_set = ann._non_persistent_buffers_set


def _output_check(ann: nn.Module, first: torch.Tensor):
    try:
        with torch.no_grad():
            ref_first = ann(first)
    except Exception as exc:
        raise ConversionError(
            f"the model fails on the calibration data (batch shape {tuple(first.shape)}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}; check the data's shape "
            "and preprocessing"
        ) from exc

    def check(y):
        ys, refs = (y, ref_first) if isinstance(y, (tuple, list)) else ((y,), (ref_first,))
        for a, b in zip(ys, refs):
            if isinstance(a, torch.Tensor) and not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()):
                raise ConversionError(
                    "the traced graph does not reproduce the model's own output (max difference "
                    f"{(a - b).abs().max().item():.3g}): forward() likely depends on state or Python values "
                    "that tracing froze; make forward() a pure function of its input"
                )

    return check


def _activation_bytes(gm, x: torch.Tensor) -> int:
    """Bytes of every activation of one ANN-mode pass over one sample x [1, ...]: a conservative size
    of one time step."""
    total = 0

    def count(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        elif isinstance(t, (tuple, list)):
            for u in t:
                count(u)

    class _Counter(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op != "get_attr":  # parameters and constants are not activations
                count(out)
            return out

    with torch.no_grad():
        _Counter(gm).run(x)
    return total


def convert(
    model: nn.Module | str | Path,
    T: int = 8,
    calib=None,
    *,
    threshold: float | None = None,
    method: str = "search",
    percentile: float = 99.99,
    per_channel: bool = True,
    neuron: str = "if",
    reset: str = "soft",
    v_reset: float = 0.0,
    v_init: float = 0.5,
    tau: float = 2.0,
    passes: list[str] | None = None,
    chunk: int | None = None,
    backend: str = "auto",
    memory_budget_mb: float | None = None,
    calib_batches: int | None = 64,
    example_input: torch.Tensor | None = None,
    bias_calibration: bool = True,
    bias_batches: int = 4,
    readout_delay: int = 0,
    max_spikes: int = 1,
    signed_spikes: bool | None = None,
    spike_depthwise: bool = False,
) -> SpikingModel:
    """Convert a ReLU ANN into a SpikingModel that runs T steps with the ANN's weights.

    model: the ANN, or the path of an .onnx file (loaded with snnconv.io.load_onnx; the SNN records it, so
    snnconv.save embeds the file as the CLI does and snnconv.load rebuilds the model from it).
    The defaults are the most accurate conversion measured (benchmarks/results/accuracy_*.txt): thresholds
    searched for this T, bias calibration and signed spikes; the conversion is fitted to T.
    calib: tensor [M, ...], iterable of tensors, or DataLoader yielding x or (x, y, ...); thresholds
    come from it, per channel or per layer: method 'search' (the clip at or below the percentile whose T-step
    rate code reproduces the activations best), 'percentile' (of `percentile`), or 'max'.
    threshold: a fixed threshold for every neuron instead (data-free; `example_input` then gives shapes).
    neuron 'if' or 'lif' (decay 1 - 1/tau); reset 'soft' (subtract) or 'hard' (to v_reset);
    v_init: initial membrane as a fraction of the threshold (0.5: theta/2).
    bias_calibration: after thresholds, correct each neuron layer's input current, layer by layer, by
    the gap between the ANN's and the SNN's mean output on `bias_batches` calibration batches.
    readout_delay: leave the first steps (the deep layers' transient) out of the output mean.
    signed_spikes: neurons also fire -theta to take back an early excess (net count stays >= 0); None (the
    default): on wherever the neuron allows it (reset 'soft', max_spikes 1). NIR export needs False.
    max_spikes: > 1 turns neurons into burst neurons (up to that many spikes per step, thresholds divided
    by it): k times finer rates at small T, but the spikes are no longer binary.
    spike_depthwise: where a smooth activation (SiLU, GELU, ...) feeds a depthwise convolution, give it spikes too
    (a two-sided neuron before it). Off by default: with a handful of inputs per output, the per-step noise of
    spikes does not average out there (benchmarks/results/accuracy_modern_cpu.txt); the convolution then reads
    the compensated value (float MACs, counted as such by evaluate).
    passes: the optional passes to run (default all; [] for none); chunk: steps per chunk, or
    memory_budget_mb: pick the chunk so that one chunk's activations stay within this many MiB.
    """
    model, source, model_file = _model_of(model)
    for name, value in (("calib_batches", calib_batches), ("bias_batches", bias_batches)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConversionError(f"{name} must be a positive integer, got {value!r}")
    unknown = set(passes or ()) - pipeline.OPTIONAL
    if unknown:
        raise ConversionError(f"unknown passes {sorted(unknown)}; optional passes are {sorted(pipeline.OPTIONAL)}")
    signed = signed_spikes if signed_spikes is not None else (reset == "soft" and max_spikes == 1)
    settings = Settings(
        T=T,
        neuron=NeuronConfig(neuron, reset, v_reset, v_init, tau, max_spikes, signed),
        threshold_method="fixed" if threshold is not None else method,
        percentile=percentile,
        per_channel=per_channel,
        fixed_threshold=threshold,
        passes=None if passes is None else tuple(passes),
        chunk=chunk,
        memory_budget_mb=memory_budget_mb,
        readout_delay=readout_delay,
        spike_depthwise=spike_depthwise,
        backend=backend,
    )
    settings.validate(labels=API_NAMES)
    if calib is None:
        if threshold is None:
            raise ConversionError(
                "no calibration data: pass calib= a tensor or DataLoader of inputs (a few "
                "hundred training samples), or threshold=<float> for a data-free conversion"
            )
        if example_input is None:
            raise ConversionError("a data-free conversion (threshold=...) needs example_input= one input batch")
        calib = example_input
    first = next(batches(calib, 1), None)
    if first is None:
        raise ConversionError("calibration data is empty: it yielded no non-empty tensor")
    settings.input_ndim, settings.input_shape = first.dim(), tuple(first.shape[1:])
    settings.input_integer = not first.is_floating_point()

    ann = copy.deepcopy(model).eval()  # the user's model is never touched
    check = _output_check(ann, first)
    gm, log = _prepare(ann, settings, first)
    calibrate(gm, settings, calib, calib_batches, check)
    settings.step_bytes_per_sample = _activation_bytes(gm, first[:1])
    if threshold is not None:
        for m in gm.modules():
            if isinstance(m, Neuron) and not m.fixed:
                m.threshold = torch.tensor(float(threshold) if m.clip is None else min(threshold, m.clip))
    snn = _lower(gm, settings, log, model)
    if bias_calibration and threshold is None:  # a data-free conversion has no data to fit biases to
        calibrate_bias(snn, calib, bias_batches)
    if source is not None:
        snn.source, snn.model_file = source, model_file
    return snn


def _model_of(model) -> tuple[nn.Module, dict | None, bytes | None]:
    """(the ANN, its source record, the model file) for convert(): an nn.Module as it is, an .onnx path loaded."""
    if isinstance(model, (str, os.PathLike)):
        from snnconv.io import load_onnx, need_file

        path = os.fspath(model)
        if not str(path).lower().endswith(".onnx"):
            raise ConversionError(
                f"convert() takes an nn.Module or the path of an .onnx file, got {path!r}; for a factory or a "
                "weights file, build the model first (snnconv.io.load_model)"
            )
        data = need_file(path).read_bytes()
        return load_onnx(data, str(path)), {"onnx": True}, data
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert() takes an nn.Module or an .onnx path, got {type(model).__name__}")
    return model, None, None


def _prepare(ann: nn.Module, settings: Settings, example: torch.Tensor):
    """Trace the ANN (adopting its modules), record each node's facts on `example` (an input batch; only its
    shape matters) and run the prepare passes: (graph, pass log)."""
    gm = annotate(trace(ann, example), example)
    pipeline.mark(gm, "ops_classified")  # the front end's fact: every node has its snn_kind
    _adopt(gm, ann)
    log = [("trace", gm.code)]
    return pipeline.run(pipeline.PREPARE, gm, settings, log), log


def _lower(gm, settings: Settings, log: list, model: nn.Module) -> SpikingModel:
    gm = materialise(pipeline.run(pipeline.LOWER, gm, settings, log))
    snn = SpikingModel(gm, settings)
    snn._version = getattr(model, "_version", 1)  # state_dict metadata as the ANN writes it (MNASNet reads it)
    snn.pass_log = log
    return snn


def rebuild(model: nn.Module, settings: Settings) -> SpikingModel:
    """The SNN graph of `model` for validated `settings` (a checkpoint's), without calibration: the
    thresholds are the caller's to set (SpikingModel.load_conversion_state). `model` itself is never touched."""
    # facts are about shapes: any input of the right shape (token ids: zeros, a valid index in any table)
    shape = (2, *settings.input_shape)
    example = torch.zeros(shape, dtype=torch.long) if settings.input_integer else torch.rand(shape)
    gm, log = _prepare(copy.deepcopy(model).eval(), settings, example)
    return _lower(gm, settings, log, model)
