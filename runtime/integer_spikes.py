"""Convolutions and linear layers fed by spikes, run as 8-bit integer ops on CPU (oneDNN u8 x s8).

A spike is 0 or theta, so as an integer it is 0 or 1 and the layer over it is a sum of weights.
The threshold theta folds into the weights per input channel, and the float weights become 16-bit
fixed point per output channel, split into two int8 halves:
    W * theta ~= s * (255 * hi + lo),   hi, lo in [-127, 127],   s = max|W * theta| / (127 * 255 + 127)
so each weight is off by at most s/2 (1.5e-5 of a channel's largest weight). Two ways to sum them
exactly, one per kind of CPU (the *mode*, chosen once per process by a probe, see `mode()`):

  'vnni'    one op over twice the inputs, [255 * spikes, spikes] against [hi, lo] along the input
            channels. Exact only where oneDNN sums u8 x s8 products in int32 (VNNI: vpdpbusd); without
            VNNI, vpmaddubsw adds pairs of products in int16 and 2 * 255 * 127 saturates.
  'binary'  the 0/1 spikes as they are, against hi and against lo, the second op adding its result
            into the first's output (oneDNN's sum post-op): s * (255 * conv(x, hi) + conv(x, lo)).
            With 0/1 inputs an int16 pair sum is at most 2 * 127: exact on AVX2 without VNNI too.

Signed spikes (-theta, 0 or theta, NeuronConfig.signed) go in shifted by one, u = spike / theta + 1 in
{0, 1, 2} (uint8 has no -1), and the layer over the all-ones map, an exact integer sum of the same int8
weights, comes off again: layer(s) = layer(u) - layer(1). Its interior value (every tap inside the map) is
folded into the bias; where zero padding cuts taps off (the borders) the difference is a small per-shape
map subtracted from the output. oneDNN's own input zero point does the same job but runs
slower. In 'binary' u <= 2 keeps an int16 pair sum at 2 * 2 * 127; in 'vnni' 255 * u would not fit uint8,
so signed weights split as 127 * hi + lo ([127 * u, u] against [hi, lo]): 15-bit fixed point (16192
steps), each weight off by at most 3.1e-5 of its channel's largest.

  'sparse'  no oneDNN: an event-driven C kernel (runtime/sparse_layer.py) sums, for each output, the integer
            weights of the inputs that spiked (+-1), in int32, and scales once in float64. Exact on any CPU
            with a C compiler, and its cost follows the spikes, not the inputs: the mode of CPUs without VNNI
            where the probe finds it faster than float32 and 'binary'.

Where neither op is exact, or to test the arithmetic on any machine, each mode also runs *emulated*
('vnni-emulated', 'binary-emulated'): the same integers, layouts and scales, multiplied in float64
(exact: every sum is an integer far below 2^53) instead of by oneDNN.
The weights are derived from the module's own parameters at run time, like FoldedBN's, so the
state_dict stays the ANN's and loading new weights or thresholds re-derives them.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv import config
from snnconv.errors import ConversionError
from snnconv.runtime import sparse_layer
from snnconv.runtime.context import current
from snnconv.runtime.modules import FoldedBN, Neuron
from snnconv.settings import INT8_MODES as MODES
from snnconv.settings import NeuronConfig

_HI = 255  # weight = 255 * hi + lo; 255 * spike still fits uint8
_HI_SIGNED = 127  # 'vnni' on signed spikes: 127 * (spike + 1) <= 254 fits uint8
_scratch = threading.local()  # uint8 input buffers by shape, shared: each is read only inside one call


# ---- the ops: oneDNN's, or their integer arithmetic in float64 ----------------------------------------


@dataclass
class _Emulated:
    """What `_pack_*` returns when emulating: the int8 weights themselves and the layer geometry."""

    w: torch.Tensor
    geometry: tuple = ()


def _pack_conv(w, scale, stride, padding, dilation, emulated: bool, x_shape=None):
    """Weights in oneDNN's layout for inputs of `x_shape`: a layout packed for another shape is
    reordered again at every call, which costs far more than the convolution."""
    if emulated:
        return _Emulated(w, (tuple(stride), tuple(padding), tuple(dilation)))
    w = w.contiguous(memory_format=torch.channels_last)
    shape = None if x_shape is None else list(x_shape)
    return torch.ops.onednn.qconv_prepack(w, scale, 1.0, 0, list(stride), list(padding), list(dilation), 1, shape)


def _pack_linear(w, emulated: bool, x_shape=None):
    if emulated:
        return _Emulated(w)
    return torch.ops.onednn.qlinear_prepack(w, None if x_shape is None else list(x_shape))


def _emulate(packed: _Emulated, x: torch.Tensor) -> torch.Tensor:
    """The exact integer sums of the op, as float64."""
    if packed.geometry:
        stride, padding, dilation = packed.geometry
        return F.conv2d(x.double(), packed.w.double(), None, stride, padding, dilation)
    return x.double() @ packed.w.double().t()


def _finish(acc: torch.Tensor, scale, bias, accum=None) -> torch.Tensor:
    """oneDNN's epilogue on exact sums: scale per output channel, add the bias (and the sum post-op)."""
    view = (1, -1, 1, 1) if acc.dim() == 4 else (1, -1)
    y = acc * scale.double().view(view)
    if bias is not None:
        y = y + bias.double().view(view)
    y = y.float()
    if accum is not None:
        accum.add_(y)
        return accum
    return y


