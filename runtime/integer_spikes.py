"""Convolutions and linear layers fed by binary spikes, run as one 8-bit integer op on CPU (oneDNN, VNNI).

A spike is 0 or theta, so as an integer it is 0 or 1 and the layer over it is a sum of weights.
The threshold theta folds into the weights per input channel, and the float weights become 16-bit
fixed point per output channel, split into two int8 halves:
    W * theta ~= s * (255 * hi + lo),   hi, lo in [-127, 127],   s = max|W * theta| / (127 * 255 + 127)
Giving the layer both halves as input channels, against spikes times 255 and the spikes:
    conv(theta * spikes, W) ~= s * conv([255 * spikes, spikes], [hi, lo])
one uint8 x int8 op over twice the inputs with exact int32 sums: about twice as fast as float32,
off by at most s/2 per weight (1.5e-5 of a channel's largest weight).
The weights are derived from the module's own parameters at run time, like FoldedBN's, so the
state_dict stays the ANN's and loading new weights or thresholds re-derives them.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn as nn

from snnconv.runtime.context import current

_HI = 255  # weight = 255 * hi + lo; 255 * spike still fits uint8
_QMAX = 127 * _HI + 127
_scratch = threading.local()  # uint8 input buffers by shape, shared: each is read only inside one call


@functools.cache
def available() -> bool:
    """Do oneDNN's int8 convolution and matmul run here and sum u8 x s8 products exactly (VNNI)? Without
    VNNI, oneDNN halves the weights to avoid int16 overflow, which would lose their low bit."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 2, (2, 16, 5, 5), generator=g, dtype=torch.uint8) * _HI
        w = torch.randint(-127, 128, (8, 16, 3, 3), generator=g, dtype=torch.int8)
        w[0].fill_(127)
        w[1].fill_(-127)
        geometry = ((1, 1), (1, 1), (1, 1), 1)
        ones = torch.ones(8)
        conv = _qconv(
            _pack_conv(w, ones, *geometry), x.contiguous(memory_format=torch.channels_last), ones, None, *geometry
        )
        xf, wf = x.flatten(1)[:, :64].contiguous(), w.flatten(1)[:, :64].contiguous()
        linear = _qlinear(_pack_linear(wf), xf, ones, None)
        return torch.equal(
            conv.double(), torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
        ) and torch.equal(linear.double(), xf.double() @ wf.double().t())
    except Exception:  # no oneDNN, or an op missing from this torch build
        return False


