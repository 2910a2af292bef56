"""Calibration: run the prepared graph as the ANN, observe each neuron's activation, pick thresholds.

Like quantize_fx's observers: a `Stats` object hangs on every Neuron while calibration data flows.
Thresholds are the activation's max or a high percentile (robust to rare outliers), per layer or per
channel, capped by the activation's own clip (ReLU6 -> 6).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch
from tqdm import tqdm

from snnconv import distributed
from snnconv.errors import ConversionError
from snnconv.runtime.context import current
from snnconv.runtime.modules import Neuron

BIAS_BUDGET_MB = 2048  # bias calibration: activations of one sub-batch over T steps, when no memory_budget_mb


def by_channel(y: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """[N, C, ...] -> [C, N * ...]: one row per channel (`dim`); a tensor without channels is one row."""
    return y.movedim(dim, 0).reshape(y.shape[dim], -1) if y.dim() > 1 else y.reshape(1, -1)


def observed(neuron: Neuron, observer):
    """What an observer of `neuron` sees: its ANN activation, in magnitude for a two-sided neuron (its threshold
    bounds |x|)."""
    return (lambda y: observer(y.abs())) if neuron.two_sided else observer


class Stats:
    """One neuron layer's observer: the max, and the exact percentile of every value seen (torch.quantile's
    linear interpolation over all batches, per channel or per layer) from the largest values kept per row
    (snnconv.distributed.Tail). Under torch.distributed `merge` all-reduces the max and
    gathers every rank's kept values, so N ranks give what one process gives on the union of their data.
    Rows the kept values cannot decide (see Tail) take the merged histogram's estimate
    (snnconv.distributed.Histogram: within one bin, < 2 * max / 1024, of the exact percentile)."""

    def __init__(self, per_channel: bool, q: float, channel_dim: int = 1):
        self.per_channel, self.q, self.channel_dim = per_channel, q, channel_dim
        self.max: torch.Tensor | None = None
        self.tail: distributed.Tail | None = None
        self.histogram: distributed.Histogram | None = None

    def __call__(self, y: torch.Tensor) -> None:
        y = y.detach().float()
        flat = by_channel(y, self.channel_dim) if self.per_channel else y.reshape(1, -1)
        m = flat.amax(dim=1)
        self.max = m if self.max is None else torch.maximum(self.max, m)
        if self.tail is None:
            self.tail = distributed.Tail(len(flat), self.q, device=flat.device)
            self.histogram = distributed.Histogram(len(flat), device=flat.device)
        self.tail.add(flat)
        self.histogram.add(flat, m)

    def merge(self) -> None:
        """Combine every rank's observations (collective: all ranks call it, in the same order)."""
        self.max = distributed.all_reduce(self.max, "max")
        if self.tail is not None:
            self.tail.merge_across_ranks()
            self.histogram.merge_across_ranks()

    def threshold(self, method: str) -> torch.Tensor:
        if method == "max":
            value = self.max
        else:
            value = self.tail.quantile(self.q).to(self.max)
            if value.isnan().any():
                value = torch.where(value.isnan(), self.histogram.quantile(self.q).to(self.max), value)
            value = torch.minimum(value, self.max)
        return value if self.per_channel else value.reshape(())


def batches(calib, limit: int | None) -> Iterator[torch.Tensor]:
    """Calibration inputs from a tensor [M, ...], an iterable of tensors, or a loader yielding (x, y, ...)."""
    if isinstance(calib, torch.Tensor):
        source: Iterable = calib.split(128)
    elif isinstance(calib, Iterable):
        source = distributed.without_padding(calib)  # under torch.distributed: each sample counted once
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


def _observe(gm, calib, limit: int | None, neurons: list[Neuron], observers: list, check=None) -> int:
    """Run the prepared graph as the ANN over the calibration data with `observers[i]` on `neurons[i]`;
    `check(y)` validates the output against the ANN on the first batch. Returns the number of batches."""
    for n, obs in zip(neurons, observers):
        n.observer = observed(n, obs)
    seen = 0
    try:
        with torch.no_grad():
            hide = not sys.stderr.isatty() or not distributed.is_main()  # a bar on rank 0's terminal only
            for x in tqdm(batches(calib, limit), desc="calibration", unit="batch", disable=hide, leave=False):
                try:
                    y = gm(x)
                except Exception as exc:
                    raise ConversionError(
                        f"the converted graph fails on calibration batch {seen} of shape {tuple(x.shape)}: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]} (if the model itself runs on "
                        "this input, this is an snnconv bug: please report it with `snnconv inspect`)"
                    ) from exc
                if seen == 0 and check is not None:
                    check(y)
                seen += 1
    finally:
        for n in neurons:
            n.observer = None
    return seen