@functools.lru_cache(maxsize=64)
def _zero_points(n: int) -> torch.Tensor:
    """The output zero points the ops take (all zero; read only), made once per size, not at every call."""
    return torch.zeros(n, dtype=torch.int32)


def _qconv(packed, x, scale, bias, stride, padding, dilation, accum=None) -> torch.Tensor:
    """float32 scale[c] * conv(x, w)[c] + bias[c] (+ accum, in place) for uint8 x and int8 w."""
    if isinstance(packed, _Emulated):
        return _finish(_emulate(packed, x), scale, bias, accum)
    zero = _zero_points(scale.numel())
    geometry = (list(stride), list(padding), list(dilation), 1)
    if accum is None:
        return torch.ops.onednn.qconv2d_pointwise(
            x, 1.0, 0, packed, scale, zero, bias, *geometry, 1.0, 0, torch.float32, "none", [], ""
        )
    return torch.ops.onednn.qconv2d_pointwise.binary(
        x,
        1.0,
        0,
        packed,
        scale,
        zero,
        accum,
        bias,
        *geometry,
        1.0,
        0,
        torch.float32,
        1.0,
        0,
        "sum",
        1.0,
        "none",
        [],
        "",
    )


def _qlinear(packed, x, scale, bias, accum=None) -> torch.Tensor:
    if isinstance(packed, _Emulated):
        return _finish(_emulate(packed, x), scale, bias, accum)
    zero = _zero_points(scale.numel())
    if accum is None:
        return torch.ops.onednn.qlinear_pointwise(
            x, 1.0, 0, packed, scale, zero, bias, 1.0, 0, torch.float32, "none", [], ""
        )
    return torch.ops.onednn.qlinear_pointwise.binary(
        x, 1.0, 0, packed, scale, zero, accum, bias, 1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, "none", [], ""
    )


# ---- which mode runs here ------------------------------------------------------------------------------


@functools.cache
def exact(mode: str) -> bool:
    """Does `mode`'s op sum exactly on this CPU? Checked once per process on a convolution and a matmul
    holding the extreme weights +-127 (emulated modes: always)."""
    if mode.endswith("-emulated"):
        return True
    if mode == "sparse":  # integer sums by construction (tests/test_sparse_layer.py): where it compiled
        return sparse_layer.available()
    try:
        g = torch.Generator().manual_seed(0)
        # inputs up to 2: signed spikes shifted by one; 'vnni' probes 255 * {0, 1} (signed: 127 * {0, 1, 2})
        x = torch.randint(0, 3 if mode == "binary" else 2, (2, 16, 5, 5), generator=g, dtype=torch.uint8)
        w = torch.randint(-127, 128, (8, 16, 3, 3), generator=g, dtype=torch.int8)
        w[0].fill_(127)
        w[1].fill_(-127)
        if mode == "vnni":
            x = x * _HI
        ones, geometry = torch.ones(8), ((1, 1), (1, 1), (1, 1))
        packed = _pack_conv(w, ones, *geometry, False)
        conv = _qconv(packed, x.contiguous(memory_format=torch.channels_last), ones, None, *geometry)
        xf, wf = x.flatten(1)[:, :64].contiguous(), w.flatten(1)[:, :64].contiguous()
        packed_linear = _pack_linear(wf, False)
        linear = _qlinear(packed_linear, xf, ones, None)
        if mode == "binary":  # and the sum post-op it adds the two halves with
            conv = _qconv(packed, x.contiguous(memory_format=torch.channels_last), ones, None, *geometry, accum=conv)
            linear = _qlinear(packed_linear, xf, ones, None, accum=linear) / 2
            conv = conv / 2
        return torch.equal(conv.double(), F.conv2d(x.double(), w.double(), None, 1, 1)) and torch.equal(
            linear.double(), xf.double() @ wf.double().t()
        )
    except Exception:  # no oneDNN, or an op missing from this torch build
        return False


