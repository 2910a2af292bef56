"""snnconv.evaluate: accuracy and agreement with the ANN at every T up to the largest asked for (one run: the
per-step outputs' running mean), firing rates, synaptic operations and energy, streamed batch by batch from a
tensor, a Dataset or a DataLoader. Under torch.distributed each rank runs its shard (a DistributedSampler) and
every count is summed across ranks, so every rank returns what one process returns on all the data; the
sampler's padding (it repeats samples so that shards are equal) is left out.

Operations are counted on the graph's nodes, whatever the model's spelling of a convolution or linear map:
torch.nn modules (also folded with BN or reading int8 spikes), functional calls (F.conv2d, F.linear: what a
Conv2d subclass with its own forward traces to) and products with a weight (matmul, mm, addmm, aten ops of
an exported program). Each runs through a counting wrapper in a copy of the graph, so the SNN is untouched.

Energy constants (Horowitz, ISSCC 2014, 45 nm, 32-bit float): 4.6 pJ per multiply-accumulate (MAC),
0.9 pJ per accumulate (AC). A layer fed by spikes does one AC per input event and fan-out (MACs x
fraction of non-zero inputs, per step); a layer fed by analog values (upstream of every neuron) does MACs,
once per step it runs (once per forward where its input is hoisted out of the time loop), so no count
depends on the time chunk. Compensated ops (GELU, softmax, LayerNorm, products of two activations such as
attention; passes/compensate.py) are float operations, not synaptic events: they are counted apart
(`snn_float_ops`: a product's MACs, one per output value otherwise, plus the running mean and difference
around them), at the MAC's energy.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from snnconv import distributed
from snnconv.errors import ConversionError
from snnconv.model import SpikingModel
from snnconv.runtime.integer_spikes import SpikeLayer
from snnconv.runtime.modules import FoldedBN, Neuron, TimeBroadcast

E_MAC_PJ, E_AC_PJ = 4.6, 0.9
_FLOAT_KINDS = ("compensated", "running_mean", "running_diff")
_aten = torch.ops.aten
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_COMPUTE = (*_CONV_MODULES, *_TRANSPOSED_MODULES, nn.Linear, FoldedBN, SpikeLayer)
# functions and aten ops by kind; the (input, weight) argument names are the functions' own
_CONV = {F.conv1d, F.conv2d, F.conv3d}
_CONV |= {getattr(getattr(_aten, f"conv{d}d"), o) for d in (1, 2, 3) for o in ("default", "padding")}
_TRANSPOSED = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_TRANSPOSED |= {_aten.conv_transpose1d.default, _aten.conv_transpose2d.input, _aten.conv_transpose3d.input}
_LINEAR = {F.linear, _aten.linear.default}
_PRODUCTS = {  # target -> (position, name) of its two factors (an addmm's bias comes first)
    **dict.fromkeys(
        (torch.matmul, operator.matmul, "matmul", "__matmul__", _aten.matmul.default), ((0, "input"), (1, "other"))
    ),
    **dict.fromkeys(
        (torch.mm, torch.bmm, "mm", "bmm", _aten.mm.default, _aten.bmm.default), ((0, "input"), (1, "mat2"))
    ),
    **dict.fromkeys((torch.addmm, "addmm", _aten.addmm.default), ((1, "mat1"), (2, "mat2"))),
}


def _arg(args, kwargs, i: int, name: str):
    return args[i] if len(args) > i else kwargs.get(name)


# A counter takes one call's (args, kwargs, output) and returns (MACs over the whole batch, the input tensor).
Counter = Callable[[tuple, dict, torch.Tensor], tuple[int, torch.Tensor]]


def _module_counter(m: nn.Module) -> Counter:
    layer = m.inner if isinstance(m, SpikeLayer) else m
    layer = layer._layer if isinstance(layer, FoldedBN) else layer
    per = layer.in_features if isinstance(layer, nn.Linear) else layer.weight[0].numel()  # in_ch / groups * kernel
    if isinstance(layer, _TRANSPOSED_MODULES):  # every input value meets out_ch / groups * kernel weights
        return lambda a, k, out: (a[0].numel() * per, a[0])
    return lambda a, k, out: (out.numel() * per, a[0])


def _function_counter(node: fx.Node, depends: set[fx.Node]) -> Counter | None:
    """How to count a call_function/call_method node's operations, or None: not a convolution or linear map."""
    t = node.target
    if t is _aten.convolution.default:  # (input, weight, bias, stride, padding, dilation, transposed, ...)
        t = F.conv_transpose2d if _arg(node.args, node.kwargs, 6, "transposed") else F.conv2d
    if t in _CONV:
        return lambda a, k, out: (out.numel() * _arg(a, k, 1, "weight")[0].numel(), _arg(a, k, 0, "input"))
    if t in _TRANSPOSED:  # every input value meets out_ch / groups * kernel weights

        def count(a, k, out):
            x = _arg(a, k, 0, "input")
            return x.numel() * _arg(a, k, 1, "weight")[0].numel(), x

        return count
    if t in _LINEAR:
        return lambda a, k, out: (out.numel() * _arg(a, k, 1, "weight").shape[-1], _arg(a, k, 0, "input"))
    if t not in _PRODUCTS:
        return None
    first, second = _PRODUCTS[t]
    fed = [
        isinstance(f, fx.Node) and f in depends
        for f in (_arg(node.args, node.kwargs, *first), _arg(node.args, node.kwargs, *second))
    ]
    if fed.count(True) != 1:  # a product of two activations (attention) maps no weight; a constant one, no input
        return None
    x = first if fed[0] else second  # the input; the other factor is the weight
    return lambda a, k, out: (out.numel() * _arg(a, k, *first).shape[-1], _arg(a, k, *x))  # outputs x contracted size


