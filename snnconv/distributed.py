"""torch.distributed glue: one process per device (torchrun), each sees its shard of the data, and the
statistics that decide thresholds, bias corrections and reported numbers are merged with collectives so
that every rank ends with the same conversion. Nothing here runs unless a process group is initialised
(or `init_from_env()` finds torchrun's variables); one process is the world of size 1.

Merging rules (each exact, so N ranks give what one process gives on the union of their data):
- max: all-reduce MAX;
- sums and counts (bias-calibration means, accuracy, spikes, operations): all-reduce SUM in float64;
- percentile: each rank's largest values per channel (see `Tail`), gathered: the exact percentile of the
  union, with the per-channel histograms (see `Histogram`, counts added, bins aligned exactly) as fallback.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | None = None) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment):
    NCCL when the device is CUDA, gloo otherwise. True when a group is (now) initialised."""
    if active():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or not dist.is_available():
        return False
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def local_device(device: str) -> str:
    """cuda -> this rank's GPU (LOCAL_RANK) under torchrun; anything else unchanged."""
    if device == "cuda" and active():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of t on every rank (t itself when not distributed); t keeps its device and dtype."""
    if not active():
        return t
    buf = t.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return buf.to(t.device, t.dtype)


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's t (same shape on every rank), in rank order, on t's device; [t] when not distributed."""
    if not active():
        return [t]
    buf = t.detach().to(_comm_device(), copy=True)
    out = [torch.empty_like(buf) for _ in range(world())]
    dist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


class Histogram:
    """Per-row (channel) histograms of non-negative values, row r over [0, R_r) in `bins` bins, R_r a power of
    two that doubles (merging bin pairs) as larger values arrive. Because R_r and `bins` are powers of two, a
    value falls in the same bin whichever R_r it was first counted under, so histograms from any split of the
    data merge into exactly the histogram of the union. A quantile read from it is within one bin,
    R_r / bins < 2 * max_r / bins, of the exact quantile of the row's values (torch.quantile's definition)."""

    def __init__(self, rows: int, bins: int = 1024, device=None):
        if bins & (bins - 1):
            raise ValueError(f"bins must be a power of two, got {bins}")
        self.bins, self.log2_bins = bins, bins.bit_length() - 1
        self.counts = torch.zeros(rows, bins, dtype=torch.int64, device=device)
        # R_r = 2 ** log2_range[r], grown with the data; the floor keeps float32 scales finite
        self.log2_range = torch.full((rows,), -60, dtype=torch.int64, device=device)

    def _grow(self, log2_range: torch.Tensor) -> None:
        """Widen each row's range to at least 2 ** log2_range[r], merging 2^k bins into one."""
        log2_range = torch.maximum(self.log2_range, log2_range.to(self.log2_range))
        ks = (log2_range - self.log2_range).clamp(max=self.log2_bins)
        for k in ks.unique().tolist():
            if k == 0:
                continue
            rows = (ks == k).nonzero().squeeze(1)
            merged = self.counts[rows].view(len(rows), self.bins >> k, 1 << k).sum(2)
            self.counts[rows] = torch.cat([merged, merged.new_zeros(len(rows), self.bins - merged.shape[1])], 1)
        self.log2_range = log2_range

    def add(self, rows: torch.Tensor, top: torch.Tensor | None = None) -> None:
        """rows: [rows, M] non-negative values (negative ones count as 0); top: their row maxima, if known."""
        top = (rows.amax(1) if top is None else top).double()
        e = torch.frexp(top.clamp(min=2.0**-70)).exponent.long()  # top = m * 2^e, 0.5 <= m < 1: top < 2^e
        self._grow(e)
        scale = torch.ldexp(torch.ones(len(rows), device=rows.device), (self.log2_bins - self.log2_range).float())
        # exact (scale = 2^k); int32 truncation is the floor of the clamped value, with half int64's traffic
        idx = (rows.float() * scale.unsqueeze(1)).clamp_(0, self.bins - 1).int()
        idx += torch.arange(0, len(rows) * self.bins, self.bins, device=rows.device, dtype=torch.int32).unsqueeze(1)
        ones = self.counts.new_ones(1).expand(idx.numel())  # index_add_, unlike bincount, needs no min/max pass
        self.counts.view(-1).index_add_(0, idx.flatten(), ones)

    def merge_across_ranks(self) -> None:
        if not active():
            return
        self._grow(all_reduce(self.log2_range, "max"))
        self.counts = all_reduce(self.counts, "sum")

    @property
    def bin_width(self) -> torch.Tensor:
        """Per row: the width of one bin, the bound on a quantile's error."""
        return torch.ldexp(torch.ones(len(self.counts), dtype=torch.float64), (self.log2_range - self.log2_bins).cpu())

    def quantile(self, q: float) -> torch.Tensor:
        """Per row: the q-quantile (position q * (n - 1) between order statistics, as torch.quantile),
        each order statistic placed inside its bin by its rank among the bin's values."""
        width = self.bin_width.to(self.counts.device)
        counts = self.counts.double()
        cum = counts.cumsum(1)
        pos = q * (cum[:, -1] - 1).clamp(min=0)

        def order_stat(j: torch.Tensor) -> torch.Tensor:
            b = torch.searchsorted(cum, (j + 0.5).unsqueeze(1)).squeeze(1).clamp(max=self.bins - 1)
            before = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
            inside = counts.gather(1, b.unsqueeze(1)).squeeze(1).clamp(min=1)
            return (b + (j - before + 0.5) / inside) * width

        lo, hi = pos.floor(), pos.ceil()
        a, b = order_stat(lo), order_stat(hi)
        return (a + (pos - lo) * (b - a)).float()