def calibrate(gm, settings, calib, limit: int | None, check) -> None:
    """Observe every Neuron over the calibration data and set its threshold. `check(y)` validates the
    prepared graph's output against the ANN on the first batch. Method 'search' then makes a second pass
    (ClipError) and picks, per channel, the threshold below the percentile one whose T-step rate code
    reproduces the activations best."""
    neurons = [m for m in gm.modules() if isinstance(m, Neuron)]
    q = settings.percentile / 100.0
    merged = distributed.active()
    observers = [Stats(settings.per_channel, q, n.channel_dim) for n in neurons]
    seen = _observe(gm, calib, limit, neurons, observers, check)
    if merged:  # every rank must have data: an empty shard would leave its observers without a shape
        if distributed.all_reduce(torch.tensor(float(seen == 0)), "max").item():
            raise ConversionError(
                "calibration data is empty on at least one rank: give every rank a shard (a DistributedSampler "
                "over at least as many samples as ranks)"
            )
        for stats in observers:
            stats.merge()
    if seen == 0:
        raise ConversionError(
            "calibration data is empty: pass calib= a tensor or DataLoader of inputs "
            "(a few hundred training samples), or threshold=<float> for a data-free "
            "conversion"
        )
    search = settings.threshold_method == "search"
    tops = []
    for n, stats in zip(neurons, observers):
        th = stats.threshold("max" if settings.threshold_method == "max" else "percentile")
        tops.append(th.clamp(max=n.clip) if n.clip is not None else th)
    if search:
        errors = [ClipError(top, settings.per_channel, n.channel_dim) for n, top in zip(neurons, tops)]
        _observe(gm, calib, limit, neurons, errors)
        levels = settings.T * settings.neuron.max_spikes
        tops = [err.best_threshold(levels, settings.neuron.v_init) for err in errors]
    for n, th in zip(neurons, tops):
        if n.fixed:
            continue
        if not n.two_sided:  # two-sided neurons fire single spikes
            th = th / settings.neuron.max_spikes  # burst neurons: the same range, k times finer steps
        n.threshold = torch.where(th > 0, th, torch.ones_like(th))


# candidate thresholds / the percentile one; below half the percentile, clipping cost more accuracy than the
# finer steps gained on the MNIST VGG (T = 4: 98.27% with a floor of 0.2, 98.42% with 0.5, ANN 98.58%)
SEARCH_SCALES = torch.linspace(0.5, 1.0, 21, dtype=torch.float64)