@functools.cache
def probe_times() -> dict[str, float]:
    """Seconds per call of a typical spiking layer (64 -> 64 channels, 3x3, 14x14 maps, batch 128, 15% of the
    inputs spiking, signed), best of 3, as float32 and in each mode exact here that is not 'vnni': without
    VNNI, u8 x s8 products cost about as much as float32 ones and 'binary' does each twice, so which wins is
    measured, once per process."""
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    active = torch.rand(128, 64, 14, 14, generator=g) < 0.15
    sign = torch.where(torch.rand(128, 64, 14, 14, generator=g) < 0.3, -1.0, 1.0)
    x = (active * sign).contiguous(memory_format=torch.channels_last)
    theta = torch.ones(64)

    def best(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    times = {}
    with torch.no_grad():
        times["float32"] = best(lambda: conv(x))
        for m in ("binary", "sparse"):
            if exact(m):
                layer = SpikeLayer(conv, Neuron(NeuronConfig(signed=True)), ("probe", "probe"), mode=m)
                times[m] = best(lambda layer=layer: layer.run(x, theta))
    return times


def mode() -> str | None:
    """The mode convert() uses here: $SNNCONV_INT8 if it names one ('off': none), else 'vnni' where
    that is exact, else the faster of 'sparse' and 'binary' where exact here and measured faster than
    float32 (`probe_times`), else None."""
    ENV = config.INT8.name  # 'auto' (default), 'off', or a mode to force: one of MODES
    want = config.INT8.get().lower()
    if want == "off":
        return None
    if want != "auto":
        if want not in MODES:
            raise ConversionError(f"${ENV}={want!r}: choose 'auto', 'off' or one of {list(MODES)}")
        if not exact(want):
            if want == "sparse":
                raise ConversionError(f"${ENV}='sparse': its kernel cannot run here ({sparse_layer.why_not()})")
            raise ConversionError(
                f"${ENV}={want!r}: oneDNN's u8 x s8 ops are not exact in that mode on this CPU "
                f"(or missing from this torch build); use 'auto', 'off' or '{want}-emulated'"
            )
        return want
    if exact("vnni"):
        return "vnni"
    times = probe_times()
    fastest = min(times, key=times.get)
    return None if fastest == "float32" else fastest


def choose(recorded: str | None) -> str:
    """The mode to lower with: the one a conversion recorded, where it is exact here and $SNNCONV_INT8 does not
    force another; else `mode()` ('off' where none is fast). A checkpoint thus rebuilds the layers it was
    converted with, not whatever a timing probe on a busy machine prefers."""
    if recorded is not None and config.INT8.get().lower() == "auto" and (recorded == "off" or exact(recorded)):
        return recorded
    return mode() or "off"


def available() -> bool:
    """Is some exact int8 mode fast here (what `mode()` picks without $SNNCONV_INT8)?"""
    return exact("vnni") or min(probe_times(), key=probe_times().get) != "float32"


# ---- weights -------------------------------------------------------------------------------------------


def split_weight(w: torch.Tensor, base: int = _HI) -> tuple[torch.Tensor, torch.Tensor]:
    """w [C_out, C_in, ...] (float64) -> (int8 [C_out, 2 C_in, ...] = [hi, lo], s [C_out]) with
    w ~= s * (base * hi + lo) to within s / 2 (base 255, or 127 for signed spikes in 'vnni'). The largest
    step count 127 * base + base // 2 keeps hi = round(q / base) <= 127 and |lo| <= base // 2."""
    peak = w.abs().flatten(1).amax(1)
    s = torch.where(peak > 0, peak / (127 * base + base // 2), torch.ones_like(peak))
    q = torch.round(w / s.view(-1, *([1] * (w.dim() - 1))))
    hi = torch.round(q / base)
    return torch.cat([hi, q - base * hi], 1).to(torch.int8), s


def fold_input_scale(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The weight of layer(theta * x) as a weight on x (groups=1): theta, a scalar or one value per
    input channel, multiplies the weight's input dim. A linear layer reading flattened [C, H, W] maps
    has C * H * W inputs: each channel's theta covers its H * W of them."""
    if theta.dim() == 0:
        return w * theta
    theta = theta.repeat_interleave(w.shape[1] // theta.numel())
    return w * theta.view(1, -1, *([1] * (w.dim() - 2)))


def supports(layer: nn.Module, mode: str | None = None) -> bool:
    """A float32 layer this path runs: a Linear, or a 2-d convolution with zero padding given as numbers and
    no groups; a 1x1 one unpadded and undilated (`_pointwise`: a matmul over the positions it reads; in
    'sparse', unstrided over those). In 'sparse', one whose int32 sums cannot overflow (sparse_layer.MAX_INPUTS)."""
    if mode == "sparse" and layer.weight[0].numel() > sparse_layer.MAX_INPUTS:
        return False
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype == torch.float32
    return (
        isinstance(layer, nn.Conv2d)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and layer.groups == 1
        and layer.weight.dtype == torch.float32
        and (layer.kernel_size[0] * layer.kernel_size[1] > 1 or _pointwise(layer))
    )


def _pointwise(layer: nn.Module) -> bool:
    """A 1x1 convolution without padding or dilation: the int8 path runs it as a matmul over the positions its
    stride reads (oneDNN's own strided 1x1 int8 convolution is slower than float32). In 'sparse' the event
    kernel reads those positions alone (made strided, it would list the spikes of all of them)."""
    return (
        isinstance(layer, nn.Conv2d)
        and tuple(layer.kernel_size) == (1, 1)
        and tuple(layer.padding) == (0, 0)
        and tuple(layer.dilation) == (1, 1)
    )


def _input_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 buffer reused across calls (fresh large allocations cost page faults on every call)."""
    buffers = _scratch.__dict__.setdefault("by_shape", {})
    buf = buffers.get(shape)
    if buf is None:
        if len(buffers) >= 16:  # new batch sizes: drop the old buffers rather than keep every one
            buffers.clear()
        buf = buffers[shape] = torch.empty(shape, dtype=torch.uint8)
    return buf


def _encode(x: torch.Tensor, out: torch.Tensor, signed: bool) -> None:
    """Spikes x as integers into the uint8 view `out` (x's shape): 0/1, or signed spikes shifted by one, 0/1/2."""
    if signed:
        torch.ge(x, 0, out=out.view(torch.bool))
        out.add_(x > 0)
    else:
        torch.ne(x, 0, out=out.view(torch.bool))


def _ring(d: torch.Tensor, cut_rows: list[bool], cut_cols: list[bool]) -> list[tuple[slice, slice]]:
    """(rows, columns) slices of the [.., H, W] border map d covering all its nonzeros: the leading and trailing
    rows and columns where zero padding cuts taps off (cut_rows, cut_cols), when everything between them is
    zero; else the whole map."""
    h, w = d.shape[-2:]

    def ends(cut: list[bool], size: int) -> tuple[int, int]:
        lead = next((i for i, c in enumerate(cut) if not c), size)
        trail = next((i for i, c in enumerate(reversed(cut)) if not c), size)
        return lead, max(size - trail, lead)

    (top, bottom), (left, right) = ends(cut_rows, h), ends(cut_cols, w)
    if d[..., top:bottom, left:right].any():  # not a ring (cannot happen for zero padding; kept exact anyway)
        return [(slice(0, h), slice(0, w))]
    ring = [(slice(0, top), slice(0, w)), (slice(bottom, h), slice(0, w))]
    ring += [(slice(top, bottom), slice(0, left)), (slice(top, bottom), slice(right, w))]
    return [(r, c) for r, c in ring if r.stop > r.start and c.stop > c.start]


class SpikeLayer(nn.Module):
    """`layer` (a Conv2d or Linear, or a FoldedBN around one) reading the spikes of `neuron` (binary, or signed
    where its config says so). In spiking mode on CPU it runs as int8 ops in `mode` (see the module doc);
    otherwise (ANN mode, CUDA, graph capture) it is `layer`. Holds both by reference, unregistered: no
    state_dict keys."""

    def __init__(
        self, layer: nn.Module, neuron: nn.Module, names: tuple[str, str], mode: str = "vnni", flatten: bool = False
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        self.__dict__["_layer"], self.__dict__["_neuron"] = layer, neuron
        self.names, self.mode = names, mode
        self.signed = bool(getattr(getattr(neuron, "config", None), "signed", False))  # spikes -theta too
        self.flatten = flatten  # a Linear reading flatten(x, 1) of [N, C, H, W] spikes: it takes x itself
        self._cache = (None, None, {})  # (key of weights and threshold, derived weights, packed by input shape)
        if hasattr(neuron, "int8_readers"):  # the neuron's CPU kernel can write this layer's uint8 input
            base = _HI_SIGNED if self.signed else _HI
            neuron.int8_readers.append((mode.startswith("vnni"), base, not isinstance(self.inner, nn.Linear)))

    def __getstate__(self) -> dict:
        """Copies leave the packed weights behind (oneDNN's opaque tensors have no storage to copy); the
        copy derives them again at its first call."""
        state = dict(super().__getstate__())
        state["_cache"] = (None, None, {})
        return state

    @property
    def inner(self) -> nn.Module:
        """The Conv2d or Linear."""
        return getattr(self._layer, "_layer", self._layer)

    def extra_repr(self) -> str:
        kind = "signed spikes" if self.signed else "spikes"
        return f"{self.names[0]} as int8 ({self.mode}) on the {kind} of {self.names[1]}"

    def _derive(self, theta: torch.Tensor, hwc: tuple[int, ...] | None):
        """(int8 weights, scales, bias, integer weights as float64, s as float64) for this mode: 'vnni' [hi, lo]
        along the inputs with scales s; 'binary' (hi, lo) with scales (255 s, s). Signed spikes: the bias less
        s * (sum of the integer weights), the interior of layer(1)."""
        inner = self.inner
        w, b = self._layer.folded() if isinstance(self._layer, FoldedBN) else (inner.weight, inner.bias)
        with torch.no_grad():
            w = fold_input_scale(w.double(), theta.detach().double().cpu())
            if hwc is not None:
                w = w.view(w.shape[0], *hwc).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
            base = _HI_SIGNED if self.signed and self.mode.startswith("vnni") else _HI
            q, s = split_weight(w, base)
            c = q.shape[1] // 2
            whole = base * q[:, :c].double() + q[:, c:].double()  # the integers the op sums, exactly
            bias = b.detach().float().contiguous() if b is not None else None
            if self.mode == "sparse":  # sums of +-1 spikes themselves: no shift, no offset in the bias
                return sparse_layer.pack(whole), s.float(), bias, whole, s
            if self.signed:
                off = s * whole.flatten(1).sum(1)
                bias = (-off if b is None else b.detach().double() - off).float().contiguous()
            if self.mode.startswith("binary"):
                scales = ((s * _HI).float(), s.float())
                q = (q[:, :c].contiguous(), q[:, c:].contiguous())
            else:
                scales = s.float()
        return q, scales, bias, whole, s

    def _border(self, whole: torch.Tensor, s: torch.Tensor, chw: tuple[int, int, int]) -> tuple | None:
        """Signed spikes into a padded convolution: s * (layer(1) - its interior value), the taps zero padding
        cuts off, [1, C_out, H_out, W_out] float32 (zero inside), subtracted from each output; None without
        padding. Exact integers until the scale: the ones map against the weights summed over input channels.
        Returned with the (rows, columns, that part of the map) that cover its nonzero ring: the subtraction
        touches only those (a full pass over the output was 3% of a ResNet's call)."""
        inner = self.inner
        if not any(inner.padding):
            return None
        taps = whole.sum(1, keepdim=True)
        ones = torch.ones(1, 1, *chw[1:], dtype=torch.float64)
        layer1 = F.conv2d(ones, taps, None, inner.stride, inner.padding, inner.dilation)
        d = (layer1 - taps.flatten(1).sum(1).view(1, -1, 1, 1)) * s.view(1, -1, 1, 1)
        d = d.float().contiguous(memory_format=torch.channels_last)
        cut = [
            [o * st - p < 0 or o * st - p + dil * (k - 1) > size - 1 for o in range(out)]
            for out, st, p, dil, k, size in zip(
                d.shape[2:], inner.stride, inner.padding, inner.dilation, inner.kernel_size, chw[1:]
            )
        ]
        return d, [(rows, cols, d[:, :, rows, cols]) for rows, cols in _ring(d, *cut)]

    def _packed_for(self, x_shape: tuple[int, ...], theta: torch.Tensor, hwc: tuple[int, ...] | None = None):
        """(packed weights for inputs of x_shape, scales, bias, border map or None) for this mode (see
        `_derive`, `_border`). hwc = (C, H, W): a Linear reading a channels-last map in its memory order,
        H, W, C. Re-derived when the weights, bias or threshold change, packed once per input shape.
        Concurrent calls may both derive or pack: the cache is one tuple, replaced whole, never changed
        under a reader."""
        inner = self.inner
        w, b = self._layer.folded() if isinstance(self._layer, FoldedBN) else (inner.weight, inner.bias)
        key = (*((t.data_ptr(), t._version) if t is not None else None for t in (w, b, theta)), hwc)
        cached_key, weights, packed_by_shape = self._cache
        if key != cached_key:
            weights, packed_by_shape = self._derive(theta, hwc), {}
            self._cache = (key, weights, packed_by_shape)
        q, s, bias, whole, s64 = weights
        if self.mode == "sparse":  # one layout for every input shape
            return q, s, bias, None
        entry = packed_by_shape.get(x_shape)
        if entry is None:
            emulated = self.mode.endswith("-emulated")
            border = None
            if isinstance(inner, nn.Linear) or _pointwise(inner):
                pack = lambda q, s: _pack_linear(q.flatten(1), emulated, x_shape)  # noqa: E731
            else:
                pack = lambda q, s: _pack_conv(q, s, inner.stride, inner.padding, inner.dilation, emulated, x_shape)  # noqa: E731
                if self.signed:
                    border = self._border(whole, s64, (whole.shape[1], *x_shape[2:]))
            packed = tuple(map(pack, q, s)) if isinstance(q, tuple) else pack(q, s)
            entry = (packed, border)
            # many batch sizes: keep the recent ones only
            kept = dict(list(packed_by_shape.items())[-7:]) if len(packed_by_shape) >= 8 else dict(packed_by_shape)
            kept[x_shape] = entry
            self._cache = (key, weights, kept)
        return entry[0], s, bias, entry[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            current() is None  # the ANN (calibration)
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
        ):
            # forward(): hooks count this module once, not the layer again
            return self._layer.forward(x.flatten(1) if self.flatten else x)
        return self.run(x, self._neuron.threshold)

    def _linear_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size, tuple[int, ...] | None]:
        """A linear layer's input as [m, k] rows, its leading shape, and hwc: flattening a channels-last map, the
        layer reads it in its own memory order (H, W, C: weights permuted), not a copy."""
        hwc = None
        if self.flatten:
            if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
                hwc, x = tuple(x.shape[1:]), x.permute(0, 2, 3, 1)
            x = x.reshape(x.shape[0], -1)
        return x.reshape(-1, x.shape[-1]), x.shape[:-1], hwc

    def _integers(self, x: torch.Tensor, code: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """The spikes as this layer's uint8 input, u = spike / theta (+1 if signed), in `shape`: [m, k] rows of `x`
        [m, k], or [n, h, w, c] channels-last of a map `x` [n, c, h, w]; in 'vnni' [base * u, u] along the last
        dim (twice as long). The neuron kernel's code where it wrote one, else encoded here into a reused buffer."""
        vnni = self.mode.startswith("vnni")
        full = (*shape[:-1], 2, shape[-1]) if vnni else shape
        if code is not None:
            return code.view(*shape[:-1], -1)
        buf = _input_buffer(full)
        u = buf[..., 1, :] if vnni else buf
        _encode(x, u if len(shape) == 2 else u.permute(0, 3, 1, 2), self.signed)
        if vnni:
            torch.mul(u, _HI_SIGNED if self.signed else _HI, out=buf[..., 0, :])
        return buf.view(*shape[:-1], -1)

    def run(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The int8 layer on spikes x (each 0 or its channel's theta; signed: or -theta), float32 out."""
        inner, vnni = self.inner, self.mode.startswith("vnni")
        fused = getattr(self._neuron, "int8_input", None)
        code = fused(x) if fused is not None else None  # written by the neuron's CPU kernel as it fired
        if self.mode == "sparse":
            return self._run_sparse(x, theta, code)
        if isinstance(inner, nn.Linear):
            x, lead, hwc = self._linear_rows(x)
            m, k = x.shape
            packed, s, bias, _ = self._packed_for((m, 2 * k) if vnni else (m, k), theta, hwc)
            y = self._matmul(packed, self._integers(x, code, (m, k)), s, bias)
            return y.view(*lead, -1)  # no border: a linear layer's layer(1) is all interior, in the bias
        n, c, h, w = x.shape
        if _pointwise(inner):
            return self._run_pointwise(x, theta, code)
        geometry = (inner.stride, inner.padding, inner.dilation)
        packed, s, bias, border = self._packed_for((n, 2 * c if vnni else c, h, w), theta)
        buf = self._integers(x, code, (n, h, w, c)).permute(0, 3, 1, 2)  # channels-last
        if vnni:
            y = _qconv(packed, buf, s, bias, *geometry)
        else:
            lo = _qconv(packed[1], buf, s[1], bias, *geometry)
            y = _qconv(packed[0], buf, s[0], None, *geometry, accum=lo)
        if border is not None:
            for rows, cols, part in border[1]:
                y[:, :, rows, cols].sub_(part)
        # oneDNN answers channels-last; NCHW spikes (no channels_last pass) get NCHW back, as from F.conv2d,
        # or a later x.view(n, -1) in the model's code fails
        return y.contiguous() if x.is_contiguous() else y

    def _matmul(self, packed, rows: torch.Tensor, s, bias) -> torch.Tensor:
        """The int8 matmul of [m, k] integer rows: one op ('vnni'), or against hi and lo, the second adding into the
        first's output."""
        if self.mode.startswith("vnni"):
            return _qlinear(packed, rows, s, bias)
        return _qlinear(packed[0], rows, s[0], None, accum=_qlinear(packed[1], rows, s[1], bias))

    def _positions(self, u: torch.Tensor) -> torch.Tensor:
        """The channels-last integer map u [n, h, w, k] at the positions a 1x1 convolution's stride reads: u itself,
        or those copied out (contiguous) where strided."""
        sh, sw = self.inner.stride
        if (sh, sw) == (1, 1):
            return u
        picked = u[:, ::sh, ::sw]
        out = _input_buffer((*picked.shape, 1))[..., 0]  # its own key: the full map's buffer may be u
        out.copy_(picked)
        return out

    def _run_pointwise(self, x: torch.Tensor, theta: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor:
        """A 1x1 convolution as a matmul: the channels-last integer map (its positions the stride reads, copied
        out when strided) as [positions, channels] rows against the weights; no padding, so no border."""
        n, c, h, w = x.shape
        u = self._positions(self._integers(x, code, (n, h, w, c)))
        rows = u.reshape(-1, u.shape[-1])
        packed, s, bias, _ = self._packed_for(tuple(rows.shape), theta)
        y = self._matmul(packed, rows, s, bias).view(*u.shape[:3], -1).permute(0, 3, 1, 2)  # channels-last
        return y.contiguous() if x.is_contiguous() else y

    def _run_sparse(self, x: torch.Tensor, theta: torch.Tensor, code: torch.Tensor | None) -> torch.Tensor:
        """'sparse': the uint8 spikes (the neuron kernel's, or encoded here) channels-last into the C kernel."""
        inner, signed = self.inner, self.signed
        if isinstance(inner, nn.Linear):
            x, lead, hwc = self._linear_rows(x)
            packed, s, bias, _ = self._packed_for(tuple(x.shape), theta, hwc)
            u = self._integers(x, code, tuple(x.shape))
            return sparse_layer.run(u, int(signed), packed, inner.out_features, None, s, bias).view(*lead, -1)
        n, c, h, w = x.shape
        packed, s, bias, _ = self._packed_for((n, c, h, w), theta)
        u = self._integers(x, code, (n, h, w, c))
        geometry = (inner.stride, inner.padding, inner.dilation, inner.kernel_size)
        if _pointwise(inner):  # unstrided, over the positions the stride reads: no spike lists of the others
            u, geometry = self._positions(u), ((1, 1), (0, 0), (1, 1), (1, 1))
        y = sparse_layer.run(u, int(signed), packed, inner.out_channels, geometry, s, bias).permute(0, 3, 1, 2)
        return y.contiguous() if x.is_contiguous() else y  # channels-last, as oneDNN answers; NCHW in, NCHW out
