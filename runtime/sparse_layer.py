"""Event-driven integer layers on CPU: a convolution or linear layer over spikes as sums of weight rows.

Spikes are mostly zeros (most neurons are silent at most steps), and a nonzero one is +-1 times
its channel's threshold. With the threshold folded into the weights and the weights as 16-bit integers
(`integer_spikes.split_weight`, base 255: |w| <= 32512), an output pixel is
    y[o] = float(s[o] * sum over active taps of (+-1) * w[ky, kx, c, o] + bias[o])
and the sum is exact in int32 (|sum| <= 32512 * C * KH * KW < 2^31 for up to 66,000 inputs). For a group of samples
(one, or as many as make 256 output pixels: on small maps each block of weights then serves several samples before
the next block's are read), the kernel finds each input pixel's active channels once (16-byte compares: positive and
negative apart, in chunks of 64 channels), gathers for each output pixel and chunk one list of the weight rows its
taps need, then for each block of up to 64 output channels adds those int16 rows into vector registers of 16-bit
sums (see `rows_`: the loop reads half the bytes of int32 rows; longer lists amortise each list's gathering). Its
cost follows the number of spikes, not the number of inputs: no saturating int16 pair sums (AVX2 without VNNI) and
no per-op float32 rounding; the result is the float64 layer on the same integers, rounded once
(tests/test_sparse_layer.py checks it bitwise).

The C source is kernels/sparse_layer.c, compiled at first use like the neuron kernel (cpu_kernel.compile_library).
Without a compiler, the int8 pass uses oneDNN's dense modes where they are exact and fast, or leaves the layers float32.
"""

from __future__ import annotations

import ctypes

import torch

from snnconv.runtime import cpu_kernel
from snnconv.runtime.lazy import Lazy

SOURCE, _DEFINES = cpu_kernel.c_source("sparse_layer.c")
LANES, BLOCK, CHUNK = _DEFINES["SL"], _DEFINES["BLOCK"], _DEFINES["CHUNK"]  # SL: int16 lanes of a vector
MAX_WEIGHT = 32512  # |w| the 16-bit sums take (255 * 127 + 127, split_weight's largest)
MAX_INPUTS = 66000  # taps x input channels per output: 32512 * 66000 < 2^31, the int32 sum cannot overflow


def _compile() -> tuple:
    lib = cpu_kernel.compile_library(SOURCE, "sparse_layer")
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.sparse_layer, lib.sparse_layer_par):
        fn.argtypes = [ptr, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, i64, i64]
        fn.restype = ctypes.c_int
    return lib.sparse_layer, (lib.sparse_layer_par if cpu_kernel.openmp() else None)


# (the compiled function, its OpenMP driver or None), or None: no compiler, the int8 pass picks another mode
KERNEL = Lazy(_compile)


def available() -> bool:
    return KERNEL.get() is not None


def why_not() -> str | None:
    return KERNEL.why_not()


def pack(whole: torch.Tensor) -> torch.Tensor:
    """Integer weights [C_out, C_in, KH, KW] (or [C_out, C_in], a linear layer), |w| <= MAX_WEIGHT -> int16 in
    the kernel's order, [CP / B][chunks][KH * KW][CHUNK][B]: CP = C_out rounded up to LANES (to BLOCK above it),
    B = min(CP, BLOCK), input channels to chunks of CHUNK; the extra rows and columns zero. One block's chunk is
    contiguous."""
    w = whole if whole.dim() == 4 else whole.view(*whole.shape, 1, 1)
    if w.numel() and w.abs().max() > MAX_WEIGHT:  # the kernel's 16-bit sums are exact only within this
        raise ValueError(f"sparse_layer.pack: weights beyond +-{MAX_WEIGHT}")
    c_out, c_in, kh, kw = w.shape
    cp = -(-c_out // LANES) * LANES if c_out <= BLOCK else -(-c_out // BLOCK) * BLOCK
    b, chunks = min(cp, BLOCK), -(-c_in // CHUNK)
    padded = torch.zeros(cp, chunks * CHUNK, kh, kw, dtype=torch.int16)
    padded[:c_out, :c_in] = w.to(torch.int16)
    return padded.view(cp // b, b, chunks, CHUNK, kh * kw).permute(0, 2, 4, 3, 1).contiguous()


def run(u: torch.Tensor, shift: int, packed: torch.Tensor, c_out: int, geometry, scale, bias) -> torch.Tensor:
    """u: [N, H, W, C] uint8, contiguous (a linear layer: [N, C]); geometry: (stride, padding, dilation, kernel
    size) pairs (a linear layer: None). Returns [N, H_out, W_out, C_out] float32 ([N, C_out] for a linear layer)."""
    fn, par = KERNEL.get()
    linear = u.dim() == 2
    n, h, w, c = (u.shape[0], 1, 1, u.shape[1]) if linear else u.shape
    (sy, sx), (py, px), (dy, dx), (kh, kw) = geometry if geometry is not None else ((1, 1), (0, 0), (1, 1), (1, 1))
    cp = packed.shape[0] * packed.shape[-1]
    ho = (h + 2 * py - dy * (kh - 1) - 1) // sy + 1
    wo = (w + 2 * px - dx * (kw - 1) - 1) // sx + 1
    g = torch.tensor([h, w, c, kh, kw, cp, sy, sx, py, px, dy, dx, ho, wo, c_out], dtype=torch.int64)
    out = torch.empty((n, c_out) if linear else (n, ho, wo, c_out), dtype=torch.float32)
    if bias is None:
        bias = torch.zeros(c_out, dtype=torch.float32)
    args = (u.data_ptr(), shift, packed.data_ptr(), g.data_ptr(), scale.data_ptr(), bias.data_ptr(), out.data_ptr())
    failed = []

    def call(*a):  # a part on the Python thread pool
        if fn(*a) != 0:
            failed.append(a)

    if cpu_kernel.split(call, par, args, n, ()) or failed:
        raise MemoryError("sparse_layer: no scratch memory for the spike lists")
    return out
