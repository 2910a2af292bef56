"""snnconv.evaluate: accuracy at every T up to the largest asked for (one run: the per-step outputs'
running mean), firing rates, synaptic operations and energy, streamed batch by batch from a tensor, a
Dataset or a DataLoader. Under torch.distributed each rank runs its shard (a DistributedSampler) and every
count is summed across ranks, so every rank returns what one process returns on all the data; the
sampler's padding (it repeats samples so that shards are equal) is left out.

Energy constants (Horowitz, ISSCC 2014, 45 nm, 32-bit float): 4.6 pJ per multiply-accumulate (MAC),
0.9 pJ per accumulate (AC). A layer fed by spikes does one AC per input event and fan-out (MACs x
fraction of non-zero inputs, per step); a layer fed by analog values (upstream of every neuron) does MACs,
once per step it runs (once per forward where its input is hoisted out of the time loop), so no count
depends on the time chunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm import tqdm

from snnconv import distributed
from snnconv.errors import ConversionError
from snnconv.model import SpikingModel
from snnconv.passes.fold_batchnorm import FoldedBN
from snnconv.runtime.integer_spikes import SpikeLayer
from snnconv.runtime.modules import Neuron, TimeBroadcast

E_MAC_PJ, E_AC_PJ = 4.6, 0.9
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, FoldedBN, SpikeLayer)


def _macs(module: nn.Module, out: torch.Tensor) -> float:
    """Multiply-accumulates of one call, over the whole batch."""
    layer = module.inner if isinstance(module, SpikeLayer) else module
    layer = layer._layer if isinstance(layer, FoldedBN) else layer
    if isinstance(layer, nn.Linear):
        return out.numel() * layer.in_features
    return out.numel() * layer.weight[0].numel()  # in_channels / groups * kernel elements


def _analog_fed(gm) -> tuple[set[nn.Module], set[nn.Module]]:
    """Compute modules whose input depends on no neuron (they see analog values: MACs, never spikes), and
    among them those before any broadcast over time (hoisted: one step-invariant pass per forward)."""
    spiking: set = set()
    timed: set = set()
    analog, static = set(), set()
    for node in gm.graph.nodes:
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        ins = node.all_input_nodes
        if isinstance(m, Neuron) or any(a in spiking for a in ins):
            spiking.add(node)
            continue
        if isinstance(m, TimeBroadcast) or any(a in timed for a in ins):
            timed.add(node)
        if isinstance(m, _COMPUTE):
            analog.add(m)
            if node not in timed:
                static.add(m)
    return analog, static


def _batches(data, y, batch: int, workers: int | None, pin: bool):
    """(DataLoader or iterable, number of batches or None)."""
    from snnconv import datasets

    if isinstance(data, torch.Tensor):
        data = torch.utils.data.TensorDataset(data) if y is None else torch.utils.data.TensorDataset(data, y)
        workers = 0 if workers is None else workers  # already in memory
    elif y is not None:
        raise ConversionError("labels y go with a tensor x; a Dataset or DataLoader yields (x, y) itself")
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = datasets.loader(data, batch, workers, pin=pin)
    try:
        size = len(data)
    except TypeError:
        size = None
    return data, size


def evaluate(
    snn: SpikingModel,
    data,
    y: torch.Tensor | None = None,
    *,
    T: int | list[int] | None = None,
    batch: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Run the SNN (and the ANN) over `data`: a tensor x [M, ...] (labels y), a Dataset or a DataLoader
    yielding x or (x, y). T: the steps (a list: the largest is run, accuracy is reported at every step up
    to it); default snn.T. Collective under torch.distributed: every rank calls it and gets the merged result."""
    Ts = sorted({T} if isinstance(T, int) else set(T)) if T is not None else [snn.T]
    if any(not isinstance(t, int) or t <= 0 for t in Ts):
        raise ConversionError(f"T must be positive integers, got {T!r}")
    T_max = Ts[-1]
    device = torch.device(device)
    snn.to(device)
    loader, size = _batches(data, y, batch, workers, device.type == "cuda")
    gm = snn.graph_module
    neurons = snn.neurons()
    analog, static = _analog_fed(gm)
    counted: set[nn.Module] = set()  # hoisted layers already counted in this forward (one per time chunk runs)
    counts = torch.zeros(6, dtype=torch.float64, device=device)  # ann MACs, SNN ACs, SNN MACs, n, ann ok, labelled
    spikes = torch.zeros(2, len(neurons), dtype=torch.float64, device=device)  # spikes, neuron-steps
    correct = torch.zeros(T_max, dtype=torch.float64, device=device)
    index = {m: i for i, m in enumerate(neurons.values())}
    mode = ["ann"]

    def on_compute(m, i, o):
        macs = _macs(m, o)
        if mode[0] == "ann":
            counts[0] += macs
        elif m in static:
            if m not in counted:  # once per forward, however many time chunks ran it
                counted.add(m)
                counts[2] += macs
        elif m in analog:
            counts[2] += macs
        else:
            counts[1] += macs * (i[0] != 0).double().mean()  # stays a tensor: no device sync per call

    def on_neuron(m, i, o):
        if mode[0] == "snn":
            spikes[0, index[m]] += (o != 0).sum()
            spikes[1, index[m]] += o.numel()

    for m in neurons.values():  # count this run's calls only
        m.calls.update(kernel=0, cpu=0, torch=0)
    hooks = [m.register_forward_hook(on_compute) for m in gm.modules() if isinstance(m, _COMPUTE)]
    hooks += [m.register_forward_hook(on_neuron) for m in neurons.values()]
    old_T = snn.T
    me = distributed.rank()
    bar = tqdm(total=size, desc=f"SNN T={T_max}", disable=not progress or me != 0, leave=False)
    try:
        snn.T = T_max
        with torch.no_grad():
            for item in distributed.without_padding(loader):
                xb, yb = (item[0], item[1]) if isinstance(item, (tuple, list)) and len(item) > 1 else (item, None)
                xb = xb[0] if isinstance(xb, (tuple, list)) else xb
                xb = xb.to(device, non_blocking=True)
                mode[0] = "ann"
                ann_pred = gm(xb).argmax(-1)  # the prepared graph in ANN mode is the ANN
                mode[0] = "snn"
                counted.clear()
                pred = snn(xb, per_step=True).cumsum(0).argmax(-1)  # [T, N]: the running mean's class
                counts[3] += len(xb)
                if yb is not None:
                    yb = torch.as_tensor(yb).to(device)
                    correct += (pred == yb).double().sum(1)
                    counts[4] += (ann_pred == yb).double().sum()
                    counts[5] += len(xb)
                bar.update(1)
    except ConversionError:
        raise
    except Exception as exc:
        if "DataLoader worker" in str(exc):
            from snnconv.datasets import reraise_worker_error

            raise reraise_worker_error(exc) from exc
        raise
    finally:
        bar.close()
        snn.T = old_T
        for h in hooks:
            h.remove()
    counts, spikes, correct = (distributed.all_reduce(t) for t in (counts, spikes, correct))
    counts, spikes, correct = counts.cpu(), spikes.cpu(), correct.cpu()
    n = int(counts[3])
    if n == 0:
        raise ConversionError("evaluation data is empty")
    result = {
        "T": T_max,
        "Ts": Ts,
        "samples": n,
        "firing_rates": {k: float(spikes[0, i] / max(spikes[1, i], 1)) for i, k in enumerate(neurons)},
        "ann_macs": float(counts[0]) / n,
        "snn_acs": float(counts[1]) / n,
        "snn_macs": float(counts[2]) / n,
        "device": str(device),
        "neuron_calls": {k: dict(m.calls) for k, m in neurons.items()},  # this rank's: fused CUDA / CPU kernel vs torch
    }
    result["ann_energy_uj"] = result["ann_macs"] * E_MAC_PJ * 1e-6
    result["snn_energy_uj"] = (result["snn_acs"] * E_AC_PJ + result["snn_macs"] * E_MAC_PJ) * 1e-6
    labelled = int(counts[5])
    if labelled:
        if labelled != n:
            raise ConversionError(f"{n - labelled} of {n} samples came without labels: label all or none")
        result["accuracy_by_T"] = (correct / n * 100).tolist()
        result["ann_accuracy"] = float(counts[4] / n * 100)
    return result
