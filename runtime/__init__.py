"""Runtime: the stateful modules a converted graph calls, and the backends that run neuron dynamics.

Backends share one signature (see torch_backend.multistep). 'torch' runs anywhere, torch ops only (the
reference); 'cupy' runs fused CUDA kernels on CUDA tensors. 'auto' picks cupy for CUDA tensors when it works,
and on the CPU the fused C kernel (cpu_kernel.py, taken by the neuron module itself) where it compiled, else torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from snnconv.errors import ConversionError
from snnconv.runtime import torch_backend
from snnconv.runtime.lazy import Lazy
from snnconv.settings import BACKENDS

Backend = Callable[..., torch.Tensor]


def _load_cupy() -> Backend:
    from snnconv.runtime import cupy_backend

    cupy_backend.check_available()
    return cupy_backend.multistep


CUPY = Lazy(_load_cupy)  # None where CuPy cannot run: 'auto' stays quiet and 'cupy' explains (CUPY.why)


def get_backend(name: str, device: torch.device) -> Backend:
    """The neuron backend for tensors on `device`; `name` is 'auto', 'torch' or 'cupy'."""
    if name == "torch":
        return torch_backend.multistep
    if name == "auto":
        if device.type == "cuda" and CUPY.get() is not None:
            return CUPY.value
        return torch_backend.multistep
    if name == "cupy":
        if device.type != "cuda":
            raise ConversionError(
                f"backend 'cupy' runs CUDA tensors only, got a tensor on {device}; "
                "move the model and input with .cuda() or use backend='torch'"
            )
        if CUPY.get() is None:
            raise ConversionError(
                f"backend 'cupy' cannot run here ({CUPY.why}); install the "
                "extra with `pip install snnconv[cuda]` (cupy-cuda12x) on a machine with "
                "an NVIDIA driver, or use backend='torch'"
            )
        return CUPY.value
    raise ConversionError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
