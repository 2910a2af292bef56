"""CuPy backend: the fused CUDA neuron kernel (kernels/neuron.cu), compiled by NVRTC at first use and
cached per variant. Torch tensors are passed by data pointer, zero-copy where their layouts agree, on
torch's current stream (the caller's: no synchronisation anywhere)."""

from __future__ import annotations

import warnings

import torch

from snnconv.runtime import kernel_source, torch_backend

try:
    import cupy as cp
except ImportError as exc:  # the runtime registry reports this when 'cupy' is asked for
    cp, _IMPORT_ERROR = None, exc

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_THREADS = 256
_modules: dict = {}
_kernels: dict = {}


def check_available() -> None:
    if cp is None:
        raise ImportError(f"cupy is not installed ({_IMPORT_ERROR})")
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("CuPy sees no CUDA device")
    _kernel("float32", 1, False, True, False, False)  # compile once: NVRTC problems surface here


def _kernel(dtype: str, vec: int, static: bool, soft: bool, leak: bool, count: bool, signed: bool = False):
    key = (cp.cuda.runtime.getDevice(), dtype, vec, static, soft, leak, count, signed)
    if key not in _kernels:
        dev = key[0]
        if dev not in _modules:  # one module per device holds every variant, compiled together
            names = [kernel_source.name(*v) for v in kernel_source.all_variants()]
            _modules[dev] = cp.RawModule(
                code=kernel_source.SOURCE.read_text(), options=("-std=c++17",), name_expressions=names
            )
        _kernels[key] = _modules[dev].get_function(kernel_source.name(*key[1:]))
    return _kernels[key]


def _external_stream(ts: torch.cuda.Stream):
    """torch's current stream as a CuPy stream (no copy, no sync)."""
    if hasattr(ts, "__cuda_stream__") and hasattr(cp.cuda.Stream, "from_external"):
        return cp.cuda.Stream.from_external(ts)
    with warnings.catch_warnings():  # ExternalStream is deprecated in newer CuPy, the only way in older
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ts.cuda_stream)


def _dense(t: torch.Tensor) -> bool:
    """Its elements fill their memory span exactly, in some dim order (NCHW, channels-last, ...): then
    element i of memory is one neuron, whatever the order."""
    expect = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _strided(t: torch.Tensor, size: tuple, stride: tuple) -> torch.Tensor:
    """t itself when it has this layout, else a copy of it in that layout."""
    if all(a == b for a, b, n in zip(t.stride(), stride, size) if n > 1):
        return t
    return torch.empty_strided(size, stride, dtype=t.dtype, device=t.device).copy_(t)


def _channel_dim_ok(theta: torch.Tensor, v: torch.Tensor) -> bool:
    """theta broadcasts as one value per index of v's dim 1 ([C, 1, ...] against [N, C, ...]), or is one value."""
    if theta.numel() == 1:
        return True
    return v.dim() >= 2 and theta.dim() == v.dim() - 1 and theta.shape[0] == v.shape[1] == theta.numel()


def multistep(
    x: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    *,
    steps: int,
    static: bool,
    soft_reset: bool,
    v_reset: float,
    decay: float,
    out: torch.Tensor,
    count: torch.Tensor | None = None,
    calls: dict | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Same contract as torch_backend.multistep; `count` (float32, shape of v) accumulates spike counts;
    `calls` (a dict) counts the calls the kernel served ('kernel') and those left to torch ('torch').
    `signed`: signed spikes (soft reset), `count` their net count (needed), as in torch_backend.multistep.

    The kernel indexes x[t], out[t], v and count by one flat neuron index, so they must share one dense
    layout (any dim order): v's, or a dense copy of v. x and out in another layout (channels-last beside
    NCHW, a strided view, a misaligned offset) are copied into it, and out back, so nothing is ever
    written in the wrong order. Only dtypes the kernel lacks (float64) go to the torch backend. A count of
    another real dtype (the CPU kernel's uint8) is counted in a float32 copy and stored back."""
    kw = dict(steps=steps, static=static, soft_reset=soft_reset, v_reset=v_reset, decay=decay)
    if signed and (count is None or not soft_reset):
        raise ValueError("signed spikes need soft reset and their net count (count=)")
    work = torch_backend.count_in(count, torch.float32)
    if work is not count:
        multistep(x, v, theta, out=out, count=work, calls=calls, signed=signed, **kw)
        torch_backend.count_back(count, work)
        return out
    shape = tuple(v.shape)
    served = (
        x.dtype in _DTYPES
        and out.dtype == x.dtype
        and v.dtype == torch.float32
        and tuple(x.shape) == (shape if static else (steps, *shape))
        and tuple(out.shape) == (steps, *shape)
        and (count is None or (count.dtype == torch.float32 and tuple(count.shape) == shape))
        and _channel_dim_ok(theta, v)
    )
    if calls is not None:
        calls["kernel" if served else "torch"] = calls.get("kernel" if served else "torch", 0) + 1
    if not served:
        return torch_backend.multistep(x, v, theta, out=out, count=count, signed=signed, **kw)
    M = v.numel()
    if M == 0 or steps == 0:  # nothing to run: CUDA rejects a grid of 0 blocks
        return out
    vk = v if _dense(v) else v.contiguous()
    layout = tuple(vk.stride())
    xk = _strided(x, shape, layout) if static else _strided(x, (steps, *shape), (M, *layout))
    ok = _strided(out, (steps, *shape), (M, *layout))
    ck = _strided(count, shape, layout) if count is not None else None
    th = theta.detach().to(device=v.device, dtype=torch.float32).contiguous().view(-1)
    C = th.numel()
    inner = vk.stride(1) if C > 1 else 1  # the channel dim's stride: neuron i is in channel (i // inner) % C
    align = 4 * x.element_size()  # VEC = 4 loads and stores 4 elements of x and out at once
    vec = 4 if M % 4 == 0 and xk.data_ptr() % align == 0 and ok.data_ptr() % align == 0 else 1
    with cp.cuda.Device(v.device.index):
        kern = _kernel(_DTYPES[x.dtype], vec, static, soft_reset, decay != 1.0, count is not None, signed)
        stream = _external_stream(torch.cuda.current_stream(v.device))
        args = (
            xk.data_ptr(),
            ok.data_ptr(),
            vk.data_ptr(),
            th.data_ptr(),
            ck.data_ptr() if ck is not None else 0,
            cp.int64(M),
            cp.int32(steps),
            cp.int32(C),
            cp.int64(inner),
            cp.float32(v_reset),
            cp.float32(decay),
        )
        kern(((M // vec + _THREADS - 1) // _THREADS,), (_THREADS,), args, stream=stream)
    for mine, theirs in ((ok, out), (vk, v), (ck, count)):  # copies back, in order on the same stream
        if mine is not theirs:
            theirs.copy_(mine)
    return out
