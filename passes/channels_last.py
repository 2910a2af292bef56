"""CPU memory format: 2-d convolution nets run channels-last (NHWC), where oneDNN's convolutions on
large feature maps and max pooling are several times faster than in NCHW. On small maps (under 8x8,
the deep end of a ResNet) NCHW is faster, so those convolutions get an NCHW input and weight.
The parameters keep their values under the same keys (only their strides change); `view` becomes
`reshape`, which copies only where NHWC needs it.
"""

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from snnconv.passes.contract import contract

_SMALL_MAP = 64  # H * W below which a convolution stays NCHW (measured on oneDNN, 2 cores)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.device.type == "cpu" else x


def _conv_of(gm: fx.GraphModule, node: fx.Node) -> nn.Conv2d | None:
    """The Conv2d whose weights `node` applies: its own module, or the one named in node.meta['snn_layer']."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.meta.get("snn_layer", node.target))
    return m if isinstance(m, nn.Conv2d) else None


@contract(requires=("time_folded",), provides=("layout_planned",), after=("batchnorm_folded",))
def channels_last(gm: fx.GraphModule, settings) -> fx.GraphModule:
    param = next(gm.parameters(), None)
    if (
        settings.input_ndim != 4
        or param is None
        or param.device.type != "cpu"
        or not any(isinstance(m, nn.Conv2d) for m in gm.modules())
    ):
        return gm
    with torch.no_grad():  # shapes of one sample, in ANN mode
        ShapeProp(gm).propagate(torch.rand(1, *settings.input_shape, dtype=param.dtype))
    for node in list(gm.graph.nodes):
        conv = _conv_of(gm, node)
        meta = node.args[0].meta.get("tensor_meta") if conv is not None else None
        if meta is None:
            continue
        small = meta.shape[-1] * meta.shape[-2] < _SMALL_MAP
        fmt = torch.contiguous_format if small else torch.channels_last
        node.meta["layout"] = "nchw" if small else "channels_last"
        node.meta["memory_format"] = fmt  # the layout plan, read by integer_spikes
        with torch.no_grad():
            conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
        if not small and meta.shape[1] == 1:
            # one input channel: NCHW and NHWC are the same strides, so oneDNN picks NCHW for the output
            # and every reader converts it again (at the first neuron: a copy over all T steps); convert
            # it once here, where it is still [N, ...] when the stem runs before the neurons
            with gm.graph.inserting_after(node):
                cl = gm.graph.call_function(_to_channels_last, (node,))
            cl.meta.update(snn_kind="linear", memory_format=fmt)
            for user in list(node.users):
                if user is not cl:
                    user.replace_input_with(node, cl)
        if small:
            with gm.graph.inserting_before(node):
                nchw = gm.graph.call_method("contiguous", (node.args[0],))
            nchw.meta.update(snn_kind="layout_copy", memory_format=fmt)  # values unchanged
            node.replace_input_with(node.args[0], nchw)
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target in ("view", "view_as"):
            node.target = {"view": "reshape", "view_as": "reshape_as"}[node.target]
        elif node.op == "placeholder":
            first = next((u for u in node.users if u.meta.get("snn_kind") == "broadcast"), node)
            with gm.graph.inserting_after(first):
                cl = gm.graph.call_function(_to_channels_last, (first,))
            cl.meta.update(snn_kind="linear", memory_format=torch.channels_last)
            for user in list(first.users):
                if user is not cl:
                    user.replace_input_with(first, cl)
    gm.recompile()
    return gm
