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

Backend = Callable[..., torch.Tensor]
_cupy_state: dict = {}


def _cupy_backend() -> Backend:
    if "fn" not in _cupy_state:
        try:
            from snnconv.runtime import cupy_backend

            cupy_backend.check_available()
            _cupy_state["fn"] = cupy_backend.multistep
        except Exception as exc:  # remember why, so 'auto' stays quiet and 'cupy' can explain
            _cupy_state["fn"], _cupy_state["why"] = None, f"{type(exc).__name__}: {exc}"
    return _cupy_state["fn"]


BACKENDS = ("auto", "torch", "cupy")


def get_backend(name: str, device: torch.device) -> Backend:
    """The neuron backend for tensors on `device`; `name` is 'auto', 'torch' or 'cupy'."""
    if name == "torch":
        return torch_backend.multistep
    if name == "auto":
        if device.type == "cuda" and _cupy_backend() is not None:
            return _cupy_state["fn"]
        return torch_backend.multistep
    if name == "cupy":
        if device.type != "cuda":
            raise ConversionError(
                f"backend 'cupy' runs CUDA tensors only, got a tensor on {device}; "
                "move the model and input with .cuda() or use backend='torch'"
            )
        if _cupy_backend() is None:
            raise ConversionError(
                f"backend 'cupy' cannot run here ({_cupy_state['why']}); install the "
                "extra with `pip install snnconv[cuda]` (cupy-cuda12x) on a machine with "
                "an NVIDIA driver, or use backend='torch'"
            )
        return _cupy_state["fn"]
    raise ConversionError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
