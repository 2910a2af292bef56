"""Vectorised torch neuron dynamics: any device, any float dtype; the reference every other backend matches.

One call runs all `steps` of a layer (layer-by-layer propagation). State `v` is updated in place, so a
later call continues where this one stopped (step-by-step propagation and time chunks reuse it).
Equations (charge, fire, reset), with H the membrane after charging:
    H[t] = decay * V[t-1] + X[t]          (IF: decay = 1)
    S[t] = H[t] >= theta
    V[t] = H[t] - theta * S[t]            (soft reset, "reset by subtraction")
    V[t] = v_reset if S[t] else H[t]      (hard reset)
The layer outputs theta * S[t]: spikes carry the threshold as their value, so the next layer sees
the ANN's activation scale without an extra multiply (threshold balancing folded into the spike).
"""

from __future__ import annotations

import torch


def multistep(x: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, *, steps: int, static: bool,
              soft_reset: bool, v_reset: float, decay: float, out: torch.Tensor) -> torch.Tensor:
    """Run `steps` steps; x is [steps, ...] or, when `static`, one [...] tensor fed at every step.

    Three in-place ops per step: out[t] holds the 0/1 spike until the end, where one multiply scales all
    steps by theta (bitwise the same as scaling each step)."""
    theta = theta.to(v.dtype)
    scalar = theta.dim() == 0
    th = theta.item() if scalar else theta
    spikes = out if out.dtype == v.dtype else torch.empty(out.shape, dtype=v.dtype, device=v.device)
    for t in range(steps):
        xt = x if static else x[t]
        if decay != 1.0:
            v.mul_(decay)
        v.add_(xt)
        st = torch.ge(v, theta, out=spikes[t])
        if not soft_reset:
            v.masked_fill_(st.bool(), v_reset)
        elif scalar:
            v.sub_(st, alpha=th)
        else:
            v.addcmul_(st, theta, value=-1)
    spikes.mul_(theta)
    if spikes is not out:
        out.copy_(spikes)
    return out


def multistep_functional(x: torch.Tensor, v: torch.Tensor, theta: torch.Tensor, *, steps: int, static: bool,
                         soft_reset: bool, v_reset: float, decay: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dynamics with out-of-place ops only: what graph capture (ONNX export, tracing) records.
    Returns (outputs [steps, ...], final membrane)."""
    theta = theta.to(v.dtype)
    outs = []
    for t in range(steps):
        h = (v * decay if decay != 1.0 else v) + (x if static else x[t])
        s = (h >= theta).to(v.dtype)
        o = s * theta
        v = h - o if soft_reset else torch.where(s > 0, torch.full_like(h, v_reset), h)
        outs.append(o.to(x.dtype))
    return torch.stack(outs), v