TAIL_BUDGET = 1 << 22  # values a Tail may keep per layer (16 MB); beyond, the histogram's estimate is used


class Tail:
    """Per row (channel): the largest values seen, enough for the exact q-quantile (torch.quantile's: position
    q * (n - 1) between order statistics, linearly interpolated) of every value added, on any number of ranks.

    The quantile needs the top K(n) = n - floor(q * (n - 1)) of n values, and n is only known at the end, so each
    rank keeps 2 * K(n_t) + 64 of the n_t values it has seen (its share of the global K is about K(n_t)), and
    the largest value it ever dropped. After gathering, the top values of the union above every rank's largest
    dropped value are exactly the union's top values, so a row whose order statistics lie there is exact;
    `quantile` returns NaN for any other row (data ordered so that a rank's large values come first, with K
    outgrowing what it kept) and for every row once the kept values would pass TAIL_BUDGET per layer."""

    def __init__(self, rows: int, q: float, device=None):
        self.q, self.n = q, 0
        self.top = torch.empty(rows, 0, device=device)  # descending
        self.dropped = torch.full((rows,), -torch.inf, device=device)  # per row, the largest value let go
        self.full = False  # over budget: nothing kept

    def needed(self, n: int) -> int:
        return n - math.floor(self.q * (n - 1)) if n else 0

    def add(self, rows: torch.Tensor) -> None:
        """rows: [rows, M]."""
        self.n += rows.shape[1]
        keep = 2 * self.needed(self.n) + 64
        if self.full or keep * len(rows) > TAIL_BUDGET:
            self.full, self.top = True, self.top[:, :0]
            return
        new = rows.float().topk(min(keep + 1, rows.shape[1]), dim=1).values
        both = torch.cat([self.top, new], 1)
        both = both.topk(min(keep + 1, both.shape[1]), dim=1).values
        if both.shape[1] > keep:
            self.dropped = torch.maximum(self.dropped, both[:, keep])
        self.top = both[:, :keep]

    def merge_across_ranks(self) -> None:
        if not active():
            return
        self.n = int(all_reduce(torch.tensor([self.n])).item())
        full, width = all_reduce(torch.tensor([int(self.full), self.top.shape[1]]), "max").tolist()
        self.full = bool(full)
        self.dropped = all_reduce(self.dropped, "max")
        padded = torch.cat([self.top, self.top.new_full((len(self.top), width - self.top.shape[1]), -torch.inf)], 1)
        self.top = torch.cat(all_gather(padded), 1).sort(1, descending=True).values
        if self.full:
            self.top = self.top[:, :0]

    def quantile(self, q: float) -> torch.Tensor:
        """Per row: the exact q-quantile of every rank's values (after merge_across_ranks), or NaN where the
        kept values do not decide it."""
        pos = q * (self.n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        first, second = self.n - 1 - lo, self.n - 1 - hi  # from the top: lo's order statistic is the deeper one
        if first >= self.top.shape[1]:
            return self.top.new_full((len(self.top),), torch.nan)
        a, b = self.top[:, first].double(), self.top[:, second].double()
        value = (a + (pos - lo) * (b - a)).float()
        return torch.where(self.top[:, first] >= self.dropped, value, torch.nan)


def shutdown() -> None:
    """Leave the process group if one is initialised (end of a torchrun command)."""
    if active():
        dist.destroy_process_group()


def without_padding(loader):
    """The items of a DataLoader, less the samples its DistributedSampler repeats to even out the shards
    (that sampler hands rank r the positions r, r + world, ... of a list padded past the data set's end).
    Any other iterable passes through unchanged."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = getattr(loader, "sampler", None) if isinstance(loader, DataLoader) else None
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        yield from loader
        return
    seen, size = 0, len(sampler.dataset)
    for item in loader:
        first = item[0] if isinstance(item, (tuple, list)) else item
        n = len(first)
        keep = sampler.rank + sampler.num_replicas * torch.arange(seen, seen + n) < size
        seen += n
        if keep.all():
            yield item
        elif keep.any():
            yield type(item)(v[keep] for v in item) if isinstance(item, (tuple, list)) else item[keep]


def everyones(items):
    """Under torch.distributed: every rank's items (tensors), gathered to every rank, in turn rank by rank
    (rank 0's first, rank 1's first, ..., rank 0's second, ...); otherwise the items themselves. For the
    few bias-calibration batches, whose iterative correction must see the same batches in the same order
    on every rank."""
    if not active():
        yield from items
        return
    mine = [t.cpu() for t in items]
    lists = [None] * world()
    dist.all_gather_object(lists, mine)
    for i in range(max(len(x) for x in lists)):
        for x in lists:
            if i < len(x):
                yield x[i]
