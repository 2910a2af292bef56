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
    """Run `steps` steps; x is [steps, ...] or, when `static`, one [...] tensor fed at every step."""
    theta = theta.to(v.dtype)
    same_dtype = out.dtype == v.dtype
    for t in range(steps):
        xt = x if static else x[t]
        if decay != 1.0:
            v.mul_(decay)
        v.add_(xt)
        spike = v >= theta
        if same_dtype:
            st = torch.mul(spike, theta, out=out[t])
        else:
            st = spike * theta
            out[t].copy_(st)
        if soft_reset:
            v.sub_(st)
        else:
            v.masked_fill_(spike, v_reset)
    return out