def _pack_conv(
    w: torch.Tensor, scale: torch.Tensor, stride, padding, dilation, groups, x_shape: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Weights in oneDNN's layout for inputs of `x_shape`: a layout packed for another shape is
    reordered again at every call (measured: 30 ms on a 0.2 ms convolution)."""
    w = w.contiguous(memory_format=torch.channels_last)
    return torch.ops.onednn.qconv_prepack(
        w,
        scale,
        1.0,
        0,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        None if x_shape is None else list(x_shape),
    )


def _qconv(packed, x, scale, bias, stride, padding, dilation, groups) -> torch.Tensor:
    zero = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.ops.onednn.qconv2d_pointwise(
        x,
        1.0,
        0,
        packed,
        scale,
        zero,
        bias,
        list(stride),
        list(padding),
        list(dilation),
        groups,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def _pack_linear(w: torch.Tensor, x_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.ops.onednn.qlinear_prepack(w, None if x_shape is None else list(x_shape))


def _qlinear(packed, x, scale, bias) -> torch.Tensor:
    zero = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.ops.onednn.qlinear_pointwise(
        x, 1.0, 0, packed, scale, zero, bias, 1.0, 0, torch.float32, "none", [], ""
    )


def split_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [C_out, C_in, ...] (float64) -> (int8 [C_out, 2 C_in, ...] = [hi, lo], s [C_out]) with
    w ~= s * (255 * hi + lo) to within s / 2."""
    peak = w.abs().flatten(1).amax(1)
    s = torch.where(peak > 0, peak / _QMAX, torch.ones_like(peak))
    q = torch.round(w / s.view(-1, *([1] * (w.dim() - 1))))
    hi = torch.round(q / _HI)
    return torch.cat([hi, q - _HI * hi], 1).to(torch.int8), s


def fold_input_scale(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The weight of layer(theta * x) as a weight on x (groups=1): theta, a scalar or one value per
    input channel, multiplies the weight's input dim. A linear layer reading flattened [C, H, W] maps
    has C * H * W inputs: each channel's theta covers its H * W of them."""
    if theta.dim() == 0:
        return w * theta
    theta = theta.repeat_interleave(w.shape[1] // theta.numel())
    return w * theta.view(1, -1, *([1] * (w.dim() - 2)))


def supports(layer: nn.Module) -> bool:
    """A float32 layer this path runs: a Linear, or a 2-d convolution with zero padding given as numbers,
    no groups, and a kernel wider than 1x1 (a 1x1 convolution reads too little per output to win)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.dtype == torch.float32
    return (
        isinstance(layer, nn.Conv2d)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and layer.groups == 1
        and layer.weight.dtype == torch.float32
        and layer.kernel_size[0] * layer.kernel_size[1] > 1
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


class SpikeLayer(nn.Module):
    """`layer` (a Conv2d or Linear, or a FoldedBN around one) reading the binary spikes of `neuron`. In
    spiking mode on CPU it runs as one int8 op; otherwise (ANN mode, CUDA, graph capture) it is `layer`.
    Holds both by reference, unregistered: no state_dict keys."""

    def __init__(self, layer: nn.Module, neuron: nn.Module, names: tuple[str, str]):
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_neuron"] = layer, neuron
        self.names = names
        self._cache = (None, None, {})  # (key of weights and threshold, derived weights, packed by input shape)

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
        return f"{self.names[0]} as int8 on the spikes of {self.names[1]}"

    def _packed_for(self, x_shape: tuple[int, ...]):
        """(packed weights for inputs of x_shape, scales, bias); re-derived when the weights, bias or
        threshold change, packed once per input shape. Concurrent calls may both derive or pack: the cache
        is one tuple, replaced whole, never changed under a reader."""
        inner = self.inner
        w, b = self._layer.folded() if hasattr(self._layer, "folded") else (inner.weight, inner.bias)
        theta = self._neuron.threshold
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in (w, b, theta))
        cached_key, weights, packed_by_shape = self._cache
        if key != cached_key:
            with torch.no_grad():
                q, s = split_weight(fold_input_scale(w.double(), theta.double().cpu()))
                bias = b.detach().float().contiguous() if b is not None else None
            weights, packed_by_shape = (q, s.float(), bias), {}
            self._cache = (key, weights, packed_by_shape)
        packed = packed_by_shape.get(x_shape)
        if packed is None:
            q, s, bias = weights
            if isinstance(inner, nn.Linear):
                packed = _pack_linear(q, x_shape)
            else:
                packed = _pack_conv(q, s, inner.stride, inner.padding, inner.dilation, 1, x_shape)
            # many batch sizes: keep the recent ones only
            kept = dict(list(packed_by_shape.items())[-7:]) if len(packed_by_shape) >= 8 else dict(packed_by_shape)
            kept[x_shape] = packed
            self._cache = (key, weights, kept)
        return packed, *weights[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            current() is None  # the ANN (calibration)
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
        ):
            return self._layer.forward(x)  # forward(): hooks count this module once, not the layer again
        inner = self.inner
        if isinstance(inner, nn.Linear):
            lead, k = x.shape[:-1], x.shape[-1]
            packed, s, bias = self._packed_for((lead.numel(), 2 * k))
            buf = _input_buffer((lead.numel(), 2, k))  # [255 * spikes, spikes] along the features
            torch.ne(x.reshape(-1, k), 0, out=buf[:, 1].view(torch.bool))
            torch.mul(buf[:, 1], _HI, out=buf[:, 0])
            return _qlinear(packed, buf.view(-1, 2 * k), s, bias).view(*lead, -1)
        n, c, h, w = x.shape
        packed, s, bias = self._packed_for((n, 2 * c, h, w))
        buf = _input_buffer((n, h, w, 2, c))  # [255 * spikes, spikes] along the channels, channels-last
        torch.ne(x, 0, out=buf[:, :, :, 1].permute(0, 3, 1, 2).view(torch.bool))
        torch.mul(buf[:, :, :, 1], _HI, out=buf[:, :, :, 0])
        return _qconv(
            packed,
            buf.view(n, h, w, 2 * c).permute(0, 3, 1, 2),
            s,
            bias,
            inner.stride,
            inner.padding,
            inner.dilation,
            1,
        )
