"""Every ReLU-like activation node (module, function, method, in-place, ReLU6, clamp(0, a)) becomes a
call of one Neuron module. In ANN mode the Neuron computes the same clamp, so calibration sees the ANN."""

import torch
import torch.fx as fx

from snnconv.passes.contract import contract
from snnconv.qcfs import QCFS
from snnconv.runtime.modules import Neuron
from snnconv.trace import activation_clip


def free_name(gm: fx.GraphModule, name: str) -> str:
    """`name`, or `name_`, `name__`, ...: the first that is not a submodule of gm yet."""
    while True:
        try:
            gm.get_submodule(name)
            name += "_"
        except AttributeError:
            return name


def add_neuron(gm: fx.GraphModule, settings, anchor: fx.Node, source: fx.Node, clip) -> fx.Node:
    """Insert `_snn.<name>(source)` after `anchor`; the module carries the node's name for reports."""
    name = free_name(gm, f"_snn.{anchor.name}")
    gm.add_submodule(name, Neuron(settings.neuron, clip))
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(name, (source,))
    origin = anchor.meta.get("snn_origin", anchor.target if anchor.op == "call_module" else None)
    new.meta.update(snn_kind="neuron", snn_origin=origin)
    new.stack_trace = anchor.stack_trace
    return new


@contract(requires=("ops_classified",), provides=("neurons_lowered",))
def lower_activations(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.meta.get("snn_kind") != "activation":
            continue
        _, clip = activation_clip(node, gm)
        neuron = add_neuron(gm, settings, node, node.args[0], None if clip is None else float(clip))
        source = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(source, QCFS):  # trained threshold and quantisation: no calibration needed
            m = gm.get_submodule(neuron.target)
            m.levels, m.fixed, m.threshold = source.levels, True, torch.tensor(clip)
        node.replace_all_uses_with(neuron)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm
