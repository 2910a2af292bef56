"""BatchNorm after a conv/linear folds into it: one op instead of two, no key or value changes.

The folded weight is derived from the module's own parameters at run time and cached on their versions,
so load_state_dict() or .to() on the SNN refolds automatically, and state_dict() stays the ANN's.
"""

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from snnconv.passes.contract import contract
from snnconv.trace import BATCHNORM, CONV_LINEAR


class FoldedBN(nn.Module):
    """conv/linear followed by eval-mode BN, as one op. Holds the two modules by reference, unregistered."""

    def __init__(self, layer: nn.Module, bn: nn.Module, names: tuple[str, str]):
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_bn"] = layer, bn
        self.names, self._cache = names, (None, None)  # (key of the tensors folded, (weight, bias)): one tuple

    def extra_repr(self) -> str:
        return f"{self.names[0]} + {self.names[1]}"

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer, bn = self._layer, self._bn
        tensors = [layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = tuple((t.data_ptr(), t._version, t.device) if t is not None else None for t in tensors)
        cached_key, wb = self._cache  # read once: concurrent calls may both refold, never mix two folds
        if key != cached_key:
            with torch.no_grad():
                var, mean = bn.running_var.double(), bn.running_mean.double()
                scale = torch.rsqrt(var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.double()
                bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
                bias = (bias - mean) * scale
                if bn.bias is not None:
                    bias = bias + bn.bias.double()
                w = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
                fmt = (
                    torch.channels_last
                    if w.dim() == 4
                    and not layer.weight.is_contiguous()
                    and layer.weight.is_contiguous(memory_format=torch.channels_last)
                    else torch.contiguous_format
                )
                wb = (w.to(layer.weight.dtype).contiguous(memory_format=fmt), bias.to(layer.weight.dtype))
            self._cache = (key, wb)
        return wb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.folded()
        if isinstance(self._layer, nn.Linear):
            return F.linear(x, w, b)
        return self._layer._conv_forward(x, w, b)


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
