"""CuPy backend: the fused CUDA neuron kernel (kernels/neuron.cu), compiled by NVRTC at first use and
cached per variant. Torch tensors are passed by data pointer, zero-copy, on torch's current stream."""

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


def _kernel(dtype: str, vec: int, static: bool, soft: bool, leak: bool, count: bool):
    key = (cp.cuda.runtime.getDevice(), dtype, vec, static, soft, leak, count)
    if key not in _kernels:
        dev = key[0]
        if dev not in _modules:  # one module per device holds every variant, compiled together
            names = [kernel_source.name(*v) for v in kernel_source.all_variants()]
            _modules[dev] = cp.RawModule(
                code=kernel_source.SOURCE.read_text(), options=("-std=c++17",), name_expressions=names
            )
        _kernels[key] = _modules[dev].get_function(kernel_source.name(dtype, vec, static, soft, leak, count))
    return _kernels[key]


def _external_stream(ts: torch.cuda.Stream):
    """torch's current stream as a CuPy stream (no copy, no sync)."""
    if hasattr(ts, "__cuda_stream__") and hasattr(cp.cuda.Stream, "from_external"):
        return cp.cuda.Stream.from_external(ts)
    with warnings.catch_warnings():  # ExternalStream is deprecated in newer CuPy, the only way in older
        warnings.simplefilter("ignore", DeprecationWarning)
        return cp.cuda.ExternalStream(ts.cuda_stream)


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
) -> torch.Tensor:
    """Same contract as torch_backend.multistep; `count` (float32, shape of v) accumulates spike counts."""
    if x.dtype not in _DTYPES or v.dtype != torch.float32 or not v.is_contiguous():
        return torch_backend.multistep(
            x, v, theta, steps=steps, static=static, soft_reset=soft_reset, v_reset=v_reset, decay=decay, out=out
        )
    x = x.contiguous()
    th = theta.detach().to(device=v.device, dtype=torch.float32).contiguous().view(-1)
    M, C = v.numel(), th.numel()
    inner = M // (v.shape[0] * C) if C > 1 else 1
    ptrs = [t.data_ptr() for t in (x, out, v) + ((count,) if count is not None else ())]
    vec = 4 if M % 4 == 0 and all(p % 16 == 0 for p in ptrs) else 1
    with cp.cuda.Device(v.device.index):
        kern = _kernel(_DTYPES[x.dtype], vec, static, soft_reset, decay != 1.0, count is not None)
        stream = _external_stream(torch.cuda.current_stream(v.device))
        args = (
            x.data_ptr(),
            out.data_ptr(),
            v.data_ptr(),
            th.data_ptr(),
            count.data_ptr() if count is not None else 0,
            cp.int64(M),
            cp.int32(steps),
            cp.int32(C),
            cp.int64(inner),
            cp.float32(v_reset),
            cp.float32(decay),
        )
        kern(((M // vec + _THREADS - 1) // _THREADS,), (_THREADS,), args, stream=stream)
    return out
