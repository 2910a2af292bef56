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

from snnconv.errors import ConversionError


def count_in(count: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """The spike count to compute with: `count` itself if of `dtype` (None: any), else a `dtype` copy
    (`count_back` stores it). Any real dtype: float, or integer (the CPU kernel keeps uint8 counts); anything
    else refused."""
    if count is None:
        return None
    if count.dtype == torch.bool or count.is_complex():
        raise TypeError(f"the spike count must be a float or integer tensor, got dtype {count.dtype}")
    return count if dtype is None or count.dtype == dtype else count.to(dtype)


def count_back(count: torch.Tensor, work: torch.Tensor) -> None:
    """Store the counts computed in `work` into `count` (its own dtype). Counts an integer dtype cannot hold are
    refused, not wrapped around (checked on CPU tensors: on a GPU the check would wait for the device)."""
    if work is count:
        return
    if not count.is_floating_point() and work.device.type == "cpu" and work.numel():
        info = torch.iinfo(count.dtype)
        lo, hi = work.min().item(), work.max().item()
        if lo < info.min or hi > info.max:
            raise ConversionError(f"spike counts in [{lo:g}, {hi:g}] do not fit the count's dtype {count.dtype}")
    count.copy_(work)


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
    calls: dict | None = None,
    count: torch.Tensor | None = None,
    signed: bool = False,
    two_sided: bool = False,
) -> torch.Tensor:
    """Run `steps` steps; x is [steps, ...] or, when `static`, one [...] tensor fed at every step.
    `calls` (a dict), when given, counts this call under 'torch' (backends report which of them served).
    `count` (shape of v), updated in place: each neuron's number of spikes is added to it.

    `signed`: signed spikes (soft reset), `count` their net count so far (needed). A neuron fires +theta when
    H >= theta and -theta when H < 0 while its net count is positive, taking back an early excess; spikes stay
    binary in magnitude. Without decay this holds V in [0, theta) wherever the count is not at a bound, so the
    count after t steps is floor((sum of inputs + v_init) / theta) clipped to [0, t]: the rate code of the
    running input at every step, not only at the end.

    In-place ops only, no allocation per step (measured: the allocating form cost more than the int8 layers):
    out[t] holds the 0/1 (signed: -1/0/1) spike until the end, where one multiply scales all steps by theta
    (bitwise the same as scaling each step)."""
    if signed and ((count is None and not two_sided) or not soft_reset):
        raise ValueError("signed spikes need soft reset and their net count (count=)")
    if calls is not None:
        calls["torch"] = calls.get("torch", 0) + 1
    # signed: the net count takes part in v's arithmetic, so in v's dtype; else it is only added to
    given, count = count, count_in(count, v.dtype if signed else None)
    theta = theta.to(v.dtype)
    scalar = theta.dim() == 0
    th = theta.item() if scalar else theta
    spikes = out if out.dtype == v.dtype else torch.empty(out.shape, dtype=v.dtype, device=v.device)
    if signed:
        neg, positive = torch.empty_like(v), torch.empty_like(v)
    for t in range(steps):
        xt = x if static else x[t]
        if decay != 1.0:
            v.mul_(decay)
        v.add_(xt)
        st = torch.ge(v, theta, out=spikes[t])
        if signed and two_sided:  # fires -theta whenever V < 0: V stays in [0, theta) both ways
            st.sub_(torch.lt(v, 0, out=neg))
            if count is not None:
                count.add_(st)
        elif signed:
            torch.lt(v, 0, out=neg)
            torch.gt(count, 0, out=positive)
            st.sub_(neg.mul_(positive))
            count.add_(st)
        if not soft_reset:
            v.masked_fill_(st.bool(), v_reset)
        elif scalar:  # v - s * theta, s * theta exact: as v.sub_(s * theta)
            v.sub_(st, alpha=th)
        else:
            v.addcmul_(st, theta, value=-1)
    if count is not None and not signed:
        fired = (spikes != 0).sum(0)
        if count.is_floating_point():
            count += fired
        else:  # an integer count: added without wrapping around
            count_back(count, count + fired)
    elif signed and count is not None:
        count_back(given, count)
    spikes.mul_(theta)
    if spikes is not out:
        out.copy_(spikes)
    return out


def multistep_burst(
    x: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    *,
    steps: int,
    static: bool,
    soft_reset: bool,
    v_reset: float,
    decay: float,
    max_spikes: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Burst (multi-threshold) neurons: up to `max_spikes` spikes per step, S[t] = clamp(floor(H/theta),
    0, max_spikes); the output theta * S[t] is not binary. Soft reset subtracts theta * S[t]."""
    theta = theta.to(v.dtype)
    for t in range(steps):
        if decay != 1.0:
            v.mul_(decay)
        v.add_(x if static else x[t])
        count = torch.div(v, theta).floor_().clamp_(0, max_spikes)
        spikes = count * theta
        if soft_reset:
            v.sub_(spikes)
        else:
            v.masked_fill_(count > 0, v_reset)
        out[t].copy_(spikes)
    return out


def multistep_functional(
    x: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    *,
    steps: int,
    static: bool,
    soft_reset: bool,
    v_reset: float,
    decay: float,
    max_spikes: int = 1,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dynamics with out-of-place ops only: what graph capture (ONNX export, tracing) records.
    Returns (outputs [steps, ...], final membrane), and the final net count too for signed spikes (`count`
    given: the net count so far)."""
    theta = theta.to(v.dtype)
    outs = []
    for t in range(steps):
        h = (v * decay if decay != 1.0 else v) + (x if static else x[t])
        if count is not None:
            s = (h >= theta).to(v.dtype) - ((h < 0) & (count > 0)).to(v.dtype)
            count = count + s
        else:
            s = (h >= theta).to(v.dtype) if max_spikes == 1 else torch.floor(h / theta).clamp(0, max_spikes)
        o = s * theta
        v = h - o if soft_reset else torch.where(s > 0, torch.full_like(h, v_reset), h)
        outs.append(o.to(x.dtype))
    return (torch.stack(outs), v) if count is None else (torch.stack(outs), v, count)
