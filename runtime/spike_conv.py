"""Convolutions fed by binary spikes, run as one 8-bit integer convolution on CPU (oneDNN, VNNI).

A spike is 0 or theta, so as an integer it is 0 or 1 and the convolution over it is a sum of weights.
The threshold theta folds into the weights per input channel, and the float weights become 16-bit
fixed point per output channel, split into two int8 halves:
    W * theta ~= s * (255 * hi + lo),   hi, lo in [-127, 127],   s = max|W * theta| / (127 * 255 + 127)
Giving the convolution both halves as input channels, against spikes times 255 and the spikes:
    conv(theta * spikes, W) ~= s * conv([255 * spikes, spikes], [hi, lo])
one uint8 x int8 convolution of twice the input channels with exact int32 sums: about twice as fast as
the float32 one, off by at most s/2 per weight (1.5e-5 of a channel's largest weight).
The weights are derived from the module's own parameters at run time, like FoldedBN's, so the
state_dict stays the ANN's and loading new weights or thresholds re-derives them.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn as nn

_HI = 255                # weight = 255 * hi + lo; 255 * spike still fits uint8
_QMAX = 127 * _HI + 127
_scratch = threading.local()  # uint8 input buffers by shape, shared: each is read only inside one call


@functools.cache
def available() -> bool:
    """Do oneDNN's int8 convolutions run here and sum u8 x s8 products exactly (VNNI)? Without VNNI,
    oneDNN halves the weights to avoid int16 overflow, which would lose their low bit."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 2, (2, 16, 5, 5), generator=g, dtype=torch.uint8) * _HI
        w = torch.randint(-127, 128, (8, 16, 3, 3), generator=g, dtype=torch.int8)
        w[0].fill_(127)
        w[1].fill_(-127)
        geometry = ((1, 1), (1, 1), (1, 1), 1)
        out = _qconv(_pack(w, torch.ones(8), *geometry), x.contiguous(memory_format=torch.channels_last),
                     torch.ones(8), None, *geometry)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
        return bool(torch.equal(out.double(), ref))
    except Exception:  # no oneDNN, or an op missing from this torch build
        return False


def _pack(w: torch.Tensor, scale: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    w = w.contiguous(memory_format=torch.channels_last)
    return torch.ops.onednn.qconv_prepack(w, scale, 1.0, 0, list(stride), list(padding), list(dilation),
                                          groups, None)


def _qconv(packed, x, scale, bias, stride, padding, dilation, groups) -> torch.Tensor:
    zero = torch.zeros(scale.numel(), dtype=torch.int32)
    return torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, scale, zero, bias, list(stride), list(padding),
                                              list(dilation), groups, 1.0, 0, torch.float32, "none", [], "")


def split_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [C_out, C_in, ...] (float64) -> (int8 [C_out, 2 C_in, ...] = [hi, lo], s [C_out]) with
    w ~= s * (255 * hi + lo) to within s / 2."""
    peak = w.abs().flatten(1).amax(1)
    s = torch.where(peak > 0, peak / _QMAX, torch.ones_like(peak))
    q = torch.round(w / s.view(-1, *([1] * (w.dim() - 1))))
    hi = torch.round(q / _HI)
    return torch.cat([hi, q - _HI * hi], 1).to(torch.int8), s


def fold_input_scale(w: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The weight of conv(theta * x) as a weight on x (groups=1): theta, a scalar or one value per input
    channel, multiplies the weight's input-channel dim."""
    return w * (theta.view(1, -1, *([1] * (w.dim() - 2))) if theta.dim() > 0 else theta)


def supports(conv: nn.Module) -> bool:
    """A float32 2-d convolution this path runs: zero padding given as numbers, no groups, and a kernel
    wider than 1x1 (a 1x1 convolution reads too little per output to win against float32)."""
    return (isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.groups == 1 and conv.weight.dtype == torch.float32
            and conv.kernel_size[0] * conv.kernel_size[1] > 1)


class SpikeConv(nn.Module):
    """`layer` (a Conv2d, or a FoldedBN around one) reading the binary spikes of `neuron`. In spiking
    mode on CPU it runs the int8 convolution; otherwise (ANN mode, CUDA, graph capture) it is `layer`.
    Holds both by reference, unregistered: no state_dict keys."""

    def __init__(self, layer: nn.Module, neuron: nn.Module, names: tuple[str, str]):
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_neuron"] = layer, neuron
        self.names, self._key, self._packed = names, None, None

    def __getstate__(self) -> dict:
        """Copies leave the packed weights behind (oneDNN's opaque tensors have no storage to copy); the
        copy derives them again at its first call."""
        state = dict(super().__getstate__())
        state["_key"] = state["_packed"] = None
        return state

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self._layer, "_layer", self._layer)

    def extra_repr(self) -> str:
        return f"{self.names[0]} as int8 on the spikes of {self.names[1]}"

    def _weights(self):
        conv = self.conv
        w, b = self._layer.folded() if hasattr(self._layer, "folded") else (conv.weight, conv.bias)
        theta = self._neuron.threshold
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in (w, b, theta))
        if key != self._key:
            with torch.no_grad():
                q, s = split_weight(fold_input_scale(w.double(), theta.double().cpu()))
                geometry = (conv.stride, conv.padding, conv.dilation, 1)
                bias = b.detach().float().contiguous() if b is not None else None
                self._packed = _pack(q, s.float(), *geometry), s.float(), bias, geometry
            self._key = key
        return self._packed

    def _integer_input(self, x: torch.Tensor) -> torch.Tensor:
        """[255 * spikes, spikes] as uint8 [N, 2C, H, W], channels-last, in a buffer reused across calls
        (fresh large allocations cost page faults on every call)."""
        n, c, h, w = x.shape
        buffers = _scratch.__dict__.setdefault("by_shape", {})
        buf = buffers.get((n, h, w, c))
        if buf is None:
            if len(buffers) >= 16:  # new batch sizes: drop the old buffers rather than keep every one
                buffers.clear()
            buf = buffers[n, h, w, c] = torch.empty(n, h, w, 2, c, dtype=torch.uint8)
        torch.ne(x, 0, out=buf[:, :, :, 1].permute(0, 3, 1, 2).view(torch.bool))
        torch.mul(buf[:, :, :, 1], _HI, out=buf[:, :, :, 0])
        return buf.view(n, h, w, 2 * c).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        clock = self._neuron.clock
        if clock.mode == "ann" or x.device.type != "cpu" or x.dtype != torch.float32 \
                or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self._layer.forward(x)  # forward(): hooks count this module once, not the layer again
        packed, s, bias, geometry = self._weights()
        return _qconv(packed, self._integer_input(x), s, bias, *geometry)
