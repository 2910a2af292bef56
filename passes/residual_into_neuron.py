"""A sum read only by a neuron becomes the neuron's second input: neuron(a + b) -> neuron(a, b), the residual
add of a ResNet block. The CPU neuron kernel adds b as it reads a, in the add's float32 order, so the sum is
never written and read again. Elsewhere the neuron adds them first, as the graph did: where the kernel does not
run, or the two shapes differ (a broadcasting add), so any sum of two tensors may move. Where the residual is
another neuron's spikes (an identity shortcut) that int8 layers read too, the kernel reads them from the uint8
code that neuron writes for those layers, and that neuron writes no float spikes at all (Neuron.int8_only).
ResNet-18 CIFAR, VNNI, 2 threads: 3% of a call (8 adds over [T * N, ...] maps, 5 float spike maps)."""

import operator

import torch
import torch.fx as fx

from snnconv.passes.contract import contract


def _fusable(add) -> bool:
    return (
        isinstance(add, fx.Node)
        and add.op == "call_function"
        and add.target in (operator.add, torch.add)
        and not add.kwargs
        and len(add.users) == 1
        and len(add.args) == 2
        and all(isinstance(a, fx.Node) and a.meta.get("snn_kind") not in ("value", "constant") for a in add.args)
    )


def _is_neuron(node) -> bool:
    return isinstance(node, fx.Node) and node.meta.get("snn_kind") == "neuron"


@contract(
    requires=("neurons_lowered",), provides=("residuals_in_neurons",), after=("static_region_marked", "int8_packed")
)
def residual_into_neuron(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if _is_neuron(node) and len(node.args) == 1 and not node.kwargs and _fusable(node.args[0]):
            add = node.args[0]
            a, b = add.args
            node.args = (b, a) if _is_neuron(a) and not _is_neuron(b) else (a, b)  # a + b == b + a, bit for bit
            gm.graph.erase_node(add)
            if _is_neuron(node.args[1]):  # another neuron's spikes: read from the code it writes for int8 layers
                node.meta["residual_source"] = node.args[1].target
    for node in gm.graph.nodes:  # read only by int8 layers and as residuals: no float spikes written
        if _is_neuron(node) and any(u.meta.get("int8") for u in node.users):
            node.meta["int8_only"] = all(
                (u.meta.get("int8") and u.args == (node,))
                or (_is_neuron(u) and u.args[1:] == (node,) and u.meta.get("residual_source") == node.target)
                for u in node.users
            )
    gm.recompile()
    return gm
