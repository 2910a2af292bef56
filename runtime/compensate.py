"""Expectation compensation: an op an IF neuron cannot represent (GELU, softmax, LayerNorm, a product of two
time-varying tensors) runs on the running mean of its inputs and emits, per step, the increment that keeps the
mean of its outputs exact. For an op f of inputs x_1..x_k and every step t >= 1:

    sum_{s <= t} y_s = t * f(m_1(t), ..., m_k(t)),   m_i(t) = (1/t) sum_{s <= t} x_i,s

The graph keeps f itself (the ANN's own node, module and parameters); `RunningMean` sits on each input and
`RunningDiff` on the output (passes/compensate.py). With no call open (the ANN, calibration) both pass values
through. Their state (running sum, steps seen, last cumulative output) lives in the call like a membrane, so
time chunks, `step()`, threads and time-major inputs keep working. Sums and differences are taken in the
input's dtype (float32: within 1e-5 of a float64 reference up to T = 64, tests/test_compensate.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from snnconv.runtime.context import current


def _steps_view(x: torch.Tensor, dim: int, steps: int) -> torch.Tensor:
    """[..., steps * N, ...] with the folded batch in `dim` -> [steps, N, ...] (batch moved first)."""
    x = x.movedim(dim, 0) if dim else x
    return x.reshape(steps, x.shape[0] // steps, *x.shape[1:])


def _unfold(y: torch.Tensor, dim: int) -> torch.Tensor:
    y = y.flatten(0, 1)
    return y.movedim(0, dim) if dim else y


def _counts(t0: int, steps: int, like: torch.Tensor) -> torch.Tensor:
    """Steps seen after each step of this run, t0 + 1 ... t0 + steps, broadcast over [steps, N, ...]."""
    t = torch.arange(t0 + 1, t0 + steps + 1, dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.dim() - 1)))


class _Running(nn.Module):
    """Shared by both: where the batch lives, and whether the input is the same at every step."""

    def __init__(self, batch_dim: int = 0):
        super().__init__()
        self.batch_dim = batch_dim
        self.static_input = False  # hoist_static_input: the value is step-invariant (materialise sets it)

    def extra_repr(self) -> str:
        return f"batch_dim={self.batch_dim}"

    def _running(self):
        """The call, or None where the value passes through (the ANN; a step-invariant input)."""
        call = current()
        if call is None or (self.static_input and call.input_static):
            return None
        return call


class RunningMean(_Running):
    """x_t -> m(t) = mean of x_1..x_t, per element. State: the running sum and the steps seen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._running()
        if call is None:
            return x
        xs = _steps_view(x, self.batch_dim, call.steps)
        total, t0 = call.state.get(self, (None, 0))
        sums = torch.cumsum(xs, 0)
        if total is not None and total.shape == sums.shape[1:]:
            sums += total
        else:
            t0 = 0
        call.state[self] = (sums[-1].clone(), t0 + call.steps)
        return _unfold(sums.div_(_counts(t0, call.steps, sums)), self.batch_dim)


class RunningDiff(_Running):
    """F_t = f(means at step t) -> y_t = t * F_t - (t - 1) * F_{t-1}: the outputs summed over steps 1..t are
    t * F_t. State: the last cumulative output (t * F_t) and the steps seen."""

    def forward(self, f):
        if isinstance(f, (tuple, list)):  # ops with several outputs (attention returning its weights)
            return type(f)(self._one(v, i) for i, v in enumerate(f))
        return self._one(f, None)

    def _one(self, f, index: int | None):
        call = self._running()
        if call is None or not isinstance(f, torch.Tensor):
            return f
        dim = self.batch_dim if isinstance(self.batch_dim, int) else self.batch_dim[index]
        if dim is None:  # an output that does not carry the batch
            return f
        key = self if index is None else (self, index)
        fs = _steps_view(f, dim, call.steps)
        prev, t0 = call.state.get(key, (None, 0))
        if prev is None or prev.shape != fs.shape[1:]:
            prev, t0 = None, 0
        cum = fs * _counts(t0, call.steps, fs)
        y = torch.empty_like(cum)
        torch.sub(cum[1:], cum[:-1], out=y[1:])
        if prev is None:
            y[0] = cum[0]
        else:
            torch.sub(cum[0], prev, out=y[0])
        call.state[key] = (cum[-1].clone(), t0 + call.steps)
        return _unfold(y, dim)
