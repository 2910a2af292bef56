"""The modules a converted graph calls. None holds a persistent tensor, so none adds a state_dict key,
and none holds the state of a call: membranes and pooling sums live in the current `Call`
(runtime/context.py), so one graph serves the ANN (no call open: calibration), layer-by-layer runs over
any number of steps and step-by-step streaming, from any number of threads at once.
Inside the graph, tensors after the first neuron carry time folded into the batch: [steps * N, ...].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from snnconv.runtime import get_backend, torch_backend
from snnconv.runtime.context import current, reused


@dataclass
class NeuronConfig:
    kind: str = "if"  # 'if' or 'lif'
    reset: str = "soft"  # 'soft' (subtract threshold) or 'hard' (set to v_reset)
    v_reset: float = 0.0
    v_init: float = 0.5  # initial membrane, as a fraction of the threshold
    tau: float = 2.0  # LIF time constant: decay = 1 - 1/tau
    max_spikes: int = 1  # > 1: burst mode, up to this many spikes per step (outputs are not binary)

    @property
    def decay(self) -> float:
        return 1.0 - 1.0 / self.tau if self.kind == "lif" else 1.0


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Keep channels-last tensors channels-last (see passes/channels_last.py)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Neuron(nn.Module):
    """Replaces one ReLU-like activation clamp(x, 0, clip).

    ANN mode: computes the activation itself and feeds an observer (calibration).
    SNN mode: integrate-and-fire (or LIF) with threshold `threshold`, spikes valued `threshold`.
    """

    def __init__(self, config: NeuronConfig, clip: float | None = None):
        super().__init__()
        self.config, self.clip = config, clip
        self.register_buffer("threshold", torch.tensor(1.0), persistent=False)
        self.bias: torch.Tensor | None = None  # per-channel current added every step (bias calibration)
        self.levels: int | None = None  # QCFS quantisation levels of the ANN activation (snnconv.qcfs)
        self.fixed = False  # threshold given by the model (QCFS), not by calibration
        self.static_input = False  # set by the hoisting pass: input is the same at every step
        self.observer = None
        self.calls = {"kernel": 0, "torch": 0}  # SNN-mode calls served by the fused CUDA kernel / by torch

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{th.item():.4g}" if th.numel() == 1 else f"per-channel[{th.numel()}]"
        bias = "" if self.bias is None else ", calibrated bias"
        return f"{self.config.kind}, reset={self.config.reset}, threshold={th}, clip={self.clip}{bias}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = current()
        if call is None:  # the ANN
            if self.levels is not None:
                y = torch.clamp(torch.floor(x * (self.levels / self.clip) + 0.5) / self.levels, 0, 1) * self.clip
            else:
                y = torch.clamp(x, 0, self.clip) if self.clip is not None else torch.relu(x)
            if self.observer is not None:
                self.observer(y)
            return y
        steps = call.steps
        static = self.static_input and call.input_static
        if self.bias is not None:  # calibrated correction of the input current (bias calibration)
            b = self.bias.to(x.device, x.dtype)
            x = x + (b.view(-1, *([1] * (x.dim() - 2))) if b.dim() > 0 else b)
        shape = x.shape if static else (x.shape[0] // steps, *x.shape[1:])
        x_in = x if static else x.reshape(steps, *shape)
        theta = self.threshold
        if theta.device != x.device:
            self.threshold = theta = theta.to(x.device)
        if theta.dim() > 0:  # per-channel: [C] -> broadcast over the channel dim (dim 1 of [N, C, ...])
            theta = theta.view(-1, *([1] * (len(shape) - 2)))
        fmt = _memory_format(x)
        v = call.state.get(self)  # the membrane, carried over from the call's previous chunk or step
        if v is None or v.shape != shape:
            state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            v = (self.config.v_init * theta.to(state_dtype)).expand(shape).contiguous(memory_format=fmt)
        call.state[self] = v
        cfg = self.config
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # graph capture: no reused buffers
            out, call.state[self] = torch_backend.multistep_functional(
                x_in,
                v,
                theta,
                steps=steps,
                static=static,
                soft_reset=cfg.reset == "soft",
                v_reset=cfg.v_reset,
                decay=cfg.decay,
                max_spikes=cfg.max_spikes,
            )
            return out.reshape(steps * shape[0], *shape[1:])
        # reused per thread (SpikingModel copies anything it hands out); the backends update v in place
        out = reused(self, (steps * shape[0], *shape[1:]), x.dtype, x.device, fmt).view(steps, *shape)
        if cfg.max_spikes > 1:  # burst neurons: torch backend only
            self.calls["torch"] += 1
            torch_backend.multistep_burst(
                x_in,
                v,
                theta,
                steps=steps,
                static=static,
                soft_reset=cfg.reset == "soft",
                v_reset=cfg.v_reset,
                decay=cfg.decay,
                max_spikes=cfg.max_spikes,
                out=out,
            )
            return out.view(steps * shape[0], *shape[1:])
        get_backend(call.backend, x.device)(
            x_in,
            v,
            theta,
            steps=steps,
            static=static,
            soft_reset=cfg.reset == "soft",
            v_reset=cfg.v_reset,
            decay=cfg.decay,
            out=out,
            calls=self.calls,
        )
        return out.view(steps * shape[0], *shape[1:])


class SpikeMaxPool(nn.Module):
    """Max pooling placed on the analog input of a neuron (the prepare pass moves it there).

    On an input that is the same at every step it is plain max pooling. On a time-varying input the max
    of per-step values over-estimates the max of their averages, so it pools the running sum instead and
    emits its increment: out[t] = maxpool(sum x[:t+1]) - maxpool(sum x[:t]). The outputs up to any step
    then sum to exactly the max pool of the inputs' sum, the ANN's max of the average input.
    """

    def __init__(self, pool_kwargs: dict, dims: int):
        super().__init__()
        self.pool_kwargs, self.dims = pool_kwargs, dims
        self.static_input = False

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.pool_kwargs.items())

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.dims - 1]
        return fn(x, **self.pool_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = current()
        if call is None or (self.static_input and call.input_static):
            return self._pool(x)
        steps = call.steps
        xs = x.reshape(steps, x.shape[0] // steps, *x.shape[1:])
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        acc = torch.cumsum(xs.to(dtype), 0, out=torch.empty_like(xs, dtype=dtype))  # all running sums, one op
        # (running sum, its max pool) up to the call's previous chunk or step
        last_acc, last_pooled = call.state.get(self, (None, None))
        if last_acc is not None:
            acc += last_acc
        pooled = self._pool(acc.flatten(0, 1)).unflatten(0, (steps, xs.shape[1]))
        prev = last_pooled if last_pooled is not None else torch.zeros_like(pooled[0])
        out = torch.diff(pooled, dim=0, prepend=prev.unsqueeze(0))
        call.state[self] = (acc[-1], pooled[-1])
        return out.flatten(0, 1).to(x.dtype)


class TimeBroadcast(nn.Module):
    """Turns a step-invariant [N, ...] tensor into [steps * N, ...] where it meets time-varying ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = current()
        if call is None or not call.input_static or call.steps == 1:
            return x
        return x.unsqueeze(0).expand(call.steps, *x.shape).reshape(-1, *x.shape[1:])
