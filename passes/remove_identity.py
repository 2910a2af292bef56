"""Dropout (identity at inference), nn.Identity and dead nodes leave the graph."""

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from snnconv.passes.contract import contract

_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.ops.aten.dropout.default}


def inference_identity(node: fx.Node) -> bool:
    """torchvision's stochastic_depth(x, p, mode, training) with training False: x (a wrapped leaf function)."""
    t = node.target
    return (
        node.op == "call_function"
        and getattr(t, "__name__", "") == "stochastic_depth"
        and getattr(t, "__module__", "").startswith("torchvision.")
        and (node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)) is False
    )


def _is_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _IDENTITY_MODULES)
    return node.op == "call_function" and (node.target in _IDENTITY_FUNCTIONS or inference_identity(node))


@contract(requires=("ops_classified",), provides=("identities_removed",))
def remove_identity(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if _is_identity(node, gm):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
