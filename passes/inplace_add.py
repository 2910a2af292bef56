"""Residual adds write into their left operand when nothing else reads it: `conv(x) + shortcut` then
needs no new [T*N, ...] buffer (on CPU, fresh large buffers cost page faults on every call). Only where
the sum has the left operand's shape (node.meta['snn_shape'] from the front end): a broadcasting add, such as
`g(pool(h)) + h`, makes a bigger tensor and stays out of place (as torch's reinplace pass checks)."""

import operator

import torch
import torch.fx as fx
import torch.nn as nn

from snnconv.passes.contract import contract

# the ANN's layers that return a new tensor; layers other passes plant say so in node.meta['fresh_output']
_FRESH = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fresh_private(gm: fx.GraphModule, node) -> bool:
    """Is `node` a new tensor made by a stateless layer and read by exactly one node?"""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and len(node.users) == 1
        and (node.meta.get("fresh_output") or isinstance(gm.get_submodule(node.target), _FRESH))
    )


_SAME_SHAPE = ("broadcast", "neuron")


def _shape(node) -> tuple | None:
    """The recorded shape of a tensor node; nodes the passes added that keep their input's shape (a time
    broadcast, a neuron) have their input's."""
    while isinstance(node, fx.Node) and "snn_shape" not in node.meta and node.meta.get("snn_kind") in _SAME_SHAPE:
        node = node.args[0]
    shape = node.meta.get("snn_shape") if isinstance(node, fx.Node) else None
    return shape if shape and isinstance(shape[0], int) else None


def _same_shape_sum(a, b) -> bool:
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None or len(sb) > len(sa):
        return False
    try:
        return tuple(torch.broadcast_shapes(sa, sb)) == tuple(sa)
    except RuntimeError:
        return False


@contract(
    requires=("ops_classified",),
    provides=("inplace_adds",),
    after=("batchnorm_folded", "int8_packed", "residuals_in_neurons"),
)
def inplace_add(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if (
            node.op == "call_function"
            and node.target in (operator.add, torch.add)
            and len(node.args) == 2
            and not node.kwargs
            and isinstance(node.args[1], fx.Node)
            and node.args[1].meta.get("snn_kind") != "value"
            and _fresh_private(gm, node.args[0])
            and _same_shape_sum(node.args[0], node.args[1])
        ):
            node.op, node.target = "call_method", "add_"
    gm.recompile()
    return gm
