"""NIR (Neuromorphic Intermediate Representation, PyPI `nir`) export and import.

Export (`to_nir`) writes the spiking graph so that the file alone, read by NIR's node definitions (discrete
time, dt = 1: `dv/dt = r·I` steps as `v += r·I`; an edge that closes a cycle carries the previous step's
value), computes what the SNN computes. Each neuron layer becomes (the default, `neuron="I"`):
- an integrator `I` (r = 1) holding the membrane shifted by the initial membrane: v = u - v_init·θ starts at 0,
  as every NIR state does;
- a `Threshold` at θ(1 - v_init) lowered by one float32 step, so that NIR's `v > threshold` fires where ours
  `u >= θ` does, emitting 0/1 spikes (at most one a step);
- an edge back into the integrator through `Scale(-θ)`: reset by subtraction, applied before the next step's
  comparison;
- a `Scale(θ)`: our spikes carry the value θ.
Convolutions and linear layers carry BatchNorm folded in (int8 layers: the rounded weights they sum), and a
neuron's calibrated bias is folded into the layer feeding it; average pooling is `SumPool2d` then
`Scale(1/k²)`; residual adds are several edges into one node (NIR sums a node's inputs); flatten is `Flatten`.
Ops NIR cannot express (max pooling, concat, LIF/hard reset/burst neurons, ...) are refused with the node
named.

`neuron="IF"` writes each neuron layer as one `IF` node (r = 1, v_threshold = θ) followed by a diagonal
1x1 `Conv2d` / `Affine` of weight θ, for targets that need `IF` (Sinabs). NIR's `IF` does not say what our
neuron does (NIR 1.0.4: it fires on `v > θ` from v = 0; from 1.0.6 on it resets to `v_reset`, 0): a
consumer must be told the metadata's `v_init` and spike rule.

The graph's metadata under "snnconv" says how the graph is read out (the mean of the output over T steps
after `readout_delay`, the same input at every step), and what only `from_nir` needs to rebuild the same
SNN: each node's op and the conversion's passes (e.g. whether the layers were int8).

Import (`from_nir`) builds an ANN-shaped graph from the NIR nodes (Affine, Linear, Conv2d, SumPool2d,
AvgPool2d, Flatten, Scale, IF, the I/Threshold/reset cycle above, Input, Output) and converts it with
snnconv, so the graph runs in snnconv's runtime (time folded into the batch, fused neuron kernels). An IF
from another framework starts at v = 0 and emits spikes of value 1.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from snnconv.errors import ConversionError
from snnconv.runtime.modules import FoldedBN

_FORMAT = 2  # version of the "snnconv" metadata block
FORMS = ("I", "IF")  # how to_nir writes a neuron layer (module docstring)


def _nir():
    try:
        import nir
    except ImportError as exc:
        raise ConversionError("NIR export and import need the nir package: pip install 'snnconv[nir]'") from exc
    return nir


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().float().numpy())


def _pair(v) -> np.ndarray:
    a = np.atleast_1d(np.asarray(v)).astype(int)
    return np.repeat(a, 2) if a.size == 1 else a


def _ints(v) -> tuple[int, ...]:
    return tuple(int(x) for x in _pair(v))


class _Exporter:
    """Walks the SNN's graph once; every fx node maps to the list of NIR nodes whose outputs sum to it."""

    def __init__(self, snn, form: str):
        self.nir, self.snn, self.gm, self.form = _nir(), snn, snn.graph_module, form
        self.nodes: dict = {}
        self.edges: list[tuple[str, str]] = []
        self.ops: dict[str, dict] = {}  # how to rebuild each node exactly (from_nir)
        self.terms: dict[fx.Node, list[str]] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.same: dict[fx.Node, bool] = {}  # the node's output equals its one tensor input (layout ops)

    def fail(self, node: fx.Node, why: str):
        raise ConversionError(f"NIR export: node {node.name} ({node.format_node()}): {why}")

    def add(self, name: str, obj, srcs: list[str], op: dict | None = None) -> list[str]:
        name = name.replace(".", "_")
        while name in self.nodes:
            name += "_"
        self.nodes[name] = obj
        self.edges += [(s, name) for s in srcs]
        if op is not None:
            self.ops[name] = op
        return [name]

    def scale(self, name: str, shape: tuple[int, ...], value: torch.Tensor, srcs, op: dict):
        """A per-channel scale (θ, 1/k², a scalar): NIR's `Scale`; in the IF form a diagonal layer (Sinabs
        imports no `Scale`)."""
        nir = self.nir
        c = shape[0]
        v = value.detach().float().reshape(-1).expand(c) if value.numel() == 1 else value.detach().float()
        if self.form == "I":
            full = v.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)
            return self.add(name, nir.Scale(scale=_np(full.contiguous())), srcs, op)
        if len(shape) == 1:
            return self.add(name, nir.Affine(weight=np.diag(_np(v)), bias=np.zeros(c, np.float32)), srcs, op)
        if len(shape) == 3:
            conv = nir.Conv2d(  # a diagonal 1x1 convolution: Sinabs imports no grouped one
                input_shape=tuple(shape[1:]),
                weight=np.diag(_np(v)).reshape(c, c, 1, 1),
                stride=1,
                padding=0,
                dilation=1,
                groups=1,
                bias=np.zeros(c, np.float32),
            )
            return self.add(name, conv, srcs, op)
        raise ConversionError(f"NIR export: a scale on a tensor of shape {shape} is not supported")

    def layer(self, node: fx.Node, m: nn.Module, srcs: list[str], w=None, b=None, op=None) -> list[str]:
        nir = self.nir
        w = m.weight if w is None else w
        b = (m.bias if m.bias is not None else torch.zeros(w.shape[0])) if b is None else b
        if isinstance(m, nn.Linear):
            return self.add(node.name, nir.Affine(weight=_np(w), bias=_np(b)), srcs, op)
        if isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple):
            conv = nir.Conv2d(
                input_shape=tuple(self.shapes[node.args[0]][1:]),
                weight=_np(w),
                stride=_pair(m.stride),
                padding=_pair(m.padding),
                dilation=_pair(m.dilation),
                groups=m.groups,
                bias=_np(b),
            )
            return self.add(node.name, conv, srcs, op)
        self.fail(node, f"{type(m).__name__} has no NIR form here (Conv2d, Linear are exported)")

    def int8_layer(self, node: fx.Node, m, src: list[str]) -> list[str]:
        """The float layer with the weights the int8 layer sums, (s · integers) / θ of each input, so that the
        file computes what the SNN does; its float weights, which from_nir lowers again, go to the metadata."""
        from snnconv.runtime.integer_spikes import fold_input_scale

        inner = m.inner
        w, b = m._layer.folded() if isinstance(m._layer, FoldedBN) else (inner.weight, inner.bias)
        theta = m._neuron.threshold.detach().double().cpu()
        *_, whole, s = m._derive(theta, None)
        spread = fold_input_scale(torch.ones(w.shape, dtype=torch.float64), theta)
        summed = s.view(-1, *([1] * (w.dim() - 1))) * whole.view(w.shape) / spread
        in_shape = self.shapes[node.args[0]]
        if m.flatten and len(in_shape) > 1:  # the layer reads the maps themselves
            flat = self.nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=0, end_dim=-1)
            src = self.add(f"{node.name}.flatten", flat, src, {"op": "flatten"})
        return self.layer(node, inner, src, summed.float(), b, {"op": "int8", "weight": _np(w)})

    def run(self):
        nir, gm, s = self.nir, self.gm, self.snn.settings
        cfg = s.neuron
        if cfg.kind != "if" or cfg.reset != "soft" or cfg.max_spikes != 1 or cfg.signed:
            raise ConversionError(
                "NIR export: only IF neurons with reset by subtraction and binary, unsigned spikes are exported "
                f"(this SNN has neuron={cfg.kind!r}, reset={cfg.reset!r}, max_spikes={cfg.max_spikes}, "
                f"signed_spikes={cfg.signed}); convert with signed_spikes=False for NIR"
            )
        self._shapes(torch.rand(1, *s.input_shape, generator=torch.Generator().manual_seed(0)))
        for node in gm.graph.nodes:
            self.visit(node)
        if self.form == "I":
            spike = "as the graph says (I, Threshold, reset edge through Scale(-θ)); dt = 1"
        else:  # what NIR's IF does not say
            spike = "IF: v starts at v_init·θ, fires on v >= v_threshold (at most once a step), reset by subtraction"
        meta = {
            "format": _FORMAT,
            "neuron": self.form,
            "T": s.T,
            "readout": "mean of the output over T steps after readout_delay",
            "readout_delay": s.readout_delay,
            "v_init": cfg.v_init,
            "spike": spike,
            "input": "the same input at every step (direct encoding)",
            # for from_nir only: how snnconv lowered this SNN (None: all passes; the int8 layers are one)
            "lowering": json.dumps({"passes": None if s.passes is None else list(s.passes)}),
            "ops": self.ops,
        }
        return nir.NIRGraph(nodes=self.nodes, edges=self.edges, metadata={"snnconv": meta})

    def _shapes(self, x: torch.Tensor) -> None:
        shapes, same = self.shapes, self.same

        class _Shapes(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if isinstance(out, torch.Tensor):
                    shapes[n] = tuple(out.shape[1:]) if out.dim() else ()
                    ins = [self.env[a] for a in n.all_input_nodes if isinstance(self.env[a], torch.Tensor)]
                    # layout-only ops (memory format, contiguous, copies) pass their input through
                    same[n] = len(ins) == 1 and ins[0].shape == out.shape and torch.equal(ins[0], out)
                return out

        with torch.no_grad():
            _Shapes(self.gm).run(x)

    def visit(self, node: fx.Node) -> None:
        from snnconv.runtime.modules import Neuron, SpikeMaxPool, TimeBroadcast

        nir, gm, terms = self.nir, self.gm, self.terms
        if node.op == "placeholder":
            terms[node] = self.add("input", nir.Input(input_type={"input": np.array(self.shapes[node])}), [])
            return
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out not in terms:
                self.fail(node, "only one tensor output is exported")
            shape = np.array(self.shapes[out])
            self.add("output", nir.Output(output_type={"output": shape}), terms[out])
            return
        if node.op == "get_attr" or node not in self.shapes:  # constants and shape arithmetic
            return
        args = [a for a in node.args if isinstance(a, fx.Node) and a in terms]
        if not args:  # a tensor that does not depend on the input (parameter-only subgraph)
            self.fail(node, "a tensor computed without the input cannot be exported")
        src = terms[args[0]]
        shape = self.shapes[node]
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if hasattr(m, "_neuron"):  # an int8 layer over spikes (runtime/integer_spikes.py)
                terms[node] = self.int8_layer(node, m, src)
            elif isinstance(m, Neuron):  # a second input (a residual, passes/residual_into_neuron.py) adds to the first
                terms[node] = self.neuron(node, m, [t for a in args for t in terms[a]], shape)
            elif isinstance(m, (TimeBroadcast, nn.Identity, nn.Dropout)):
                terms[node] = src
            elif isinstance(m, FoldedBN):
                w, b = m.folded()
                terms[node] = self.layer(node, m._layer, src, w, b)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                terms[node] = self.layer(node, m, src)
            elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                terms[node] = self.avg_pool(node, m, src, shape)
            elif isinstance(m, nn.Flatten):
                terms[node] = self.flatten(node, src, shape)
            elif isinstance(m, (SpikeMaxPool, nn.MaxPool2d)):
                self.fail(node, "max pooling has no NIR form (NIR has no max pool); use average pooling")
            else:
                self.fail(node, f"module {type(m).__name__} has no NIR form")
            return
        target = node.target
        if target in (operator.add, operator.iadd, torch.add, "add", "add_"):
            if len(args) != 2 or node.kwargs.get("alpha", 1) != 1:
                self.fail(node, "only the sum of two tensors is exported")
            terms[node] = terms[args[0]] + terms[args[1]]
        elif target in (torch.flatten, "flatten", "view", "reshape", torch.reshape):
            terms[node] = src if self.shapes[args[0]] == shape else self.flatten(node, src, shape)
        elif target in (F.avg_pool2d, F.adaptive_avg_pool2d):
            terms[node] = self.avg_pool(node, None, src, shape)
        elif target in (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"):
            factor = node.args[1] if len(node.args) > 1 else None
            if not isinstance(factor, (int, float)) or node.args[0] is not args[0]:
                self.fail(node, "only scaling by a number is exported")
            factor = 1.0 / factor if target in (operator.truediv, torch.div, "div") else float(factor)
            op = {"op": "mul", "factor": float(factor)}
            terms[node] = self.scale(node.name, shape, torch.tensor(factor), src, op)
        elif self.same.get(node):
            terms[node] = src
        else:
            name = getattr(target, "__name__", str(target))
            self.fail(node, f"{name} has no NIR form (exported: conv, linear, IF, add, flatten, avg pooling)")

    def neuron(self, node: fx.Node, m, src: list[str], shape) -> list[str]:
        nir = self.nir
        theta = m.threshold.detach().float().cpu()
        full = theta.view(-1, *([1] * (len(shape) - 1))).expand(shape) if theta.dim() else theta.expand(shape)
        if m.bias is not None:  # the calibrated current: folded into the layer that feeds the neuron
            feeder = next((f for f in src if hasattr(self.nodes[f], "bias") and self._only_feeds(f, node)), None)
            if feeder is None:
                self.fail(node, "a calibrated bias needs a conv/linear layer that feeds only this neuron")
            obj = self.nodes[feeder]
            self.ops[feeder] = {**self.ops.get(feeder, {}), "bias": obj.bias.copy(), "neuron_bias": _np(m.bias)}
            nb = _np(m.bias).reshape(-1)
            obj.bias = (obj.bias + (nb if nb.size > 1 else np.full_like(obj.bias, nb.item()))).astype(np.float32)
        op, ones, full = {"per_channel": theta.dim() > 0}, np.ones(shape, np.float32), _np(full.contiguous())
        if self.form == "IF":
            spikes = self.add(node.name, nir.IF(r=ones, v_threshold=full), src, {"op": "if", **op})
        else:
            name = self.add(node.name, nir.I(r=ones), src, {"op": "integrator", **op})
            # v = u - v_init·θ fires where u >= θ: v >= θ - v_init·θ, i.e. v > the float32 just below it
            v0 = (np.float32(self.snn.settings.neuron.v_init) * full).astype(np.float32)
            fire = np.nextafter((full - v0).astype(np.float32), np.float32(-np.inf))
            spikes = self.add(f"{node.name}.spike", nir.Threshold(threshold=fire), name, {"op": "threshold"})
            reset = self.add(f"{node.name}.reset", nir.Scale(scale=-full), spikes, {"op": "reset"})
            self.edges.append((reset[0], name[0]))
        return self.scale(f"{node.name}.spike_value", shape, theta, spikes, {"op": "spike_value"})

    def _only_feeds(self, name: str, neuron: fx.Node) -> bool:
        """Does NIR node `name` reach nothing but `neuron` (directly or through adds)?"""
        cur = next((n for n, t in self.terms.items() if t == [name]), None)
        while cur is not None and len(cur.users) == 1:
            (cur,) = cur.users
            if cur is neuron:
                return True
            if name not in self.terms.get(cur, ()):
                return False
        return False

    def flatten(self, node: fx.Node, src: list[str], shape) -> list[str]:
        in_shape = self.shapes[node.args[0]]
        if len(shape) != 1:
            self.fail(node, f"reshape {in_shape} -> {shape}: only flattening to features is exported")
        obj = self.nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=0, end_dim=-1)
        return self.add(node.name, obj, src, {"op": "flatten"})

    def avg_pool(self, node: fx.Node, m, src: list[str], shape) -> list[str]:
        in_shape = self.shapes[node.args[0]]
        if isinstance(m, nn.AvgPool2d):
            k, st, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
            if m.divisor_override or (p.any() and m.count_include_pad is False) or m.ceil_mode:
                self.fail(node, "average pooling with divisor_override, ceil_mode or uncounted padding")
        else:  # adaptive (module or function) or F.avg_pool2d: only where it is a plain pooling window
            size = m.output_size if m is not None else node.args[1] if len(node.args) > 1 else None
            if node.target is F.avg_pool2d:
                ks = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
                k = _pair(ks)
                st = _pair(node.args[2] if len(node.args) > 2 else node.kwargs.get("stride") or ks)
                p = _pair(node.args[3] if len(node.args) > 3 else node.kwargs.get("padding", 0))
            else:
                out = np.array(shape[1:])
                if size is None or np.any(np.array(in_shape[1:]) % out):
                    self.fail(node, f"adaptive pooling {in_shape} -> {shape} is not one fixed window")
                k = st = np.array(in_shape[1:]) // out
                p = np.zeros(2, dtype=int)
        pool = self.nir.SumPool2d(kernel_size=k, stride=st, padding=p)
        op = {"op": "avg_pool", "kernel_size": k, "stride": st, "padding": p}
        name = self.add(node.name, pool, src, op)
        divisor = torch.tensor(1.0 / float(np.prod(k)))
        return self.scale(f"{node.name}.divisor", shape, divisor, name, {"op": "avg_divisor"})


def to_nir(snn, neuron: str = "I"):
    """The SNN as a `nir.NIRGraph`. neuron="I": each neuron layer as NIR's integrator, threshold and reset
    edge, which NIR's definitions run as the SNN runs; "IF": as NIR `IF` nodes, for targets that need them
    (module docstring)."""
    from snnconv.model import SpikingModel

    if not isinstance(snn, SpikingModel):
        raise ConversionError(f"to_nir takes a SpikingModel from snnconv.convert, got {type(snn).__name__}")
    if neuron not in FORMS:
        raise ConversionError(f"to_nir: neuron must be one of {list(FORMS)}, got {neuron!r}")
    snn.refuse_float_ops("NIR export (NIR 1.0 has no softmax, LayerNorm or product node)")
    return _Exporter(snn, neuron).run()


def write_nir(snn, path: str | Path, neuron: str = "I") -> None:
    """to_nir(snn, neuron) written with nir.write (HDF5), atomically."""
    from snnconv.io import atomic_write

    graph = to_nir(snn, neuron)
    atomic_write(Path(path), lambda tmp: _nir().write(tmp, graph))


# ---------------------------------------------------------------- import


class _SumPool(nn.AvgPool2d):
    """NIR's SumPool2d: an average pool that does not divide."""

    def __init__(self, kernel_size, stride, padding):
        super().__init__(tuple(kernel_size), tuple(stride), tuple(padding), divisor_override=1)


def _scale_module(value: np.ndarray, shape: tuple[int, ...]) -> nn.Module:
    """Multiply by a per-channel value as a module the front end knows (depthwise 1x1 conv, or diagonal)."""
    v = torch.as_tensor(np.asarray(value, np.float32)).reshape(-1)
    c = shape[0]
    v = v.expand(c).clone() if v.numel() == 1 else v
    if len(shape) == 1:
        m = nn.Linear(c, c)
        m.weight.data, m.bias.data = torch.diag(v), torch.zeros(c)
    else:
        m = nn.Conv2d(c, c, 1, groups=c)
        m.weight.data, m.bias.data = v.reshape(c, 1, 1, 1), torch.zeros(c)
    return m


def _per_channel(values, name: str, what: str) -> torch.Tensor:
    """One value per channel from an array over the layer's shape (NIR stores one per neuron)."""
    th = np.asarray(values, np.float32)
    if th.ndim <= 1:
        return torch.as_tensor(th.reshape(-1).copy())
    flat = th.reshape(th.shape[0], -1)
    if not (flat == flat[:, :1]).all():
        raise ConversionError(f"NIR import: node {name}: {what} varies within a channel (one per channel)")
    return torch.as_tensor(flat[:, 0].copy())


def _cycles(nir, graph, users) -> dict[str, tuple[str, str]]:
    """The IF neurons written as integrator -> Threshold -> Scale(-θ) -> the integrator (reset by
    subtraction): {integrator: (threshold, reset)}."""
    found = {}
    for name, node in graph.nodes.items():
        if not isinstance(node, nir.I):
            continue
        spike = users[name][0] if len(users[name]) == 1 else None
        resets = [] if spike is None else [r for r in users[spike] if users[r] == [name]]
        if not isinstance(graph.nodes.get(spike), nir.Threshold) or len(resets) != 1:
            raise ConversionError(
                f"NIR import: integrator {name} must feed one Threshold whose spikes come back through one Scale "
                "(an IF neuron with reset by subtraction); other uses of I are not supported"
            )
        if not isinstance(graph.nodes[resets[0]], nir.Scale):
            raise ConversionError(f"NIR import: reset {resets[0]} of integrator {name} must be a Scale(-θ)")
        found[name] = (spike, resets[0])
    return found


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def from_nir(graph, T: int | None = None, **options):
    """A NIR graph (a `nir.NIRGraph` or a path to a NIR file) as a snnconv SpikingModel.

    Graphs that snnconv wrote come back exactly as they were (their metadata says how: T, the passes, each
    node's op); IF nodes of other frameworks start at v = 0 and emit spikes of value 1. `options` go to
    snnconv.convert (e.g. passes) and override what the metadata says. T: the metadata's, else 8.
    """
    import snnconv

    nir = _nir()
    if isinstance(graph, (str, Path)):
        try:
            graph = nir.read(str(graph))
        except Exception as exc:
            raise ConversionError(f"{graph}: not a readable NIR file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(graph, nir.NIRGraph):
        raise ConversionError(f"from_nir takes a nir.NIRGraph or a path, got {type(graph).__name__}")
    meta = dict(graph.metadata.get("snnconv", {})) if isinstance(graph.metadata, dict) else {}
    ops = meta.get("ops", {})
    root, g, values, shapes = nn.Module(), fx.Graph(), {}, {}
    users = {name: [b for a, b in graph.edges if a == name] for name in graph.nodes}
    cycles = _cycles(nir, graph, users)
    resets = {r for _, r in cycles.values()}
    # the reset edges close the cycles: the graph without them is a DAG
    srcs = {name: [a for a, b in graph.edges if b == name and a not in resets] for name in graph.nodes}
    passive = {n for pair in cycles.values() for n in pair}  # built with their integrator
    thresholds: list[torch.Tensor] = []
    biases: list[torch.Tensor | None] = []
    fractions: list[np.ndarray] = []  # initial membrane / θ that each foreign Threshold implies
    skip: set[str] = set()
    output = None

    def call(name: str, module: nn.Module, x):
        mod_name = f"n_{name}".replace(".", "_")
        root.add_module(mod_name, module)
        return g.call_module(mod_name, (x,))

    for name in _topological(graph, srcs):
        if name in passive:
            continue
        node = graph.nodes[name]
        ins = [values[s] for s in srcs[name] if s in values]
        x = ins[0] if ins else None
        for other in ins[1:]:
            x = g.call_function(operator.add, (x, other))
        if name in skip:
            values[name] = x
            continue
        op = ops.get(name, {})
        if isinstance(node, nir.Input):
            values[name] = g.placeholder("x")
            shapes[name] = tuple(int(v) for v in np.asarray(node.input_type["input"]).reshape(-1))
            continue
        if x is None:
            raise ConversionError(f"NIR import: node {name} ({type(node).__name__}) has no input")
        if isinstance(node, nir.Output):
            output = x
            continue
        if isinstance(node, (nir.IF, nir.I)):
            if not np.allclose(np.asarray(node.r), 1.0):
                raise ConversionError(f"NIR import: {type(node).__name__} node {name}: r != 1 is not supported")
            if isinstance(node, nir.IF):
                th, out, shape = _per_channel(node.v_threshold, name, "v_threshold"), name, node.v_threshold.shape
            else:
                spike, reset = cycles[name]
                th = _per_channel(-np.asarray(graph.nodes[reset].scale), reset, "the reset")
                out, shape = spike, np.asarray(node.r).shape
                fire = np.asarray(graph.nodes[spike].threshold, np.float64)
                full = th.double().numpy().reshape(-1, *([1] * (len(shape) - 1)))
                fractions.append(1.0 - np.nextafter(fire.astype(np.float32), np.inf) / full)
            if not op.get("per_channel", True):  # snnconv wrote one threshold per layer
                th = th[:1].reshape(())
            y = call(name, nn.ReLU(), x)
            thresholds.append(th)
            after = [u for u in users[out] if u not in resets]
            if len(after) == 1 and ops.get(after[0], {}).get("op") == "spike_value":
                skip.add(after[0])  # snnconv's own θ-valued spikes: the neuron already emits them
            else:  # spikes of value 1: divide the neuron's θ-valued output back
                y = call(f"{name}_unit", _scale_module(1.0 / th.numpy(), tuple(shape)), y)
            values[name] = values[out] = y
            nb = next((ops[f]["neuron_bias"] for f in srcs[name] if "neuron_bias" in ops.get(f, {})), None)
            biases.append(None if nb is None else torch.as_tensor(np.asarray(nb, np.float32)))
            continue
        if isinstance(node, nir.Scale) and op.get("op") == "mul":
            values[name] = g.call_function(operator.mul, (x, float(op["factor"])))
            continue
        # an int8 layer's float weights (the node has the weights it sums): lowered again as they were
        weight = op.get("weight", node.weight) if isinstance(node, (nir.Affine, nir.Linear, nir.Conv2d)) else None
        if isinstance(node, nir.Affine) or isinstance(node, nir.Linear):
            w = torch.as_tensor(np.asarray(weight, np.float32))
            m = nn.Linear(w.shape[1], w.shape[0], bias=isinstance(node, nir.Affine))
            m.weight.data = w.clone()
            if isinstance(node, nir.Affine):
                m.bias.data = torch.as_tensor(np.asarray(op.get("bias", node.bias), np.float32)).clone()
        elif isinstance(node, nir.Conv2d):
            w = torch.as_tensor(np.asarray(weight, np.float32))
            pad = node.padding if isinstance(node.padding, str) else _ints(node.padding)
            m = nn.Conv2d(
                w.shape[1] * int(node.groups),
                w.shape[0],
                tuple(w.shape[2:]),
                _ints(node.stride),
                pad,
                _ints(node.dilation),
                int(node.groups),
            )
            m.weight.data = w.clone()
            m.bias.data = torch.as_tensor(np.asarray(op.get("bias", node.bias), np.float32)).clone()
        elif isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
            k, st, p = (
                tuple(int(v) for v in _pair(np.asarray(a).tolist()))
                for a in (node.kernel_size, node.stride, node.padding)
            )
            after = users[name]
            if op.get("op") == "avg_pool" and len(after) == 1 and ops.get(after[0], {}).get("op") == "avg_divisor":
                skip.add(after[0])
                m = nn.AvgPool2d(k, st, p)
            else:
                m = _SumPool(k, st, p) if isinstance(node, nir.SumPool2d) else nn.AvgPool2d(k, st, p)
        elif isinstance(node, nir.Flatten):
            end = node.end_dim + 1 if node.end_dim >= 0 else node.end_dim
            m = nn.Flatten(node.start_dim + 1, end)
        elif isinstance(node, nir.Scale):
            scale = np.asarray(node.scale, np.float32)
            m = _scale_module(_per_channel(scale, name, "scale").numpy(), scale.shape)
        elif isinstance(node, nir.Threshold):
            raise ConversionError(
                f"NIR import: Threshold node {name} is not part of an IF neuron (integrator -> Threshold -> "
                "Scale(-θ) back into the integrator)"
            )
        else:
            raise ConversionError(
                f"NIR import: node {name} is a {type(node).__name__}; supported: Input, Output, Affine, Linear, "
                "Conv2d, SumPool2d, AvgPool2d, Flatten, Scale, IF, and I -> Threshold -> Scale(-θ) -> I"
            )
        values[name] = call(name, m, x)
    if output is None:
        raise ConversionError("NIR import: the graph has no Output node")
    g.output(output)
    ann = fx.GraphModule(root, g)
    shape = next(iter(shapes.values()))
    if "v_init" in meta:
        v_init = float(meta["v_init"])
    elif fractions:  # another framework's integrator cycles: one initial membrane for all, as snnconv runs them
        f = np.concatenate([np.broadcast_to(a, a.shape).reshape(-1) for a in fractions])
        v_init = float(np.clip(np.median(f), 0.0, 1.0))
        if not np.allclose(f, v_init, atol=1e-5):
            raise ConversionError(
                "NIR import: the Thresholds imply different initial membranes (threshold / reset differs); "
                "snnconv runs one v_init for every neuron"
            )
    else:
        v_init = 0.0
    lowering = json.loads(_text(meta.get("lowering", "{}")))
    T = int(meta.get("T", 8)) if T is None else T
    # NIR's IF neurons emit unsigned spikes; the passes as snnconv lowered the graph it wrote
    kwargs = {"readout_delay": int(meta.get("readout_delay", 0)), "signed_spikes": False}
    if "passes" in lowering:
        kwargs["passes"] = lowering["passes"]
    snn = snnconv.convert(
        ann, T=T, threshold=1.0, example_input=torch.zeros(1, *shape), v_init=v_init, **{**kwargs, **options}
    )
    neurons = list(snn.neurons().values())
    if len(neurons) != len(thresholds):
        raise ConversionError(f"NIR import: {len(thresholds)} IF neurons became {len(neurons)} neuron layers")
    for n, th, b in zip(neurons, thresholds, biases):
        n.threshold = th if th.numel() > 1 else th.reshape(())
        n.bias = b if b is None or b.numel() > 1 else b.reshape(())
    return snn


def _topological(graph, srcs: dict[str, list[str]]) -> list[str]:
    order, done = [], set()
    pending = list(graph.nodes)
    while pending:
        progressed = False
        for name in list(pending):
            if all(s in done for s in srcs[name]):
                order.append(name)
                done.add(name)
                pending.remove(name)
                progressed = True
        if not progressed:
            raise ConversionError(f"NIR import: the graph has a cycle through {sorted(pending)} (recurrence)")
    return order
