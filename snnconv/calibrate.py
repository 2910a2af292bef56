"""Calibration: run the prepared graph as the ANN, observe each neuron's activation, pick thresholds.

Like quantize_fx's observers: a `Stats` object hangs on every Neuron while calibration data flows.
Thresholds are the activation's max or a high percentile (robust to rare outliers), per layer or per
channel, capped by the activation's own clip (ReLU6 -> 6).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from snnconv.errors import ConversionError
from snnconv.runtime.context import current
from snnconv.runtime.modules import Neuron

_SAMPLE = 1 << 18  # values per batch and channel-set fed to quantile (torch.quantile caps input size)
BIAS_BUDGET_MB = 2048  # bias calibration: activations of one sub-batch over T steps, when no memory_budget_mb


def by_channel(y: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [C, N * ...]: one row per channel (dim 1); a tensor without channels is one row."""
    return y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() > 1 else y.reshape(1, -1)


class Stats:
    def __init__(self, per_channel: bool, q: float):
        self.per_channel, self.q = per_channel, q
        self.max: torch.Tensor | None = None
        self.quantiles: list[torch.Tensor] = []

    def __call__(self, y: torch.Tensor) -> None:
        y = y.detach().float()
        flat = by_channel(y) if self.per_channel else y.reshape(1, -1)
        m = flat.amax(dim=1)
        self.max = m if self.max is None else torch.maximum(self.max, m)
        if flat.shape[1] > _SAMPLE:  # the max sees every value; the quantile a random sample
            flat = flat[:, torch.randint(flat.shape[1], (_SAMPLE,), device=flat.device)]
        self.quantiles.append(torch.quantile(flat, self.q, dim=1))

    def threshold(self, method: str) -> torch.Tensor:
        value = self.max if method == "max" else torch.stack(self.quantiles).mean(0)
        return value if self.per_channel else value.reshape(())


def batches(calib, limit: int | None) -> Iterator[torch.Tensor]:
    """Calibration inputs from a tensor [M, ...], an iterable of tensors, or a loader yielding (x, y, ...)."""
    if isinstance(calib, torch.Tensor):
        source: Iterable = calib.split(128)
    elif isinstance(calib, Iterable):
        source = calib
    else:
        raise ConversionError(
            f"calib must be a tensor, an iterable of tensors or a DataLoader, got {type(calib).__name__}"
        )
    for i, item in enumerate(source):
        if limit is not None and i >= limit:
            return
        x = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(x, dict):
            raise ConversionError("calibration batches that are dicts are not supported; yield x or (x, y)")
        if not isinstance(x, torch.Tensor):
            raise ConversionError(f"calibration batch {i} is a {type(x).__name__}, not a tensor")
        if x.numel() == 0:
            continue
        if not torch.isfinite(x).all():
            raise ConversionError(f"calibration batch {i} contains NaN or Inf; clean the data first")
        yield x


def calibrate(gm, settings, calib, limit: int | None, check) -> None:
    """Observe every Neuron over the calibration data and set its threshold. `check(y)` validates the
    prepared graph's output against the ANN on the first batch."""
    neurons = [m for m in gm.modules() if isinstance(m, Neuron)]
    q = settings.percentile / 100.0
    for n in neurons:
        n.observer = Stats(settings.per_channel, q)
    seen = 0
    try:
        with torch.no_grad():
            for x in batches(calib, limit):
                try:
                    y = gm(x)
                except Exception as exc:
                    raise ConversionError(
                        f"the converted graph fails on calibration batch {seen} of shape {tuple(x.shape)}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} (if the model itself runs on "
                        "this input, this is an snnconv bug: please report it with `snnconv inspect`)"
                    ) from exc
                if seen == 0:
                    check(y)
                seen += 1
    finally:
        observers = [n.observer for n in neurons]
        for n in neurons:
            n.observer = None
    if seen == 0:
        raise ConversionError(
            "calibration data is empty: pass calib= a tensor or DataLoader of inputs "
            "(a few hundred training samples), or threshold=<float> for a data-free "
            "conversion"
        )
    for n, stats in zip(neurons, observers):
        if n.fixed:
            continue
        th = stats.threshold(settings.threshold_method)
        if n.clip is not None:
            th = th.clamp(max=n.clip)
        th = th / settings.neuron.max_spikes  # burst neurons: the same range, k times finer steps
        n.threshold = torch.where(th > 0, th, torch.ones_like(th))


def _channel_sums(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-channel (dim 1) sums in float64, summed without a float64 copy of t, and the count per channel."""
    if t.dim() < 2:
        return t.sum(dtype=torch.float64).reshape(1), t.numel()
    dims = [d for d in range(t.dim()) if d != 1]
    return t.sum(dim=dims, dtype=torch.float64), t.numel() // t.shape[1]


def calibrate_bias(snn, calib, limit: int | None, budget_mb: float = BIAS_BUDGET_MB) -> None:
    """Bias calibration (after Li et al., ICML 2021): layer by layer, in graph order, shift each neuron's
    input current by the per-channel gap between the ANN's mean activation and the SNN's mean output, so
    errors do not pile up with depth. The shift lives in the neuron (outside the state_dict).

    One SNN pass per calibration sub-batch does every layer: the graph runs layer by layer over all T
    steps, so when a neuron layer runs, every layer before it already has its correction; a hook measures
    the gap, corrects the bias and reruns that layer before anything downstream reads it. Memory: the
    batches stream, split into sub-batches whose T steps of activations fit `budget_mb` (or the model's
    memory_budget_mb); the estimate from sub-batch k moves the bias by 1/k of its gap (a running mean)."""
    gm, settings = snn.graph_module, snn.settings
    order = [
        gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Neuron)
    ]
    budget = (settings.memory_budget_mb or budget_mb) * 2**20
    per_sample = max(1, settings.step_bytes_per_sample * snn.T)
    sub = max(1, int(budget // per_sample))
    ann: dict[Neuron, tuple[torch.Tensor, int]] = {}
    k = 0

    def correct(n: Neuron, inputs, out):
        (a, count), (s, c) = ann[n], _channel_sums(out)
        gap = (a / count - s / c).float() / k
        gap = gap if gap.numel() > 1 else gap.reshape(())
        n.bias = gap if n.bias is None else n.bias + gap
        current().state.pop(n, None)  # rerun the layer from its initial membrane with the corrected current
        return n.forward(inputs[0])

    chunk, settings.chunk = settings.chunk, snn.T  # one call covers all T steps (the hook needs them all)
    try:
        with torch.no_grad():
            for x in batches(calib, limit):
                for xs in x.split(sub):
                    for n in order:  # this sub-batch's ANN activations, per channel
                        n.observer = lambda y, n=n: ann.__setitem__(n, _channel_sums(y))
                    try:
                        gm(xs)
                    finally:
                        for n in order:
                            n.observer = None
                    k += 1
                    hooks = [n.register_forward_hook(correct) for n in order]
                    try:
                        snn(xs)
                    finally:
                        for h in hooks:
                            h.remove()
    finally:
        settings.chunk = chunk
