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
from snnconv.runtime.modules import Neuron

_SAMPLE = 1 << 18  # values per batch and channel-set fed to quantile (torch.quantile caps input size)


def by_channel(y: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [C, N * ...]: one row per channel (dim 1); a tensor without channels is one row."""
    return y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() > 1 else y.reshape(1, -1)


class Stats:
    """One neuron layer's observer. Under torch.distributed (`merged=True`) the percentile comes from
    per-channel histograms that merge exactly across ranks (snnconv.distributed.Histogram: within one bin,
    < 2 * max / 1024, of the exact percentile of all ranks' values); the max is all-reduced."""

    def __init__(self, per_channel: bool, q: float, merged: bool = False):
        self.per_channel, self.q, self.merged = per_channel, q, merged
        self.max: torch.Tensor | None = None
        self.quantiles: list[torch.Tensor] = []
        self.histogram: distributed.Histogram | None = None

    def __call__(self, y: torch.Tensor) -> None:
        y = y.detach().float()
        flat = by_channel(y) if self.per_channel else y.reshape(1, -1)
        m = flat.amax(dim=1)
        self.max = m if self.max is None else torch.maximum(self.max, m)
        if self.merged:
            if self.histogram is None:
                self.histogram = distributed.Histogram(len(flat), device=flat.device)
            self.histogram.add(flat)
            return
        if flat.shape[1] > _SAMPLE:  # the max sees every value; the quantile a random sample
            flat = flat[:, torch.randint(flat.shape[1], (_SAMPLE,), device=flat.device)]
        self.quantiles.append(torch.quantile(flat, self.q, dim=1))

    def merge(self) -> None:
        """Combine every rank's observations (collective: all ranks call it, in the same order)."""
        self.max = distributed.all_reduce(self.max, "max")
        if self.histogram is not None:
            self.histogram.merge_across_ranks()

    def threshold(self, method: str) -> torch.Tensor:
        if method == "max":
            value = self.max
        elif self.histogram is not None:
            value = torch.minimum(self.histogram.quantile(self.q).to(self.max), self.max)
        else:
            value = torch.stack(self.quantiles).mean(0)
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


def calibrate(gm, settings, calib, limit: int | None, check) -> None:
    """Observe every Neuron over the calibration data and set its threshold. `check(y)` validates the
    prepared graph's output against the ANN on the first batch."""
    neurons = [m for m in gm.modules() if isinstance(m, Neuron)]
    q = settings.percentile / 100.0
    merged = distributed.active()
    for n in neurons:
        n.observer = Stats(settings.per_channel, q, merged)
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
                if seen == 0:
                    check(y)
                seen += 1
    finally:
        observers = [n.observer for n in neurons]
        for n in neurons:
            n.observer = None
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
    for n, stats in zip(neurons, observers):
        if n.fixed:
            continue
        th = stats.threshold(settings.threshold_method)
        if n.clip is not None:
            th = th.clamp(max=n.clip)
        th = th / settings.neuron.max_spikes  # burst neurons: the same range, k times finer steps
        n.threshold = torch.where(th > 0, th, torch.ones_like(th))


class ChannelMean:
    """Per-channel mean as sum and count: exact over any batching, time chunking or split over ranks."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def __call__(self, t: torch.Tensor) -> None:
        rows = by_channel(t.detach().double())
        self.sum, self.count = self.sum + rows.sum(1), self.count + rows.shape[1]

    def value(self) -> torch.Tensor:
        total = distributed.all_reduce(torch.cat([self.sum.cpu(), torch.tensor([float(self.count)])]))
        return total[:-1] / total[-1]


def calibrate_bias(snn, calib, limit: int | None, iterations: int = 1) -> None:
    """Bias calibration (after Li et al., ICML 2021): layer by layer, in graph order, shift each neuron's
    input current by the per-channel gap between the ANN's mean activation and the SNN's mean output, so
    errors do not pile up with depth. The shift lives in the neuron (outside the state_dict)."""
    gm = snn.graph_module
    order = [
        gm.get_submodule(n.target)
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Neuron)
    ]
    xs = list(batches(calib, limit))

    with torch.no_grad():
        ann_means = {n: ChannelMean() for n in order}
        for n in order:  # the ANN's mean activation of each neuron layer, per channel
            n.observer = ann_means[n]
        for x in xs:
            gm(x)
        for n in order:
            n.observer = None
        ann_means = {n: v.value() for n, v in ann_means.items()}
        for _ in range(iterations):
            for n in order:
                seen = ChannelMean()
                hook = n.register_forward_hook(lambda m, i, o, seen=seen: seen(o))
                for x in xs:
                    snn(x)
                hook.remove()
                gap = (ann_means[n] - seen.value()).float()
                gap = gap if gap.numel() > 1 else gap.reshape(())
                n.bias = gap if n.bias is None else n.bias + gap
