"""BatchNorm after a conv/linear folds into it: one op instead of two, no key or value changes (the
runtime's FoldedBN derives the folded weight from the two modules' own parameters at run time)."""

import torch.fx as fx
import torch.nn as nn

from snnconv.passes.contract import contract
from snnconv.runtime.modules import FoldedBN
from snnconv.trace import BATCHNORM, CONV_LINEAR


@contract(requires=("ops_classified",), provides=("batchnorm_folded",))
def fold_batchnorm(gm: fx.GraphModule, settings) -> fx.GraphModule:
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or not isinstance(gm.get_submodule(bn_node.target), BATCHNORM):
            continue
        src = bn_node.args[0]
        if src.op != "call_module" or len(src.users) != 1:
            continue
        layer, bn = gm.get_submodule(src.target), gm.get_submodule(bn_node.target)
        if not isinstance(layer, CONV_LINEAR) or not bn.track_running_stats:
            continue
        if isinstance(layer, nn.Linear) and bn.num_features != layer.out_features:
            continue
        name = f"_snn.fold_{src.name}"
        gm.add_submodule(name, FoldedBN(layer, bn, (src.target, bn_node.target)))
        with gm.graph.inserting_before(bn_node):
            fused = gm.graph.call_module(name, src.args, src.kwargs)
        fused.meta.update(bn_node.meta)
        fused.meta["snn_layer"] = src.target  # the conv/linear whose weights it applies (layout, int8 read it)
        fused.meta["fresh_output"] = True  # a new tensor each call (inplace_add may write into it)
        fused.stack_trace = src.stack_trace
        bn_node.replace_all_uses_with(fused)
        gm.graph.erase_node(bn_node)
        gm.graph.erase_node(src)
    gm.recompile()
    return gm
