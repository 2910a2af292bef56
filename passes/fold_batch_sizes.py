"""Sizes taken from the batch (`bs = x.size(0)`, `x.shape[0]`, `x.size()`) and used to reshape a tensor
(`y.view(bs, -1)`, `y.reshape(bs, c, h, w)`) read the size of the tensor being reshaped instead: inside the
SNN the batch is T*N after the first neurons and N before them, whichever tensor the size came from. A size
that is k times the batch (snn_batch_factor k: Swin's B_ = N * nW) becomes src.size(d) // k_src * k, with
src's batch dim d and factor k_src.
Reads the front end's facts (node.meta['snn_batch_value'], 'snn_batched')."""

import operator

import torch.fx as fx

from snnconv.passes.contract import contract


def with_batch(size, n: int) -> tuple:
    """`size` (a torch.Size or tuple) with its first entry replaced by `n`."""
    return (n, *tuple(size)[1:])


def _batch_size(graph: fx.Graph, node: fx.Node, src: fx.Node, k: int) -> fx.Node:
    """A node computing k * (src's batch) from src itself, inserted before `node`: src.size(d) where src's
    batch dim d is k * N already, else src.size(d) // k_src * k (src's batch dim is k_src * N: Swin's windows
    [N * nW, ...] reshaped with B = N, or a [N, ...] tensor reshaped with B_ = N * nW)."""
    d = src.meta.get("snn_batch_dim")
    d = d if isinstance(d, int) and d >= 0 else 0
    k_src = src.meta.get("snn_batch_factor") or 1
    with graph.inserting_before(node):
        out = graph.call_method("size", (src, d))
        out.meta.update(snn_kind="value", snn_batched=True, snn_batch_value="int", snn_batch_factor=k_src)
        if k_src != k:
            if k_src != 1:
                out = graph.call_function(operator.floordiv, (out, k_src))
                out.meta.update(snn_kind="value", snn_batched=True, snn_batch_value="int", snn_batch_factor=1)
            if k != 1:
                out = graph.call_function(operator.mul, (out, k))
                out.meta.update(snn_kind="value", snn_batched=True, snn_batch_value="int", snn_batch_factor=k)
    return out


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
            k = a.meta.get("snn_batch_factor") or 1  # the size is k * N
            if ("int", k) not in made:
                made[("int", k)] = _batch_size(graph, node, src, k)
            if kind == "int":
                return made[("int", k)]
            if ("size", a) not in made:
                with graph.inserting_before(node):
                    made[("size", a)] = graph.call_function(with_batch, (a, made[("int", k)]))
                made[("size", a)].meta.update(snn_kind="value", snn_batched=True, snn_batch_value="size")
                made[("size", a)].meta["snn_batch_factor"] = k
            return made[("size", a)]

        node.args = fx.node.map_arg(node.args[:1], lambda a: a) + fx.node.map_arg(node.args[1:], folded)
        node.kwargs = fx.node.map_arg(node.kwargs, folded)
    for node in reversed(list(graph.nodes)):  # sizes nothing reads any more
        if node.meta.get("snn_kind") == "value" and not node.users and node.op in ("call_method", "call_function"):
            graph.erase_node(node)
    gm.recompile()
    return gm
