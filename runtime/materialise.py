"""After the lower passes: the facts they recorded on the graph's nodes become the runtime modules' settings.
Passes describe (node.meta); only this step sets what a runtime module reads at call time."""

from __future__ import annotations

import torch.fx as fx

from snnconv.runtime.compensate import RunningDiff, RunningMean
from snnconv.runtime.modules import Neuron, SpikeMaxPool


def materialise(gm: fx.GraphModule) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, SpikeMaxPool) and node.meta.get("static_input"):
            m.static_input = True  # hoist_static_input: its input is the same at every step
        if isinstance(m, (RunningMean, RunningDiff)):  # a step-invariant value passes through
            m.static_input = node.meta.get("step_invariant", False)
        if isinstance(m, Neuron):
            m.static_input = node.meta.get("static_input", False)
            m.int8_only = node.meta.get("int8_only", False)  # integer_spikes, residual_into_neuron
            source = node.meta.get("residual_source")  # residual_into_neuron: another neuron's spikes
            m.set_residual_source(gm.get_submodule(source) if source is not None else None)
    return gm
