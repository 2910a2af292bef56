"""Sizes taken from the batch (`bs = x.size(0)`, `x.shape[0]`, `x.size()`) and used to reshape a tensor
(`y.view(bs, -1)`, `y.reshape(bs, c, h, w)`) read the size of the tensor being reshaped instead: inside the
SNN the batch is T*N after the first neurons and N before them, whichever tensor the size came from.
Reads the front end's facts (node.meta['snn_batch_value'], 'snn_batched')."""

import torch.fx as fx

from snnconv.passes.contract import contract


def with_batch(size, n: int) -> tuple:
    """`size` (a torch.Size or tuple) with its first entry replaced by `n`."""
    return (n, *tuple(size)[1:])


@contract(requires=("ops_classified",), provides=("batch_sizes_folded",))
def fold_batch_sizes(gm: fx.GraphModule, settings) -> fx.GraphModule:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.meta.get("snn_kind") not in ("linear", "tensors") or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or not src.meta.get("snn_batched"):
            continue
        made: dict[str, fx.Node] = {}

        def folded(a: fx.Node, src=src, node=node, made=made) -> fx.Node:
            kind = a.meta.get("snn_batch_value")
            if kind not in ("int", "size"):
                return a
            if "int" not in made:
                with graph.inserting_before(node):
                    made["int"] = graph.call_method("size", (src, 0))
                made["int"].meta.update(snn_kind="value", snn_batched=True, snn_batch_value="int")
            if kind == "size" and "size" not in made:
                with graph.inserting_before(node):
                    made["size"] = graph.call_function(with_batch, (a, made["int"]))
                made["size"].meta.update(snn_kind="value", snn_batched=True, snn_batch_value="size")
            return made[kind]

        node.args = fx.node.map_arg(node.args[:1], lambda a: a) + fx.node.map_arg(node.args[1:], folded)
        node.kwargs = fx.node.map_arg(node.kwargs, folded)
    for node in reversed(list(graph.nodes)):  # sizes nothing reads any more
        if node.meta.get("snn_kind") == "value" and not node.users and node.op in ("call_method", "call_function"):
            graph.erase_node(node)
    gm.recompile()
    return gm