def _float_op_counter(node: fx.Node) -> Counter:
    """A compensated op (or its running mean / difference): a product's MACs, else one op per output value."""

    def count(a, k, out):
        first = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(first, torch.Tensor):
            return 0, None
        if node.target in _PRODUCTS and isinstance(a[0], torch.Tensor):
            return first.numel() * a[0].shape[-1], None
        return first.numel(), None

    return count


def _counters(gm: fx.GraphModule) -> dict[str, Counter]:
    """Each node that applies a convolution or linear map to the input's data, or is a compensated op: its
    counter, by node name."""
    depends: set[fx.Node] = set()  # nodes computed from the input (not from weights alone)
    found = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in depends for a in node.all_input_nodes):
            depends.add(node)
        if node.meta.get("snn_kind") in _FLOAT_KINDS:
            found[node.name] = _float_op_counter(node)
        elif node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, _COMPUTE):
                found[node.name] = _module_counter(m)
        elif node.op in ("call_function", "call_method") and node in depends:
            counter = _function_counter(node, depends)
            if counter is not None:
                found[node.name] = counter
    return found


def _analog_fed(gm: fx.GraphModule, counted: dict[str, Counter]) -> tuple[set[str], set[str]]:
    """Compute nodes that see analog values (MACs, never spikes): those whose input depends on no neuron, and
    those reading a compensated op's float output (a depthwise convolution after SiLU) without a neuron
    between; and among them those before any broadcast over time (hoisted: one step-invariant pass per forward)."""
    spiking: set = set()
    floats: set = set()  # a compensated op's output and what is computed from it before the next neuron
    timed: set = set()
    analog, static = set(), set()
    for node in gm.graph.nodes:
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        ins = node.all_input_nodes
        if isinstance(m, Neuron):
            spiking.add(node)
            continue
        if node.meta.get("snn_kind") in _FLOAT_KINDS or any(a in floats for a in ins):
            floats.add(node)
            if node.name in counted:
                analog.add(node.name)
            continue
        if any(a in spiking for a in ins):
            spiking.add(node)
            continue
        if isinstance(m, TimeBroadcast) or any(a in timed for a in ins):
            timed.add(node)
        if node.name in counted:
            analog.add(node.name)
            if node not in timed:
                static.add(node.name)
    return analog, static


def counting_graph(
    gm: fx.GraphModule, record: Callable[[str, int, torch.Tensor], None], counters: dict[str, Counter] | None = None
) -> fx.GraphModule:
    """A GraphModule computing what gm computes, over gm's own modules and weights, in which every convolution
    and linear map (`counters`, default _counters(gm)) also calls record(node name, MACs over the batch, input)."""
    counters = _counters(gm) if counters is None else counters
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        counter = counters.get(node.name)
        if counter is None:
            continue
        if node.op == "call_module":
            fn = gm.get_submodule(node.target)
        elif node.op == "call_method":
            fn = _method(node.target)
        else:
            fn = node.target
        node.op, node.target = "call_function", _counted(fn, node.name, counter, record)
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _method(name: str) -> Callable:
    def call(self, *args, **kwargs):
        return getattr(self, name)(*args, **kwargs)

    return call


