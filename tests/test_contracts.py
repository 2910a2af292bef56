"""Pass contracts: each pass states the facts it requires and provides; a pass run without one of its
facts raises naming it, and a pipeline in the wrong order is refused before it runs."""

import pytest
import torch
from nets import ResCatNet, randomize_bn

import snnconv
from snnconv import ConversionError, passes
from snnconv.passes.contract import FACTS, check_order
from snnconv.settings import Settings
from snnconv.trace import annotate, trace

ALL = passes.PREPARE + passes.LOWER


def _graph():
    x = torch.rand(2, 3, 16, 16)
    gm = annotate(trace(randomize_bn(ResCatNet()), x), x)
    return gm, Settings(input_ndim=4, input_shape=(3, 16, 16))


def test_every_pass_declares_known_facts_and_the_built_pipeline_is_ordered():
    provided = {"ops_classified"}
    for p in ALL:
        c = p.contract
        assert set(c.requires) | set(c.provides) | set(c.after) <= set(FACTS), p.__name__
        assert set(c.requires) <= provided, p.__name__
        provided |= set(c.provides)
    assert provided == set(FACTS)  # every fact is provided by someone
    text = passes.describe()
    for p in ALL:
        assert f"{p.__name__}" in text and f"provides: {', '.join(p.contract.provides)}" in text
    assert all(f"  {f}: " in text for f in FACTS)


@pytest.mark.parametrize("p", ALL, ids=lambda p: p.__name__)
def test_pass_without_a_required_fact_names_it(p):
    for fact in p.contract.requires:
        gm, settings = _graph()
        passes.mark(gm, *(set(FACTS) - {fact}))
        with pytest.raises(ConversionError, match=rf"pass {p.__name__} needs the fact\(s\) \['{fact}'\]"):
            p(gm, settings)


def test_converted_graph_carries_every_fact_of_its_passes():
    snn = snnconv.convert(randomize_bn(ResCatNet()), T=2, calib=torch.rand(4, 3, 16, 16))
    assert passes.facts(snn.graph_module) == set(FACTS)
    snn = snnconv.convert(randomize_bn(ResCatNet()), T=2, calib=torch.rand(4, 3, 16, 16), passes=[])
    assert passes.facts(snn.graph_module) == {
        "ops_classified",
        "batch_sizes_folded",
        "identities_removed",
        "neurons_lowered",
        "maxpool_on_currents",
        "spike_inputs",
        "compensated",
        "time_folded",
    }


def test_pipeline_order_is_checked_before_running():
    p = {q.__name__: q for q in ALL}
    with pytest.raises(ConversionError, match=r"commute_maxpool needs \['neurons_lowered'\]"):
        check_order([p["remove_identity"], p["commute_maxpool"], p["lower_activations"]])
    # integer_spikes reads layout copies when channels_last ran: channels_last must come first
    prepared = [p["remove_identity"], p["lower_activations"], p["commute_maxpool"], p["broadcast_input"]]
    with pytest.raises(ConversionError, match=r"integer_spikes reads \['layout_planned'\].*channels_last"):
        check_order([*prepared, p["integer_spikes"], p["channels_last"]])
    check_order([*prepared, p["channels_last"], p["integer_spikes"]])
    # the runner checks the enabled passes against the facts the graph already has
    gm, settings = _graph()
    with pytest.raises(ConversionError, match=r"fold_batch_sizes needs \['ops_classified'\]"):
        passes.run(passes.PREPARE, gm, settings)


def test_layout_and_fold_facts_on_nodes():
    """The facts later passes read live on the nodes: folded layers name their conv, convolutions their layout."""
    snn = snnconv.convert(
        randomize_bn(ResCatNet()), T=2, calib=torch.rand(4, 3, 8, 8), passes=["fold_batchnorm", "channels_last"]
    )
    nodes = list(snn.graph_module.graph.nodes)
    folded = [n for n in nodes if "snn_layer" in n.meta]
    assert folded and all(n.meta["fresh_output"] for n in folded)
    assert {n.meta["snn_layer"] for n in folded} >= {"stem.0", "a1"}  # the two conv + BN pairs
    layouts = {
        n.meta["snn_layer"] if "snn_layer" in n.meta else n.target: n.meta["layout"]
        for n in nodes
        if "layout" in n.meta
    }
    assert layouts["stem.0"] == "channels_last" and layouts["a2"] == "nchw"  # 8x8 input maps; 4x4 after the pool
    copies = [n for n in nodes if n.meta.get("snn_kind") == "layout_copy"]
    assert copies and all(n.target == "contiguous" for n in copies)


def test_contract_declares_checks_and_marks():
    """A pass declared with contract(): its contract is recorded as given, unknown facts are refused when it
    is declared, a missing fact when it runs, and what it provides is marked on the graph after it ran."""
    from snnconv.passes.contract import Contract, contract

    ran = []

    def toy(gm, settings):
        """A pass that only records that it ran."""
        ran.append(gm)
        return gm

    declared = contract(requires=("neurons_lowered",), provides=("inplace_adds",), after=("int8_packed",))(toy)
    assert declared.contract == Contract(("neurons_lowered",), ("inplace_adds",), ("int8_packed",))
    assert declared.__name__ == "toy" and declared.__doc__ == toy.__doc__
    for where in ("requires", "provides", "after"):
        with pytest.raises(ValueError, match="unknown fact 'no_such_fact'"):
            contract(**{where: ("no_such_fact",)})
    gm, settings = _graph()
    with pytest.raises(ConversionError, match=r"pass toy needs the fact\(s\) \['neurons_lowered'\]"):
        declared(gm, settings)
    assert ran == [] and "inplace_adds" not in passes.facts(gm)
    passes.mark(gm, "neurons_lowered")
    assert declared(gm, settings) is gm and ran == [gm]
    assert passes.facts(gm) >= {"neurons_lowered", "inplace_adds"}


def test_describe_lists_each_stage_in_order_with_its_contract():
    import sys

    lines = passes.describe().splitlines()
    for stage, stage_passes in (("prepare", passes.PREPARE), ("lower", passes.LOWER)):
        for i, p in enumerate(stage_passes, 1):
            opt = " (optional)" if p.__name__ in passes.OPTIONAL else ""
            summary = sys.modules[p.__module__].__doc__.strip().splitlines()[0]
            at = lines.index(f"{stage} {i}. {p.__name__}{opt}: {summary}")
            c = p.contract
            assert lines[at + 1] == f"    requires: {', '.join(c.requires) or '-'}; provides: {', '.join(c.provides)}"
            if c.after:
                assert lines[at + 2] == f"    after (reads when present): {', '.join(c.after)}"
    assert lines[lines.index("facts:") + 1 :] == [f"  {f}: {meaning}" for f, meaning in FACTS.items()]


def test_folded_batchnorm_names_its_layers_and_sizes_keep_their_tail():
    from snnconv.passes.fold_batch_sizes import with_batch

    snn = snnconv.convert(randomize_bn(ResCatNet()), T=2, calib=torch.rand(4, 3, 8, 8), passes=["fold_batchnorm"])
    folded = [m for m in snn.graph_module.modules() if type(m).__name__ == "FoldedBN"]
    assert sorted(m.extra_repr() for m in folded) == ["a1 + bn1", "stem.0 + stem.1"]
    assert with_batch(torch.Size([3, 4, 5]), 12) == (12, 4, 5) and with_batch((2,), 6) == (6,)
