"""Pass contracts: what each pass needs to find in the graph and what it leaves there.

A fact is a named promise about the graph, recorded in `gm.meta["snn_facts"]` by the pass (or the front
end) that makes it true; the details live on the nodes (node.meta keys below). Passes talk only through
facts: none recognises another pass's module types or planted calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.fx as fx

from snnconv.errors import ConversionError

# fact -> what it promises (and where the details live)
FACTS = {
    "ops_classified": "every node has node.meta['snn_kind'] (activation, maxpool, linear, value, ...): the front end",
    "batch_sizes_folded": "reshapes read the batch size of the tensor they reshape (N or T * N), not the input's",
    "identities_removed": "no dropout or identity nodes are left",
    "neurons_lowered": "every activation is a Neuron call, node.meta['snn_kind'] == 'neuron'",
    "maxpool_on_currents": "every max pool is a SpikeMaxPool call on a neuron's input, snn_kind 'maxpool'",
    "spike_inputs": "every conv/linear/weight matmul reading a compensated op's value reads a neuron instead: a "
    "two-sided one (node.meta['two_sided']) where the ANN had no activation there",
    "compensated": "every op a neuron cannot represent (snn_kind 'compensated') reads running means of its "
    "time-varying inputs (snn_kind 'running_mean') and is read through a 'running_diff'",
    "batchnorm_folded": "conv/linear + BN pairs are one call; node.meta['snn_layer'] names its conv/linear",
    "time_folded": "the input is broadcast over time (node.meta['snn_kind'] == 'broadcast'): [T * N, ...]",
    "static_region_marked": "node.meta['step_invariant'] says whether a node's value is the same at every step; "
    "neurons and max pools have node.meta['static_input']",
    "layout_planned": "convolutions have node.meta['layout']; NCHW copies before them have snn_kind 'layout_copy'",
    "int8_packed": "layers reading binary spikes run as int8 SpikeLayers (node.meta['int8']); a neuron only they "
    "read has node.meta['int8_only']",
    "inplace_adds": "residual adds write into a private left operand",
    "residuals_in_neurons": "a sum of two tensors only a neuron reads is that neuron's second input, neuron(a, b); "
    "node.meta['residual_source'] names b's neuron where b is one",
}


@dataclass(frozen=True)
class Contract:
    requires: tuple[str, ...] = ()  # facts that must hold before the pass runs
    provides: tuple[str, ...] = ()  # facts that hold after it
    after: tuple[str, ...] = ()  # facts it reads when present: passes providing them must run before it


def facts(gm: fx.GraphModule) -> set[str]:
    return gm.meta.setdefault("snn_facts", set())


def mark(gm: fx.GraphModule, *names: str) -> None:
    """Record facts the graph now satisfies (the front end marks 'ops_classified')."""
    unknown = set(names) - set(FACTS)
    if unknown:
        raise ValueError(f"unknown facts {sorted(unknown)}")
    facts(gm).update(names)


def contract(requires=(), provides=(), after=()):
    """Declare a pass's contract. Running it on a graph without a required fact raises, naming the fact."""
    for name in (*requires, *provides, *after):
        if name not in FACTS:
            raise ValueError(f"unknown fact {name!r}")

    def wrap(fn):
        @functools.wraps(fn)
        def run(gm: fx.GraphModule, settings) -> fx.GraphModule:
            missing = [f for f in requires if f not in facts(gm)]
            if missing:
                raise ConversionError(
                    f"pass {fn.__name__} needs the fact(s) {missing} ({'; '.join(FACTS[f] for f in missing)}), "
                    "which the graph does not have: run the passes that provide them first (see "
                    "snnconv.passes.describe())"
                )
            gm = fn(gm, settings)
            mark(gm, *provides)
            return gm

        run.contract = Contract(tuple(requires), tuple(provides), tuple(after))
        return run

    return wrap


def check_order(passes, given=("ops_classified",)) -> None:
    """Check a pipeline before running it: every required fact is provided by an earlier pass (or given),
    and every pass that provides a fact another reads when present runs before that reader."""
    have = set(given)
    for i, p in enumerate(passes):
        c = p.contract
        missing = [f for f in c.requires if f not in have]
        if missing:
            raise ConversionError(
                f"pass {p.__name__} needs {missing}, which no pass before it provides; pipeline: "
                f"{[q.__name__ for q in passes]}"
            )
        for later in passes[i + 1 :]:
            early = [f for f in later.contract.provides if f in c.after]
            if early:
                raise ConversionError(
                    f"pass {p.__name__} reads {early} when present, so {later.__name__}, which provides it, "
                    f"must run before it; pipeline: {[q.__name__ for q in passes]}"
                )
        have.update(c.provides)
