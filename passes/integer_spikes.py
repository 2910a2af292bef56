"""Convolutions and linear layers that read spikes run as exact int8 ops on CPU (oneDNN or the event kernel).

Each 2-d convolution fed by a neuron (directly, or through a layout copy, snn_kind 'layout_copy'), and each
linear layer fed by one (directly on [N, features], or through flatten(x, 1)), becomes a SpikeLayer:
threshold folded into the weights, weights as 16-bit fixed point, spikes as uint8 (see
runtime/integer_spikes.py; signed spikes go in shifted by one, the layer over ones taken off). Only for
spikes of one threshold (max_spikes=1, signed or not), float32 models on CPU, and where
an exact mode is fast (int8.choose, recorded in settings.int8: 'vnni', or on AVX2 'binary' or 'sparse'
where the probe finds it faster than float32). Outputs equal the float32 ones to ~1e-5 of a layer's scale.
"""

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from snnconv.passes.contract import contract
from snnconv.runtime import integer_spikes as int8


def _flattens_channels(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """Is `node` flatten(src, 1): every feature after it is one channel's value at one position?"""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and node.args == (src,)
    if node.target in (torch.flatten, "flatten") and node.op in ("call_function", "call_method"):
        args = (*node.args, *node.kwargs.values())
        return args in ((src, 1), (src, 1, -1)) and set(node.kwargs) <= {"start_dim", "end_dim"}
    return False


def _reader(gm: fx.GraphModule, neuron: fx.Node, user: fx.Node, mode: str) -> tuple[fx.Node, nn.Module, fx.Node] | None:
    """(layer node, its module, node it reads) if `user` leads to a supported layer reading `neuron`'s spikes."""
    via = neuron
    if user.meta.get("snn_kind") == "layout_copy" and user.args == (neuron,) and len(user.users) == 1:
        user = next(iter(user.users))  # a copy in another memory format: dropped, the layer reads the spikes
    elif _flattens_channels(gm, user, neuron) and len(user.users) == 1:
        user, via = next(iter(user.users)), user
    if user.op != "call_module" or len(user.args) != 1 or user.kwargs:
        return None
    layer = gm.get_submodule(user.target)
    inner = gm.get_submodule(user.meta.get("snn_layer", user.target))  # a folded BN names its conv/linear
    if not isinstance(inner, (nn.Conv2d, nn.Linear)) or not int8.supports(inner, mode):
        return None
    if isinstance(inner, nn.Linear) and via is neuron:  # directly: theta must be per feature, [N, features]
        meta = neuron.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 2:
            return None
    return user, layer, via


@contract(requires=("neurons_lowered",), provides=("int8_packed",), after=("batchnorm_folded", "layout_planned"))
def integer_spikes(gm: fx.GraphModule, settings) -> fx.GraphModule:
    param = next(gm.parameters(), None)
    binary = settings.neuron.max_spikes == 1  # spikes 0 or theta (signed: or -theta): u8 inputs
    applies = param is not None and param.device.type == "cpu" and param.dtype == torch.float32 and binary
    # one decision, recorded in the settings (checkpoints, inspect): the conversion's, where it holds here
    settings.int8 = mode = int8.choose(settings.int8) if applies else "off"
    if mode == "off":
        return gm
    try:  # shapes of one sample, in ANN mode (without them, linear layers read spikes only via flatten)
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.rand(1, *settings.input_shape))
    except Exception:  # e.g. a model whose input is not a float tensor
        pass
    for node in [n for n in gm.graph.nodes if n.meta.get("snn_kind") == "neuron"]:
        neuron = gm.get_submodule(node.target)
        if neuron.two_sided and not neuron.config.signed:  # -theta spikes need the signed (shifted) code
            continue
        for user in list(node.users):
            reader = _reader(gm, node, user, mode)
            if reader is None:
                continue
            layer_node, layer, via = reader
            name = f"_snn.int8_{layer_node.name}"
            flatten = via is not node  # it reads the neuron's map itself, in the map's layout: no copy
            gm.add_submodule(name, int8.SpikeLayer(layer, neuron, (layer_node.target, node.target), mode, flatten))
            with gm.graph.inserting_before(layer_node):
                new = gm.graph.call_module(name, (node,))
            new.meta.update(layer_node.meta)
            new.meta.update(int8=True, fresh_output=True, snn_layer=layer_node.meta.get("snn_layer", layer_node.target))
            new.stack_trace = layer_node.stack_trace
            copy = layer_node.args[0]
            layer_node.replace_all_uses_with(new)
            gm.graph.erase_node(layer_node)
            if copy is not node and not copy.users:  # the NCHW copy before a convolution, or the flatten
                gm.graph.erase_node(copy)
            if layer_node.meta.get("snn_layer", layer_node.target) != layer_node.target:
                gm.delete_submodule(layer_node.target)  # a wrapper (folded BN) nothing calls any more
        # int8 layers are all that read these spikes: the neuron writes only their uint8 input
        node.meta["int8_only"] = all(u.meta.get("int8") and u.args == (node,) for u in node.users)
    gm.recompile()
    return gm
