"""Lowering: the input [N, ...] is repeated over time right at the start, so every op after it sees the
time-folded batch [steps * N, ...]. The baseline placement; hoist_static_input moves it later."""

import torch.fx as fx

from snnconv.passes.contract import contract
from snnconv.runtime.modules import TimeBroadcast


def insert_broadcast(gm: fx.GraphModule, settings, node: fx.Node, users: list[fx.Node] | None = None):
    """Insert TimeBroadcast(node) and point `users` (default: all users of node) at it."""
    users = list(node.users) if users is None else users
    name = f"_snn.time_{node.name}"
    gm.add_submodule(name, TimeBroadcast())
    with gm.graph.inserting_after(node):
        b = gm.graph.call_module(name, (node,))
    b.meta["snn_kind"] = "broadcast"
    for user in users:
        user.replace_input_with(node, b)
    return b


@contract(requires=("neurons_lowered", "maxpool_on_currents"), provides=("time_folded",))
def broadcast_input(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and node.users:
            insert_broadcast(gm, settings, node)
    gm.recompile()
    return gm
