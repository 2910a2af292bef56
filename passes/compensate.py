"""Expectation compensation (runtime/compensate.py): every op an IF neuron cannot represent (snn_kind
'compensated': GELU, softmax, LayerNorm, products of two time-varying tensors, ...) stays in the graph as the
ANN wrote it, reading the running means of its time-varying inputs (RunningMean) and followed by RunningDiff,
which turns f(means at step t) into the per-step increment that keeps the mean of the outputs exact.
Where an input is itself a RunningDiff output, the op reads that RunningDiff's input instead: the running mean
of t * F_t - (t - 1) * F_{t-1} is F_t. The same holds through a cheap linear op of such outputs (a scale, a sum,
a reshape): the op is repeated on the means (running means commute with linear maps), which costs less than a
running mean and adds no rounding.
"""

import torch.fx as fx

from snnconv.passes.contract import contract
from snnconv.passes.lower_activations import free_name
from snnconv.runtime.compensate import RunningDiff, RunningMean
from snnconv.trace import time_varying


def _insert(gm: fx.GraphModule, anchor: fx.Node, module, kind: str) -> fx.Node:
    name = free_name(gm, f"_snn.{kind}_{anchor.name}")
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(anchor):
        new = gm.graph.call_module(name, (anchor,))
    new.meta.update({k: v for k, v in anchor.meta.items() if k.startswith("snn_") and k != "snn_kind"})
    new.meta["snn_kind"] = kind
    new.stack_trace = anchor.stack_trace
    return new


def _mean_of(gm: fx.GraphModule, a: fx.Node, made: dict, depth: int = 2) -> fx.Node | None:
    """A node computing the running mean of `a` without a RunningMean, or None: a RunningDiff's input, or a cheap
    linear op (no weights) repeated on the means of its time-varying inputs."""
    if a in made:
        return made[a]
    kind = a.meta.get("snn_kind")
    if kind == "running_diff":
        return a.args[0]
    if depth == 0 or kind != "linear" or a.op not in ("call_function", "call_method"):
        return None
    inputs = [b for b in a.all_input_nodes if time_varying(b)]
    means = [_mean_of(gm, b, made, depth - 1) for b in inputs]
    if not inputs or any(m is None for m in means):
        return None
    anchor = max(means + [b for b in a.all_input_nodes if b not in inputs], key=_position)
    with gm.graph.inserting_after(anchor):
        copy = gm.graph.node_copy(a, lambda b: dict(zip(inputs, means)).get(b, b))
    copy.meta.update(a.meta)
    copy.meta["snn_position"] = _position(anchor) + 0.5
    made[a] = copy
    return copy


def _position(node: fx.Node) -> int:
    return node.meta["snn_position"]


@contract(requires=("ops_classified", "spike_inputs"), provides=("compensated",))
def compensate(gm: fx.GraphModule, settings) -> fx.GraphModule:
    means: dict[fx.Node, fx.Node] = {}
    made: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.meta.get("snn_kind") != "compensated":
            continue
        for i, n in enumerate(gm.graph.nodes):
            n.meta["snn_position"] = i
        for a in [a for a in node.all_input_nodes if time_varying(a)]:
            mean = _mean_of(gm, a, made)
            if mean is not None:
                node.replace_input_with(a, mean)
                continue
            if a not in means:
                dim = a.meta.get("snn_batch_dim")
                means[a] = _insert(gm, a, RunningMean(dim if isinstance(dim, int) else 0), "running_mean")
            node.replace_input_with(a, means[a])
        dim = node.meta.get("snn_batch_dim")
        diff = _insert(gm, node, RunningDiff(dim if dim is not None else 0), "running_diff")
        node.replace_all_uses_with(diff, delete_user_cb=lambda u, d=diff: u is not d)
    for node in reversed(list(gm.graph.nodes)):  # outputs only compensated ops read: their means are read
        if node.meta.get("snn_kind") in ("running_diff", "linear") and not node.users and node.op != "output":
            if node.op == "call_module" and node.meta.get("snn_kind") == "running_diff":
                gm.graph.erase_node(node)
                gm.delete_submodule(node.target)
            elif node.op in ("call_function", "call_method") and node in made:  # copied onto the means
                gm.graph.erase_node(node)
    for node in gm.graph.nodes:
        node.meta.pop("snn_position", None)
    gm.recompile()
    return gm
