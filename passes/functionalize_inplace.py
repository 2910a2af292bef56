"""In-place adds (`out += x`, `x.add_(y)`) become out-of-place: time-folded tensors may be broadcast views."""

import operator

import torch.fx as fx


def functionalize_inplace(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
        elif node.op == "call_method" and node.target == "add_":
            node.target = "add"
        if "inplace" in node.kwargs:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    gm.recompile()
    return gm
