"""Weighted layers read spikes: where a convolution, linear layer or weight matmul reads a value computed by a
compensated op (after LayerNorm, GELU, attention) with no neuron in between, a two-sided IF neuron (spikes of
+-theta, calibrated like every other neuron) is inserted before it. One neuron per tensor, shared by the
layers reading it (q, k and v projections). Its channels are the features (last dim) before a linear map,
dim 1 before a convolution. Depthwise convolutions (one input channel per output) get one only with
settings.spike_depthwise: over a 3x3 window the spikes' per-step noise does not average out, and it cost more
accuracy than everything else together (SiLU/SE CNN, Fashion-MNIST, T = 8).
"""

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from snnconv.passes.contract import contract
from snnconv.passes.lower_activations import add_neuron
from snnconv.trace import time_varying

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LINEAR_MODULES = (nn.Linear, nn.MultiheadAttention)
_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_MATMULS = (operator.matmul, torch.matmul, torch.bmm, torch.einsum, F.linear, "matmul", "__matmul__", "bmm")


def _depthwise(m: nn.Module) -> bool:
    return m.groups > 1 and m.groups == m.in_channels


def weighted_inputs(gm: fx.GraphModule, node: fx.Node, depthwise: bool = True) -> tuple[list[fx.Node], int]:
    """(the time-varying inputs a weighted layer multiplies by its weights, their channel dim), or ([], 0)."""
    ins = [a for a in node.all_input_nodes if time_varying(a)]
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _CONV):
            return (ins, 1) if depthwise or not _depthwise(m) else ([], 0)
        return (ins, -1) if isinstance(m, _LINEAR_MODULES) else ([], 0)
    if node.op in ("call_function", "call_method") and node.meta.get("snn_kind") == "linear":
        if node.target in _CONV_FUNCTIONS:
            return ins[:1], 1
        if node.target in _MATMULS and len(ins) == 1:  # x @ W: one time-varying factor, the other a weight
            return ins, -1
    return [], 0


def _reads_compensated(node: fx.Node, gm: fx.GraphModule, seen: set) -> bool:
    """Does `node`'s value depend on a compensated op through linear, unweighted ops only?"""
    if node in seen:
        return False
    seen.add(node)
    kind = node.meta.get("snn_kind")
    if kind == "compensated":
        return True
    if kind not in ("linear", "tensors") or node.op == "placeholder" or weighted_inputs(gm, node)[0]:
        return False
    return any(_reads_compensated(a, gm, seen) for a in node.all_input_nodes if time_varying(a))


@contract(requires=("neurons_lowered",), provides=("spike_inputs",))
def spike_inputs(gm: fx.GraphModule, settings) -> fx.GraphModule:
    added: dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        ins, channel_dim = weighted_inputs(gm, node, settings.spike_depthwise)
        for a in ins:
            if a not in added:
                if not _reads_compensated(a, gm, set()):
                    continue
                added[a] = add_neuron(gm, settings, a, a, None)
                neuron = gm.get_submodule(added[a].target)
                neuron.two_sided, neuron.channel_dim = True, channel_dim
                added[a].meta.update(two_sided=True, snn_origin=f"input of {node.name}")
                for k in ("snn_shape", "snn_batched", "snn_batch_dim", "snn_batch_factor"):
                    added[a].meta[k] = a.meta.get(k)
            node.replace_input_with(a, added[a])
    gm.recompile()
    return gm
