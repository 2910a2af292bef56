"""A sum read only by a neuron becomes the neuron's second input: neuron(a + b) -> neuron(a, b), the residual
add of a ResNet block. The CPU neuron kernel adds b as it reads a, in the add's float32 order, so the sum is
never written and read again (ResNet-18 CIFAR: 8 adds over [T * N, ...] maps, 1% of a call on 2 threads). Elsewhere the
neuron adds them first, as the graph did: where the kernel does not run, or the two shapes differ (a broadcasting
add), so any sum of two tensors may move."""

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


@contract(requires=("neurons_lowered",), provides=("residuals_in_neurons",), after=("static_region_marked",))
def residual_into_neuron(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.meta.get("snn_kind") == "neuron" and len(node.args) == 1 and not node.kwargs and _fusable(node.args[0]):
            add = node.args[0]
            node.args = add.args
            gm.graph.erase_node(add)
    gm.recompile()
    return gm
