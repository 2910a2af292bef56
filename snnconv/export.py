"""ONNX export: the SNN with its T steps unrolled into one static graph (fixed batch size), checked by
onnx.checker. Neurons export their out-of-place form (runtime/torch_backend.multistep_functional).

Layers the int8 pass made SpikeLayers (runtime/integer_spikes.py) export the arithmetic they run, not the
float layer they stand for: their fixed-point weights differ from the float ones by up to ~3e-5 of a channel's
largest, enough to move a membrane across its threshold, and one spike moved early in a deep net moves many
after it (mobile nets exported with the float layers were 10-19% off the SNN's output). Max pools on spikes
export their running sums out of place (see _RunningMaxPool).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv.errors import ConversionError
from snnconv.model import SpikingModel
from snnconv.runtime.context import current
from snnconv.runtime.integer_spikes import SpikeLayer
from snnconv.runtime.modules import SpikeMaxPool

_EXACT = 1 << 24  # float32 sums integers exactly while every partial sum stays below this
_SPLIT = 256  # integer weights above 128 in magnitude sum as SPLIT * hi + lo, |hi|, |lo| <= 128


class _Unrolled(nn.Module):
    """snn(x), and with `spikes` each neuron's output over all steps ([T * N, ...], in call order) after it."""

    def __init__(self, snn: SpikingModel, spikes: bool = False):
        super().__init__()
        self.snn, self.spikes = snn, spikes

    def forward(self, x):
        if not self.spikes:
            return self.snn(x)
        seen: dict[str, list] = {name: [] for name in self.snn.neurons()}
        hooks = [
            n.register_forward_hook(lambda m, a, y, name=name: seen[name].append(y))
            for name, n in self.snn.neurons().items()
        ]
        try:
            y = self.snn(x)
        finally:
            for h in hooks:
                h.remove()
        return (*torch.utils._pytree.tree_leaves(y), *(torch.cat(v) for v in seen.values()))


