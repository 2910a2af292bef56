"""CPU memory format: 2-d convolution nets run channels-last (NHWC), where oneDNN's convolutions and
max pooling are several times faster than in NCHW. The parameters stay the same values under the
same keys (only their strides change); `view` becomes `reshape`, which copies only where NHWC needs it.
"""

import torch
import torch.fx as fx
import torch.nn as nn

from snnconv.runtime.modules import TimeBroadcast


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and x.device.type == "cpu" else x


def channels_last(gm: fx.GraphModule, settings) -> fx.GraphModule:
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    if not convs or settings.input_ndim != 4:
        return gm
    with torch.no_grad():
        for m in convs:
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target in ("view", "view_as"):
            node.target = {"view": "reshape", "view_as": "reshape_as"}[node.target]
        elif node.op == "placeholder":
            first = next((u for u in node.users if u.op == "call_module"
                          and isinstance(gm.get_submodule(u.target), TimeBroadcast)), node)
            with gm.graph.inserting_after(first):
                cl = gm.graph.call_function(_to_channels_last, (first,))
            cl.meta["snn_kind"] = "linear"
            for user in list(first.users):
                if user is not cl:
                    user.replace_input_with(first, cl)
    gm.recompile()
    return gm
