"""Evaluation of a converted SNN on data: accuracy at every T from one run, firing rates, synaptic
operations and an energy estimate beside the ANN's multiply-accumulates.

Energy constants (Horowitz, ISSCC 2014, 45 nm, 32-bit float): 4.6 pJ per multiply-accumulate (MAC),
0.9 pJ per accumulate (AC). A layer fed by spikes does one AC per input event and fan-out
(MACs x fraction of non-zero inputs, per step); a layer fed by analog values (the hoisted input layer)
does MACs, once per step it runs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm import tqdm

from snnconv.model import SpikingModel
from snnconv.passes.fold_batchnorm import FoldedBN
from snnconv.runtime.integer_spikes import SpikeLayer

E_MAC_PJ, E_AC_PJ = 4.6, 0.9
_COMPUTE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, FoldedBN, SpikeLayer)


def _macs(module: nn.Module, out: torch.Tensor) -> float:
    """Multiply-accumulates of one call, over the whole batch."""
    layer = module.inner if isinstance(module, SpikeLayer) else module
    layer = layer._layer if isinstance(layer, FoldedBN) else layer
    if isinstance(layer, nn.Linear):
        return out.numel() * layer.in_features
    k = layer.weight[0].numel()  # in_channels / groups * kernel elements
    return out.numel() * k


def evaluate(
    snn: SpikingModel,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch: int = 256,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict:
    """Run `snn` for snn.T steps on x (and the ANN on it), batch by batch on `device`; returns accuracies
    by T, firing rates and op counts."""
    snn.to(device)
    T, gm = snn.T, snn.graph_module
    compute = [m for m in gm.modules() if isinstance(m, _COMPUTE)]
    neurons = snn.neurons()
    counts = {"ann_macs": 0.0, "snn_acs": 0.0, "snn_macs": 0.0}
    spikes = {n: 0.0 for n in neurons}
    sizes = {n: 0.0 for n in neurons}
    state = {"mode": "ann", "n": 0}

    def on_compute(m, i, o):
        macs = _macs(m, o)
        if state["mode"] == "ann":
            counts["ann_macs"] += macs
        elif i[0].shape[0] == state["n"] and T > 1:  # step-invariant analog input: runs once on [N]
            counts["snn_macs"] += macs
        else:
            counts["snn_acs"] += macs * (i[0] != 0).float().mean()  # a tensor: no device sync per call

    def on_neuron(name):
        def hook(m, i, o):
            if state["mode"] == "snn":
                spikes[name] += (o != 0).sum()
                sizes[name] += o.numel()

        return hook

    for m in neurons.values():  # count this run's calls only
        m.calls.update(kernel=0, torch=0)
    hooks = [m.register_forward_hook(on_compute) for m in compute]
    hooks += [m.register_forward_hook(on_neuron(n)) for n, m in neurons.items()]
    steps_out, ann_pred = [], []
    try:
        with torch.no_grad():
            for xb in tqdm(x.split(batch), desc=f"SNN T={T}", disable=not progress, leave=False):
                xb = xb.to(device)
                state.update(mode="ann", n=len(xb))
                ann_pred.append(gm(xb).argmax(-1))  # the prepared graph in ANN mode is the ANN
                state["mode"] = "snn"
                steps_out.append(snn(xb, per_step=True).cumsum(0).argmax(-1))
    finally:
        for h in hooks:
            h.remove()
    n = len(x)
    result = {
        "T": T,
        "samples": n,
        "firing_rates": {k: float(spikes[k]) / max(sizes[k], 1) for k in neurons},
        "ann_macs": counts["ann_macs"] / n,
        "snn_acs": float(counts["snn_acs"]) / n,
        "snn_macs": counts["snn_macs"] / n,
        "device": str(device),
        "neuron_calls": {k: dict(m.calls) for k, m in neurons.items()},  # fused CUDA kernel vs torch backend
    }
    result["ann_energy_uj"] = result["ann_macs"] * E_MAC_PJ * 1e-6
    result["snn_energy_uj"] = (result["snn_acs"] * E_AC_PJ + result["snn_macs"] * E_MAC_PJ) * 1e-6
    if y is not None:
        pred = torch.cat(steps_out, 1).cpu()
        result["accuracy_by_T"] = ((pred == y).float().mean(1) * 100).tolist()
        result["ann_accuracy"] = (torch.cat(ann_pred).cpu() == y).float().mean().item() * 100
    return result


def format_report(r: dict) -> str:
    lines = []
    if "accuracy_by_T" in r:
        ts = sorted({t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= r["T"]} | {r["T"]})
        lines += [
            f"accuracy on {r['samples']} samples (ANN: {r['ann_accuracy']:.2f}%)",
            "  " + "".join(f"{'T=' + str(t):>9}" for t in ts),
            "  " + "".join(f"{r['accuracy_by_T'][t - 1]:9.2f}" for t in ts),
            "",
        ]
    calls = r.get("neuron_calls", {})
    kernel, total = sum(c["kernel"] for c in calls.values()), sum(c["kernel"] + c["torch"] for c in calls.values())
    if total:
        share = f"neuron calls on the fused CUDA kernel: {kernel} of {total} ({100 * kernel / total:.0f}%)"
        slow = [k for k, c in calls.items() if c["torch"]]
        where = f" on {r['device']}" + (f"; torch backend for {', '.join(slow)}" if kernel and slow else "")
        lines += [share + where, ""]
    lines.append(f"firing rates (spikes per neuron per step, T={r['T']}):")
    for name, rate in r["firing_rates"].items():
        lines.append(f"  {name:<32}{rate:8.4f}")
    lines += [
        "",
        "operations per sample:",
        f"  ANN:  {r['ann_macs'] / 1e6:10.2f} M MACs                      -> {r['ann_energy_uj']:.3f} uJ",
        f"  SNN:  {r['snn_acs'] / 1e6:10.2f} M ACs + {r['snn_macs'] / 1e6:8.2f} M MACs over T={r['T']}"
        f" -> {r['snn_energy_uj']:.3f} uJ",
        f"  energy constants: {E_MAC_PJ} pJ/MAC, {E_AC_PJ} pJ/AC (45 nm, Horowitz 2014)",
    ]
    return "\n".join(lines)
