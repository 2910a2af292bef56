"""The pass pipeline. Each pass is `(gm, settings) -> gm`, one job, one file.

PREPARE runs on the traced ANN before calibration (the graph still computes the ANN exactly);
LOWER runs after thresholds are set and turns it into the time-folded spiking graph.
OPTIONAL passes may be switched off (convert(..., passes=[...])); the others are required.
Each pass declares a contract (passes/contract.py): the facts it requires and provides; the order is
checked when the pipeline is built and before it runs. `print(snnconv.passes.describe())` lists both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from snnconv.passes.broadcast_input import broadcast_input
from snnconv.passes.channels_last import channels_last
from snnconv.passes.commute_maxpool import commute_maxpool
from snnconv.passes.compensate import compensate
from snnconv.passes.contract import FACTS, check_order, facts, mark
from snnconv.passes.fold_batch_sizes import fold_batch_sizes
from snnconv.passes.fold_batchnorm import fold_batchnorm
from snnconv.passes.hoist_static_input import hoist_static_input
from snnconv.passes.inplace_add import inplace_add
from snnconv.passes.integer_spikes import integer_spikes
from snnconv.passes.lower_activations import lower_activations
from snnconv.passes.remove_identity import remove_identity
from snnconv.passes.residual_into_neuron import residual_into_neuron
from snnconv.passes.spike_inputs import spike_inputs

Pass = Callable[[fx.GraphModule, object], fx.GraphModule]

PREPARE: list[Pass] = [fold_batch_sizes, remove_identity, lower_activations, commute_maxpool, spike_inputs, compensate]
LOWER: list[Pass] = [
    fold_batchnorm,
    broadcast_input,
    hoist_static_input,
    channels_last,
    integer_spikes,
    residual_into_neuron,
    inplace_add,
]
OPTIONAL = {
    "fold_batchnorm",
    "hoist_static_input",
    "channels_last",
    "integer_spikes",
    "residual_into_neuron",
    "inplace_add",
}
check_order(PREPARE + LOWER)  # the pipeline as built: every fact provided before it is needed
__all__ = ["FACTS", "LOWER", "OPTIONAL", "PREPARE", "describe", "enabled", "facts", "mark", "run"]


def enabled(p: Pass, settings) -> bool:
    return p.__name__ not in OPTIONAL or settings.passes is None or p.__name__ in settings.passes


def run(passes: list[Pass], gm: fx.GraphModule, settings, log: list | None = None) -> fx.GraphModule:
    """Run each enabled pass; `log` collects (pass name, graph code after it)."""
    passes = [p for p in passes if enabled(p, settings)]
    check_order(passes, given=facts(gm))  # e.g. a pass switched off that a later one needs
    for p in passes:
        gm = p(gm, settings)
        gm.graph.lint()
        if log is not None:
            log.append((p.__name__, gm.code))
    return gm


def describe() -> str:
    """The pipeline, each pass's contract, and what each fact promises."""
    lines = []
    for stage, passes in (("prepare", PREPARE), ("lower", LOWER)):
        for i, p in enumerate(passes, 1):
            opt = " (optional)" if p.__name__ in OPTIONAL else ""
            doc = ((p.__module__ and __import__(p.__module__, fromlist=["_"]).__doc__) or "").strip()
            lines.append(f"{stage} {i}. {p.__name__}{opt}: {doc.splitlines()[0] if doc else ''}")
            c = p.contract
            lines.append(f"    requires: {', '.join(c.requires) or '-'}; provides: {', '.join(c.provides) or '-'}")
            if c.after:
                lines.append(f"    after (reads when present): {', '.join(c.after)}")
    lines.append("facts:")
    lines += [f"  {name}: {meaning}" for name, meaning in FACTS.items()]
    return "\n".join(lines)
