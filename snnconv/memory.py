"""How many time steps one layer-by-layer pass holds at once (the time chunk), chosen from the memory there
is: `chunk` if the user set it; else the largest chunk whose activations fit `memory_budget_mb`; else the
largest that fits both a share of the memory available now (MemAvailable on CPU, the device's free memory
on CUDA) and a fixed cap. The cap is where folding more steps into the batch stops paying: past a few
hundred MiB per pass the ops are long enough that running them once per chunk costs nothing measurable
(benchmarks/results/auto_chunk.txt), while the memory grows with every step.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch

from snnconv.errors import ConversionError

AVAILABLE_SHARE = 0.5  # of the memory available now: the rest for the model, data, loaders, other processes
CAP_BYTES = 1 << 30  # one chunk's activations at most this large when nothing else is set


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new allocation can take now: free device memory on CUDA, MemAvailable (psutil or
    /proc/meminfo) on CPU; None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class ChunkPlan:
    chunk: int
    T: int
    batch: int
    bytes_per_step: int  # activations of one step at this batch (0: not measured)
    why: str

    def __str__(self) -> str:
        per_step = f"{self.bytes_per_step / 2**20:.1f} MiB of activations per step" if self.bytes_per_step else ""
        return f"time chunk {self.chunk} of T={self.T} steps at batch {self.batch} ({self.why}; {per_step})".replace(
            "; )", ")"
        )


def plan_chunk(settings, T: int, n: int, device: str | torch.device = "cpu") -> ChunkPlan:
    """The time chunk for T steps of a batch of n samples on `device`."""
    step = settings.step_bytes_per_sample * n
    if settings.chunk:
        return ChunkPlan(min(settings.chunk, T), T, n, step, "chunk set")
    if not step:  # not measured (a checkpoint from before the measurement): all steps at once
        return ChunkPlan(T, T, n, step, "activation size unknown")
    if settings.memory_budget_mb:
        budget, why = settings.memory_budget_mb * 2**20, f"memory_budget_mb={settings.memory_budget_mb:g}"
    else:
        free = available_bytes(device)
        budget = CAP_BYTES if free is None else min(CAP_BYTES, AVAILABLE_SHARE * free)
        why = (
            f"auto: min({CAP_BYTES >> 20} MiB, {AVAILABLE_SHARE:g} x {free / 2**20:.0f} MiB available)"
            if free is not None
            else f"auto: {CAP_BYTES >> 20} MiB cap"
        )
    return ChunkPlan(max(1, min(T, int(budget // step))), T, n, step, why)


def run_bytes(settings, T: int, n: int, outputs_per_sample: int, device: str | torch.device = "cpu"):
    """(the time plan, bytes held at once) for T steps of a batch of n samples: one time chunk's activations,
    and the batch's per-step outputs over all T (kept, joined across chunks, and their running sums)."""
    plan = plan_chunk(settings, T, n, device)
    return plan, plan.chunk * plan.bytes_per_step + 3 * T * n * outputs_per_sample * 4


def machine_bytes(device: str | torch.device = "cpu") -> int | None:
    """The most one process could ever hold: physical memory on CPU, the device's memory on CUDA; None when
    unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, what: str, device: str | torch.device = "cpu", fix: str = "") -> None:
    """Refuse, before allocating, `need` bytes that would not fit in this machine's (or device's) memory."""
    have = machine_bytes(device)
    if have is not None and need > have:
        where = "this machine's" if torch.device(device).type == "cpu" else f"{device}'s"
        raise ConversionError(
            f"{what} needs {need / 2**30:.3g} GiB, more than {where} {have / 2**30:.3g} GiB"
            + (f"; {fix}" if fix else "")
        )


def peak_bytes(device: str | torch.device = "cpu") -> int:
    """This process's peak memory so far: resident set on CPU (ru_maxrss), allocated memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
