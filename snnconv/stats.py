"""The report of an evaluation (snnconv.evaluate): accuracy by T, firing rates, operations and energy."""

from __future__ import annotations

from snnconv.evaluate import E_AC_PJ, E_MAC_PJ


def format_report(r: dict) -> str:
    ts = sorted({t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= r["T"]} | set(r.get("Ts", [r["T"]])))
    rows = [  # % of samples at each T: the labels' class is the SNN's; the ANN's class is the SNN's top 1, top 5
        (name, r[key])
        for name, key in (
            ("accuracy", "accuracy_by_T"),
            ("SNN top-1 = ANN top-1", "agreement_by_T"),
            ("ANN top-1 in SNN top-5", "agreement_top5_by_T"),
        )
        if key in r
    ]
    if "accuracy_by_T" in r:
        title = f"accuracy on {r['samples']} samples (ANN: {r['ann_accuracy']:.2f}%), and agreement with the ANN, %:"
    else:
        title = f"agreement with the ANN on {r['samples']} samples (no labels: no accuracy), %:"
    lines = [title, " " * 24 + "".join(f"{'T=' + str(t):>9}" for t in ts)]
    lines += [f"  {name:<22}" + "".join(f"{v[t - 1]:9.2f}" for t in ts) for name, v in rows]
    lines.append("")
    calls = r.get("neuron_calls", {})
    cuda, cpu = sum(c["kernel"] for c in calls.values()), sum(c["cpu"] for c in calls.values())
    kernel = cuda + cpu
    total = kernel + sum(c["torch"] for c in calls.values())
    if total:
        kind = "CUDA" if not cpu else "CPU" if not cuda else "CUDA/CPU"
        share = f"neuron calls on the fused {kind} kernel: {kernel} of {total} ({100 * kernel / total:.0f}%)"
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
        + (f" + {r['snn_float_ops'] / 1e6:.2f} M float ops (compensated: not spikes)" if r.get("snn_float_ops") else "")
        + f" -> {r['snn_energy_uj']:.3f} uJ",
        f"  energy constants: {E_MAC_PJ} pJ/MAC, {E_AC_PJ} pJ/AC (45 nm, Horowitz 2014)",
    ]
    return "\n".join(lines)
