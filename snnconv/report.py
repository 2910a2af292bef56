"""Human-readable views of a conversion: the pass pipeline with each pass's graph diff, and the neurons."""

from __future__ import annotations

import difflib
import itertools

from snnconv import passes as pipeline
from snnconv.errors import user_source_line
from snnconv.model import SpikingModel
from snnconv.runtime.modules import Neuron


def neuron_table(snn: SpikingModel) -> str:
    rows = [f"{'neuron':<28}{'threshold':>22}{'clip':>7}{'kernel':>10}  source"]
    gm = snn.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if not isinstance(m, Neuron):
            continue
        th = m.threshold
        th_text = (
            f"{th.item():.4g}" if th.numel() == 1 else f"{th.numel()} ch, {th.min().item():.3g}..{th.max().item():.3g}"
        )
        clip = "-" if m.clip is None else f"{m.clip:g}"
        fused = m.calls["kernel"] + m.calls["cpu"]  # SNN calls so far in this process on a fused kernel
        n = fused + m.calls["torch"]
        kernel = f"{fused}/{n}" if n else "-"
        static = " (static input)" if m.static_input else ""
        where = user_source_line(node.stack_trace, node.meta.get("snn_origin"))
        rows.append(f"{node.target:<28}{th_text:>22}{clip:>7}{kernel:>10}  {where}{static}")
    return "\n".join(rows)


def inspect(snn: SpikingModel, diffs: bool = True) -> str:
    """The pipeline, the graph after tracing, each pass's change to it, the final graph and the neurons."""
    out = ["pass pipeline:", pipeline.describe(), "", f"settings: {snn.settings.to_dict()}", ""]
    log = snn.pass_log
    if log:
        out += ["== graph as traced ==", log[0][1].strip()]
        for (_, before), (name, after) in itertools.pairwise(log):
            if not diffs:
                out.append(f"== after {name} ==")
                continue
            delta = list(
                difflib.unified_diff(before.strip().splitlines(), after.strip().splitlines(), lineterm="", n=0)
            )[2:]
            out += [f"== {name}: {'no change' if not delta else f'{len(delta)} changed lines'} ==", *delta]
    out += ["== final graph ==", snn.graph_module.code.strip(), "", neuron_table(snn)]
    return "\n".join(out)