class _IntegerLayer:
    """A SpikeLayer's forward as traceable ops on its own numbers: the spikes as its integer input u (0/1;
    signed: shifted to 0/1/2, or -1/0/1 in 'sparse'), the exact integer sum of its weights over u, then its
    mode's epilogue: oneDNN's ('vnni', 'binary') float32(sum) * s + bias in float32, the emulated modes' and
    'sparse' the same in float64 rounded once; 'binary' scales its two halves apart (lo with the bias, hi
    added); a signed padded convolution takes its border map off. ONNX Runtime has no float64 convolution: the
    sum is made of float32 ones over weights of at most 128 in magnitude and groups of input channels small
    enough that every partial sum is an exact float32 integer, added up in float64."""

    def __init__(self, layer: SpikeLayer, in_shape: tuple[int, ...] | None):
        inner, mode = layer.inner, layer.mode
        self.linear, self.flatten = isinstance(inner, nn.Linear), layer.flatten
        self.mode, self.signed = mode, layer.signed
        self.geometry = () if self.linear else (inner.stride, inner.padding, inner.dilation)
        with torch.no_grad():
            q, s, self.bias, whole, s64 = layer._derive(layer._neuron.threshold, None)
            # (integer weights as float64, float32 scale) of each op the mode runs: 'binary' hi and lo, else one
            halves = [(h.double(), sc) for h, sc in zip(q, s)] if mode.startswith("binary") else [(whole, s)]
            self.border = None
            if self.signed and mode != "sparse" and not self.linear and in_shape is not None:
                border = layer._border(whole, s64, (whole.shape[1], *in_shape[2:]))
                self.border = None if border is None else border[0].contiguous()
            peak = 2 if self.signed and mode != "sparse" else 1  # |u| at most (signed spikes shifted by one: 2)
            self.ops = [(self._exact_parts(w, peak), sc) for w, sc in halves]

    def _exact_parts(self, w: torch.Tensor, peak: int) -> list[tuple[slice | None, torch.Tensor, int]]:
        """w (float64 integers [C_out, C_in, ...]) as (input channels or None for all, float32 weights, factor)
        whose float32 sums over u (|u| <= peak) are exact and add up to w's: weights above 128 in magnitude split
        as SPLIT * hi + lo, the input channels in groups whose sums stay below 2^24."""
        parts = [(w, 1)]
        if w.abs().max() > _SPLIT // 2:
            hi = torch.round(w / _SPLIT)
            parts = [(hi, _SPLIT), (w - _SPLIT * hi, 1)]
        group = max(1, (_EXACT - 1) // (peak * (_SPLIT // 2) * w[0, 0].numel()))  # input channels per exact op
        return [
            (None if group >= w.shape[1] else slice(c0, c0 + group), part[:, c0 : c0 + group].float(), factor)
            for c0 in range(0, w.shape[1], group)
            for part, factor in parts
        ]

    def _integers(self, x: torch.Tensor) -> torch.Tensor:
        if not self.signed:
            return (x != 0).float()
        if self.mode == "sparse":
            return (x > 0).float() - (x < 0).float()
        return (x >= 0).float() + (x > 0).float()

    def _sum(self, u: torch.Tensor, parts: list) -> torch.Tensor:
        """The integer sum over u, exactly, as float64."""
        total = None
        for channels, w, factor in parts:
            x = u if channels is None else u[:, channels]
            y = (x @ w.t() if self.linear else F.conv2d(x, w, None, *self.geometry)).double()
            y = y * factor if factor != 1 else y
            total = y if total is None else total + y
        return total

    def _scaled(self, acc: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        view = (1, -1) if self.linear else (1, -1, 1, 1)
        if self.mode in ("vnni", "binary"):  # oneDNN: the int32 sum to float32, then scale and bias in float32
            y = acc.float() * s.view(view)
            return y + bias.view(view) if bias is not None else y
        y = acc * s.double().view(view)
        return (y + bias.double().view(view) if bias is not None else y).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = self._integers(x.flatten(1) if self.flatten else x)
        if len(self.ops) == 2:  # 'binary': lo with the bias, then hi added in float32
            (hi, s_hi), (lo, s_lo) = self.ops
            y = self._scaled(self._sum(u, lo), s_lo, self.bias) + self._scaled(self._sum(u, hi), s_hi, None)
        else:
            parts, s = self.ops[0]
            y = self._scaled(self._sum(u, parts), s, self.bias)
        return y - self.border if self.border is not None else y


class _RunningMaxPool:
    """SpikeMaxPool's forward out of place: its running sums in place into views of one buffer are lost in ONNX
    (squeezenet's ceil-mode pools on concatenated spikes exported that way moved ~1/3 of the spikes after
    them). The same sums in the same order, the same maxima and differences: the same floats."""

    def __init__(self, pool: SpikeMaxPool):
        self.pool = pool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m, call = self.pool, current()
        if call is None or (m.static_input and call.input_static):
            return m._pool(x)
        steps, n = call.steps, x.shape[0] // call.steps
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc, last_pooled = call.state.get(m, (None, None))  # the call's previous chunk: its last sum and pool
        sums = []
        for t in range(steps):
            xt = x[t * n : (t + 1) * n].to(dtype)
            acc = xt if acc is None else acc + xt
            sums.append(acc)
        pooled = m._pool(torch.cat(sums)).unflatten(0, (steps, n))
        call.state[m] = (acc, pooled[-1])
        first = pooled[0] if last_pooled is None else pooled[0] - last_pooled
        return torch.cat([first, *(pooled[t] - pooled[t - 1] for t in range(1, steps))]).to(x.dtype)


class _SpreadAvgPool:
    """nn.AdaptiveAvgPool2d on a 1x1 map: its one value copied to every output cell (what the pool computes). The
    ONNX exporter refuses output sizes the input's does not divide, e.g. VGG's (7, 7) on the 1x1 maps of small
    inputs; other inputs go to the module's own forward."""

    def __init__(self, pool: nn.AdaptiveAvgPool2d):
        self.pool = pool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = self.pool.output_size
        size = (size, size) if isinstance(size, int) else size
        if x.dim() != 4 or tuple(x.shape[2:]) != (1, 1) or None in size:
            return nn.AdaptiveAvgPool2d.forward(self.pool, x)
        return x.expand(*x.shape[:2], *size)


def _ann_pass(snn: SpikingModel, example: torch.Tensor) -> tuple[dict[nn.Module, object], int]:
    """The export's own forward of each module whose runtime form ONNX cannot hold: an _IntegerLayer for each
    SpikeLayer (its input's shape from one ANN pass over `example`), a _RunningMaxPool for each SpikeMaxPool, a
    _SpreadAvgPool for each nn.AdaptiveAvgPool2d; and the number of tensors the model outputs."""
    layers = [m for m in snn.modules() if isinstance(m, SpikeLayer)]
    shapes, hooks = {}, []
    for m in layers:
        hooks.append(m.register_forward_pre_hook(lambda m, a: shapes.__setitem__(m, tuple(a[0].shape))))
    try:
        with torch.no_grad():
            y = snn.graph_module(example)
    finally:
        for h in hooks:
            h.remove()
    forms = {m: _IntegerLayer(m, shapes.get(m)) for m in layers}
    forms.update({m: _RunningMaxPool(m) for m in snn.modules() if isinstance(m, SpikeMaxPool)})
    forms.update({m: _SpreadAvgPool(m) for m in snn.modules() if type(m) is nn.AdaptiveAvgPool2d})
    return forms, len(torch.utils._pytree.tree_leaves(y))


def export_onnx(snn: SpikingModel, path: str | Path, batch: int = 1, opset: int = 17, spikes: bool = False) -> None:
    """Write `snn` as ONNX: input "x" [batch, ...], output "y" (snn(x)); with `spikes`, also each neuron's
    outputs over all T steps ([T * batch, ...]) as outputs named after the neuron (to find where a runtime
    departs from the SNN)."""
    try:
        import onnx
    except ImportError as exc:
        raise ConversionError("ONNX export needs onnx: pip install 'snnconv[onnx]'") from exc
    snn.refuse_float_ops("ONNX export")
    example = torch.rand(batch, *snn.settings.input_shape)
    forms, outputs = _ann_pass(snn, example)
    backend, chunk = snn.settings.backend, snn.settings.chunk
    snn.settings.backend, snn.settings.chunk = "torch", None
    # torch.onnx.export exports in eval mode and then sets the wrapper's mode, train() by default, on every module
    # under it: the SNN's unfolded batch norms (DenseNet's after each concatenation) would then use batch statistics
    modes = {m: m.training for m in snn.modules()}
    buf = io.BytesIO()
    try:
        for module, fn in forms.items():  # an instance attribute, deleted after: the class's forward again
            module.forward = fn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = ["y"] + [f"y{i}" for i in range(1, outputs)] + (list(snn.neurons()) if spikes else [])
            torch.onnx.export(
                _Unrolled(snn, spikes),
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["x"],
                output_names=names,
            )
    except Exception as exc:
        raise ConversionError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    finally:
        snn.settings.backend, snn.settings.chunk = backend, chunk
        for m, training in modes.items():
            m.training = training
        for module in forms:
            del module.forward
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    from snnconv.io import atomic_write

    atomic_write(Path(path), buf.getvalue())