def _counted(fn: Callable, name: str, counter: Counter, record) -> Callable:
    def counted(*args, **kwargs):
        out = fn(*args, **kwargs)
        macs, x = counter(args, kwargs, out)
        record(name, macs, x)
        return out

    return counted


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
    yielding x or (x, y). T: the steps (a list: the largest is run, accuracy and agreement with the ANN are
    reported at every step up to it); default snn.T. Collective under torch.distributed: every rank calls it
    and gets the merged result."""
    Ts = sorted({T} if isinstance(T, int) else set(T)) if T is not None else [snn.T]
    if any(not isinstance(t, int) or t <= 0 for t in Ts):
        raise ConversionError(f"T must be positive integers, got {T!r}")
    T_max = Ts[-1]
    device = torch.device(device)
    snn.to(device)
    loader, size = _batches(data, y, batch, workers, device.type == "cuda")
    neurons = snn.neurons()
    # ann MACs, SNN ACs, SNN MACs, n, ann ok, labelled, SNN float ops (compensated)
    counts = torch.zeros(7, dtype=torch.float64, device=device)
    spikes = torch.zeros(2, len(neurons), dtype=torch.float64, device=device)  # spikes, neuron-steps
    correct = torch.zeros(T_max, dtype=torch.float64, device=device)
    agree = torch.zeros(2, T_max, dtype=torch.float64, device=device)  # the ANN's class is the SNN's top 1, top 5
    index = {m: i for i, m in enumerate(neurons.values())}
    mode = ["ann"]
    done: set[str] = set()  # hoisted layers already counted in this forward (one per time chunk runs)

    def on_compute(name: str, macs: int, x: torch.Tensor) -> None:
        if x is None:  # a compensated op: float work in the SNN (in the ANN, the op itself: not a MAC count)
            if mode[0] == "snn" and not (name in static and name in done):
                if name in static:
                    done.add(name)
                counts[6] += macs
        elif mode[0] == "ann":
            counts[0] += macs
        elif name in static:
            if name not in done:  # once per forward, however many time chunks ran it
                done.add(name)
                counts[2] += macs
        elif name in analog:
            counts[2] += macs
        else:
            counts[1] += torch.count_nonzero(x).double() * (macs / x.numel())  # a tensor: no device sync per call

    def on_neuron(m, i, o):
        if mode[0] == "snn":
            spikes[0, index[m]] += (o != 0).sum()
            spikes[1, index[m]] += o.numel()

    counters = _counters(snn.graph_module)
    analog, static = _analog_fed(snn.graph_module, counters)
    gm = counting_graph(snn.graph_module, on_compute, counters)  # the SNN's graph, counting; the SNN is untouched
    run = copy.copy(snn)  # shares modules and settings, runs the counting graph
    run.__dict__["graph_module"] = gm
    for m in neurons.values():  # count this run's calls only
        m.calls.update(kernel=0, cpu=0, torch=0)
    hooks = [m.register_forward_hook(on_neuron) for m in neurons.values()]
    old_T = snn.T
    me = distributed.rank()
    bar = tqdm(total=size, desc=f"SNN T={T_max}", disable=not progress or me != 0, leave=False)
    classes = None
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
                done.clear()
                total = run(xb, per_step=True).cumsum(0)  # [T, N, classes]: the running sums
                pred = total.argmax(-1)  # the running mean's class at each step
                n = len(xb)
                agree[0] += (pred == ann_pred).reshape(T_max, n, -1).double().mean(2).sum(1)
                classes = total.shape[-1]
                if classes >= 5:
                    top5 = (total.topk(5, -1).indices == ann_pred.unsqueeze(-1)).any(-1)
                    agree[1] += top5.reshape(T_max, n, -1).double().mean(2).sum(1)
                counts[3] += n
                if yb is not None:
                    yb = torch.as_tensor(yb).to(device)
                    correct += (pred == yb).double().sum(1)
                    counts[4] += (ann_pred == yb).double().sum()
                    counts[5] += n
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
    counts, spikes, correct, agree = (distributed.all_reduce(t) for t in (counts, spikes, correct, agree))
    counts, spikes, correct, agree = counts.cpu(), spikes.cpu(), correct.cpu(), agree.cpu()
    classes = int(distributed.all_reduce(torch.tensor(float(classes or 0), device=device), "max").item())
    n = int(counts[3])
    if n == 0:
        raise ConversionError("evaluation data is empty")
    result = {
        "T": T_max,
        "Ts": Ts,
        "samples": n,
        "agreement_by_T": (agree[0] / n * 100).tolist(),  # % of samples whose SNN class is the ANN's, at each T
        "firing_rates": {k: float(spikes[0, i] / max(spikes[1, i], 1)) for i, k in enumerate(neurons)},
        "ann_macs": float(counts[0]) / n,
        "snn_acs": float(counts[1]) / n,
        "snn_macs": float(counts[2]) / n,
        "snn_float_ops": float(counts[6]) / n,  # compensated ops: not synaptic events
        "device": str(device),
        "neuron_calls": {k: dict(m.calls) for k, m in neurons.items()},  # this rank's: fused CUDA / CPU kernel vs torch
    }
    if classes >= 5:
        result["agreement_top5_by_T"] = (agree[1] / n * 100).tolist()  # the ANN's class among the SNN's top 5
    result["ann_energy_uj"] = result["ann_macs"] * E_MAC_PJ * 1e-6
    result["snn_energy_uj"] = (
        result["snn_acs"] * E_AC_PJ + (result["snn_macs"] + result["snn_float_ops"]) * E_MAC_PJ
    ) * 1e-6
    labelled = int(counts[5])
    if labelled:
        if labelled != n:
            raise ConversionError(f"{n - labelled} of {n} samples came without labels: label all or none")
        result["accuracy_by_T"] = (correct / n * 100).tolist()
        result["ann_accuracy"] = float(counts[4] / n * 100)
    return result
