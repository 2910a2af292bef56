"""Static-input hoisting: with direct encoding the input is the same at every step, so every op between
the input and the first neurons runs once on [N, ...] instead of on [T * N, ...]. The neurons there
integrate a constant; the broadcast over time moves to where step-invariant tensors meet spiking ones.
"""

import torch.fx as fx

from snnconv.passes.broadcast_input import insert_broadcast
from snnconv.passes.contract import contract


def _is_neuron(node: fx.Node) -> bool:
    return node.meta.get("snn_kind") == "neuron"


@contract(
    requires=("neurons_lowered", "maxpool_on_currents", "time_folded"),
    provides=("static_region_marked",),
)
def hoist_static_input(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):  # undo the baseline placement
        if node.meta.get("snn_kind") == "broadcast":
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    static: set[fx.Node] = set()  # step-invariant tensors that carry the batch (depend on the input)
    static_sizes: set[fx.Node] = set()
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        if node.op == "placeholder":
            static.add(node)
        elif _is_neuron(node):  # a neuron and a spike max pool read `static_input` at run time (materialise)
            node.meta["static_input"] = ins[0] in static
        elif node.meta.get("snn_kind") == "value":  # a size read from a step-invariant tensor: N, not T * N
            if any(a in static or a in static_sizes for a in ins):
                static_sizes.add(node)
            continue
        elif node.meta.get("snn_kind") == "constant" or node.op == "output":
            continue
        # from step-invariant tensors, or built from a step-invariant batch size (cls_token.expand(x.shape[0], ...))
        elif all(a in static or not _batch_carrying(a) for a in ins) and any(
            a in static or a in static_sizes for a in ins
        ):
            static.add(node)
            if node.meta.get("snn_kind") == "maxpool":
                node.meta["static_input"] = True
    dynamic_seen: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in static or _is_neuron(node) or node.meta.get("snn_kind") in ("value", "constant"):
            continue
        for a in node.all_input_nodes:
            if a in static and a not in dynamic_seen:
                users = [
                    u for u in a.users if u not in static and not _is_neuron(u) and u.meta.get("snn_kind") != "value"
                ]
                insert_broadcast(gm, settings, a, users)
                dynamic_seen.add(a)
    for node in gm.graph.nodes:
        node.meta["step_invariant"] = node in static
    gm.recompile()
    return gm


def _batch_carrying(node: fx.Node) -> bool:
    """Does this input carry the batch? Constants (get_attr, parameter-only subgraphs) and sizes do not."""
    return node.op != "get_attr" and node.meta.get("snn_kind") not in ("value", "constant")
