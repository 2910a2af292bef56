"""Max pooling moves onto the neuron's analog input: maxpool(neuron(x)) -> neuron'(maxpool(x)).

ReLU is monotone, so maxpool(relu(x)) == relu(maxpool(x)) in the ANN; in the SNN this pools currents,
not spikes (the max of spike trains is not the max of rates). Every maxpool becomes a SpikeMaxPool,
which is plain pooling on step-invariant input and rate-gated pooling on time-varying input.
"""

import torch
import torch.fx as fx
import torch.nn.functional as F

from snnconv.passes.contract import contract
from snnconv.passes.lower_activations import add_neuron
from snnconv.runtime.modules import SpikeMaxPool
from snnconv.trace import MAXPOOL_MODULES

_aten = torch.ops.aten
_FN_DIMS = {
    F.max_pool1d: 1,
    F.max_pool2d: 2,
    F.max_pool3d: 3,
    _aten.max_pool1d.default: 1,
    _aten.max_pool2d.default: 2,
    _aten.max_pool3d.default: 3,
}
_KW = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _pool_spec(node: fx.Node, gm: fx.GraphModule) -> tuple[dict, int]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        dims = MAXPOOL_MODULES.index(type(m)) + 1
        return {k: getattr(m, k) for k in _KW}, dims
    kw = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), node.args[1:]))
    kw.update({k: v for k, v in node.kwargs.items() if k in _KW})
    return kw, _FN_DIMS[node.target]


@contract(requires=("ops_classified", "neurons_lowered"), provides=("maxpool_on_currents",))
def commute_maxpool(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if node.meta.get("snn_kind") != "maxpool":
            continue
        kwargs, dims = _pool_spec(node, gm)
        name = f"_snn.{node.name}"
        gm.add_submodule(name, SpikeMaxPool(kwargs, dims))
        src = node.args[0]
        neuron, neuron_node = None, None
        if src.meta.get("snn_kind") == "neuron":
            neuron, neuron_node, src = gm.get_submodule(src.target), src, src.args[0]
        with gm.graph.inserting_after(node):
            pooled = gm.graph.call_module(name, (src,))
        pooled.meta["snn_kind"], pooled.stack_trace = "maxpool", node.stack_trace
        if neuron_node is not None:
            pooled.meta["snn_origin"] = neuron_node.meta.get("snn_origin")
        out = pooled
        if neuron is not None:
            out = add_neuron(gm, settings, pooled, pooled, neuron.clip)
            new = gm.get_submodule(out.target)
            new.levels, new.fixed, new.threshold = neuron.levels, neuron.fixed, neuron.threshold.clone()
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        if neuron_node is not None and not neuron_node.users:  # the pooled neuron replaced it entirely
            gm.graph.erase_node(neuron_node)
            gm.delete_submodule(neuron_node.target)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