class ClipError:
    """Threshold search (after the activation-quantisation view of conversion, Li et al. 2021): a neuron
    that integrates a constant input a for T steps from v_init * theta emits
    q(a) = theta / L * clamp(floor(a * L / theta + v_init), 0, L) on average, L = T (times max_spikes), a
    clipped L-level quantiser. A lower theta clips more but quantises finer; at small T the best theta is
    well below the percentile. Per row (channel): a histogram of a / R over [0, 1), R the percentile
    threshold, plus the count, sum and sum of squares of a / R >= 1 (clipped by any theta <= R), from
    which the squared error of every candidate theta is summed exactly up to the bin width (R / bins)."""

    def __init__(self, top: torch.Tensor, per_channel: bool, channel_dim: int = 1, bins: int = 1024):
        self.top, self.per_channel, self.channel_dim, self.bins = (
            top.double().reshape(-1),
            per_channel,
            channel_dim,
            bins,
        )
        self.counts = torch.zeros(len(self.top), bins, dtype=torch.float64)
        self.over = torch.zeros(3, len(self.top), dtype=torch.float64)  # count, sum, sum of squares above R

    def __call__(self, y: torch.Tensor) -> None:
        flat = by_channel(y.detach(), self.channel_dim) if self.per_channel else y.detach().reshape(1, -1)
        scale = torch.where(self.top > 0, 1 / self.top, torch.zeros_like(self.top)).to(flat.device, torch.float32)
        a = flat.float() * scale.unsqueeze(1)  # in units of R
        idx = (a * self.bins).long().clamp_(0, self.bins)  # bin `bins`: a >= 1, clipped by every candidate
        above = idx == self.bins
        a = a * above
        sums = [above.sum(1, dtype=torch.float64), a.sum(1, dtype=torch.float64), (a * a).sum(1, dtype=torch.float64)]
        self.over += torch.stack(sums).cpu()
        idx += torch.arange(len(a), device=a.device).unsqueeze(1) * (self.bins + 1)
        counts = torch.bincount(idx.flatten(), minlength=len(a) * (self.bins + 1)).view(len(a), -1)
        self.counts += counts[:, : self.bins].cpu()

    def best_threshold(self, levels: int, v_init: float) -> torch.Tensor:
        """Per row: the candidate theta (SEARCH_SCALES * R) with the least summed squared error."""
        counts, over = distributed.all_reduce(self.counts), distributed.all_reduce(self.over)
        centres = (torch.arange(self.bins, dtype=torch.float64) + 0.5) / self.bins
        errors = []
        for s in SEARCH_SCALES.tolist():
            q = s / levels * torch.clamp(torch.floor(centres * levels / s + v_init), 0, levels)
            inside = (counts * (q - centres) ** 2).sum(1)
            clipped = over[2] - 2 * s * over[1] + s * s * over[0]  # sum of (a - s)^2 over a >= 1 >= s
            errors.append(inside + clipped)
        best = SEARCH_SCALES[torch.stack(errors).argmin(0)]
        th = (best * self.top).float()
        return th if self.per_channel else th.reshape(())


def _channel_sums(t: torch.Tensor, channel_dim: int = 1) -> tuple[torch.Tensor, int]:
    """Per-channel sums in float64, summed without a float64 copy of t, and the count per channel."""
    if t.dim() < 2:
        return t.sum(dtype=torch.float64).reshape(1), t.numel()
    c = channel_dim % t.dim()
    dims = [d for d in range(t.dim()) if d != c]
    return t.sum(dim=dims, dtype=torch.float64), t.numel() // t.shape[c]


def calibrate_bias(snn, calib, limit: int | None, budget_mb: float = BIAS_BUDGET_MB) -> None:
    """Bias calibration (after Li et al., ICML 2021): layer by layer, in graph order, shift each neuron's
    input current by the per-channel gap between the ANN's mean activation and the SNN's mean output, so
    errors do not pile up with depth. The shift lives in the neuron (outside the state_dict).

    One SNN pass per calibration sub-batch does every layer: the graph runs layer by layer over all T
    steps, so when a neuron layer runs, every layer before it already has its correction; a hook measures
    the gap, corrects the bias and reruns that layer before anything downstream reads it. Memory: the
    batches stream, split into sub-batches whose T steps of activations fit `budget_mb` (or the model's
    memory_budget_mb); the estimate from sub-batch k moves the bias by 1/k of its gap (a running mean).
    Under torch.distributed every rank runs all ranks' bias batches (gathered, rank by rank in turn), so
    every rank computes the same biases, those of one process given the batches in that order."""
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
        (a, count), (s, c) = ann[n], _channel_sums(out, n.channel_dim)
        gap = (a / count - s / c).float() / k
        gap = gap if gap.numel() > 1 else gap.reshape(())
        n.bias = gap if n.bias is None else n.bias + gap
        n.forget(current())  # rerun the layer from its initial state with the corrected current
        return n.forward(*inputs)  # the input current, and the residual where a pass made it the second input

    chunk, settings.chunk = settings.chunk, snn.T  # one call covers all T steps (the hook needs them all)
    try:
        with torch.no_grad():
            for x in distributed.everyones(batches(calib, limit)):  # every rank: all ranks' batches
                for xs in x.split(sub):
                    for n in order:  # this sub-batch's ANN activations, per channel
                        n.observer = lambda y, n=n: ann.__setitem__(n, _channel_sums(y, n.channel_dim))
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
