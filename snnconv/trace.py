"""Front end: torch.fx tracing with an explicit leaf policy, and the table of ops a converted SNN can run.

Leaf policy: built-in torch.nn modules (Conv, BatchNorm, ReLU, pools, ...) stay single `call_module`
nodes; containers and the user's own modules are traced through, so every op is visible to the passes.
Every node gets `node.meta["snn_kind"]`: 'activation' (becomes a neuron), 'maxpool', 'linear' (stateless
and linear in its tensor inputs, safe on time-folded batches), 'tensors' (a tuple of such, from chunk or
split), or 'value' (shape arithmetic).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from snnconv.errors import ConversionError, describe, frame_of
from snnconv.qcfs import QCFS

CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_LINEAR_MODULES = (
    CONV_LINEAR
    + BATCHNORM
    + (
        nn.AvgPool1d,
        nn.AvgPool2d,
        nn.AvgPool3d,
        nn.AdaptiveAvgPool1d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveAvgPool3d,
        nn.Flatten,
        nn.Unflatten,
        nn.Identity,
        nn.Dropout,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.AlphaDropout,
        nn.ZeroPad2d,
        nn.ConstantPad1d,
        nn.ConstantPad2d,
        nn.ConstantPad3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
        nn.ChannelShuffle,
    )
)
_LINEAR_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.linear,
    F.batch_norm,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    torch.flatten,
    torch.cat,
    torch.concat,
    torch.add,
    torch.sub,
    operator.add,
    operator.sub,
    operator.iadd,
    operator.neg,
    operator.getitem,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.transpose,
    torch.chunk,
    torch.split,
    torch.unsqueeze,
    torch.squeeze,
    torch.reshape,
    torch.permute,
    F.pad,
    torch.channel_shuffle,
    getattr(F, "channel_shuffle", torch.channel_shuffle),
    torch.mean,
    operator.mul,
    operator.truediv,
    torch.mul,
    torch.div,
}
_LINEAR_METHODS = {
    "view",
    "reshape",
    "flatten",
    "add",
    "add_",
    "sub",
    "contiguous",
    "transpose",
    "permute",
    "chunk",
    "split",
    "unsqueeze",
    "squeeze",
    "mean",
    "mul",
    "div",
    "__getitem__",
    "neg",
    "view_as",
    "reshape_as",
    "expand_as",
}
_VALUE_METHODS = {"size", "dim", "numel", "__len__"}
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, QCFS)
_ACT_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu_,
    torch.relu_,
    F.relu6,
    F.hardtanh,
    F.hardtanh_,
    torch.clamp,
    torch.clip,
    torch.clamp_min,
}
_ACT_METHODS = {"relu", "relu_", "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"}
_MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d}

# torch.export programs (.pt2) arrive as aten-level graphs: the same ops, as OpOverloads
_aten = torch.ops.aten
_LINEAR_FUNCTIONS |= {
    _aten.conv1d.default,
    _aten.conv2d.default,
    _aten.conv3d.default,
    _aten.linear.default,
    _aten.batch_norm.default,
    _aten.avg_pool1d.default,
    _aten.avg_pool2d.default,
    _aten.avg_pool3d.default,
    _aten.adaptive_avg_pool1d.default,
    _aten.adaptive_avg_pool2d.default,
    _aten.adaptive_avg_pool3d.default,
    _aten.flatten.using_ints,
    _aten.view.default,
    _aten.reshape.default,
    _aten.add.Tensor,
    _aten.add_.Tensor,
    _aten.sub.Tensor,
    _aten.cat.default,
    _aten.dropout.default,
    _aten.clone.default,
    _aten.mul.Tensor,
    _aten.div.Tensor,
    _aten.permute.default,
    _aten.transpose.int,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.mean.dim,
    _aten.chunk.default,
    _aten.split.Tensor,
    _aten.contiguous.default,
    _aten.slice.Tensor,
}
_ACT_FUNCTIONS |= {
    _aten.relu.default,
    _aten.relu_.default,
    _aten.hardtanh.default,
    _aten.hardtanh_.default,
    _aten.clamp.default,
    _aten.clamp_min.default,
}
_MAXPOOL_FUNCTIONS |= {_aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default}
_VALUE_FUNCTIONS = {_aten.sym_size.int}

_HINTS = {
    "sigmoid": "sigmoid is not a ReLU-like activation: integrate-and-fire neurons cannot represent it",
    "tanh": "tanh takes negative values: integrate-and-fire neurons cannot represent it",
    "gelu": "GELU is not piecewise linear: retrain with nn.ReLU",
    "silu": "SiLU/Swish is not piecewise linear: retrain with nn.ReLU",
    "hardswish": "Hardswish multiplies the input by a gate: retrain with nn.ReLU",
    "hardsigmoid": "Hardsigmoid gates are multiplicative: retrain with nn.ReLU",
    "softmax": "softmax over a time-varying input differs from softmax of the rate; drop it from the "
    "model (argmax is unchanged) and apply it to snn(x) afterwards",
    "layer_norm": "LayerNorm normalises each sample per step with data-dependent statistics; use BatchNorm",
    "layernorm": "LayerNorm normalises each sample per step with data-dependent statistics; use BatchNorm",
    "mul": "product of two time-varying tensors (gating): a spiking network cannot multiply rates",
    "leaky": "LeakyReLU passes negative values: use nn.ReLU",
    "elu": "ELU passes negative values: use nn.ReLU",
    "maxpool": "max pooling with return_indices or dilation is not supported",
}


class _Tracer(fx.Tracer):
    """fx's default leaf rule (torch.nn built-ins are leaves, Sequential is traced), QCFS as a leaf too,
    with stack traces on."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QCFS) or super().is_leaf_module(m, qualname)


def module_of(gm: fx.GraphModule, node: fx.Node, kind):
    """The module `node` calls if it is a `kind` (a class or tuple of classes), else None."""
    if node.op != "call_module":
        return None
    m = gm.get_submodule(node.target)
    return m if isinstance(m, kind) else None


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace `model`; a failure becomes a ConversionError naming the user's source line."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = frame_of(exc)
        fix = (
            "move data-dependent Python control flow (if/for on tensor values) out of forward(), "
            "or into a submodule that contains no activation and mark it a leaf"
        )
        raise ConversionError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}\n  at {where}\n  fix: {fix}"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def activation_clip(node: fx.Node, gm: fx.GraphModule) -> tuple[bool, float | None]:
    """(is a ReLU-like activation, its upper clip or None) for one node."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.ReLU6):
            return True, 6.0
        if isinstance(m, QCFS):
            return True, max(float(m.threshold.detach()), 1e-6)
        if isinstance(m, nn.Hardtanh):
            return m.min_val == 0, float(m.max_val)
        return isinstance(m, nn.ReLU), None
    if node.target in (
        F.relu,
        torch.relu,
        F.relu_,
        torch.relu_,
        "relu",
        "relu_",
        _aten.relu.default,
        _aten.relu_.default,
    ):
        return True, None
    if node.target is F.relu6:
        return True, 6.0
    if node.target in (F.hardtanh, F.hardtanh_, _aten.hardtanh.default, _aten.hardtanh_.default):
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return lo == 0, hi
    if node.target in (torch.clamp_min, "clamp_min", "clamp_min_", _aten.clamp_min.default):
        return _arg(node, 1, "min") == 0, None
    if node.target in (torch.clamp, torch.clip, "clamp", "clamp_", "clip", "clip_", _aten.clamp.default):
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        return lo == 0 and (hi is None or isinstance(hi, (int, float))), hi
    return False, None


def _plain_pool(return_indices, dilation) -> bool:
    dilation = dilation if isinstance(dilation, (tuple, list)) else (dilation,)
    return not return_indices and all(d == 1 for d in dilation)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a.meta.get("snn_kind") != "value"]


def _classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str | None, str]:
    """(kind, reason): kind is None for an op the SNN cannot run, with the reason why."""
    if node.op in ("placeholder", "get_attr", "output"):
        return "linear", ""
    t = node.target
    if node.op == "call_module":
        m = gm.get_submodule(t)
        name = type(m).__name__
        if isinstance(m, _ACT_MODULES):
            ok, _ = activation_clip(node, gm)
            return ("activation", "") if ok else (None, f"{name} with min_val != 0 takes negative values")
        if isinstance(m, MAXPOOL_MODULES):
            return ("maxpool", "") if _plain_pool(m.return_indices, m.dilation) else (None, _HINTS["maxpool"])
        if isinstance(m, _LINEAR_MODULES):
            return "linear", ""
        hint = _HINTS.get(name.lower())
        return None, f"{name}: {hint}" if hint else f"module type {name} has no spiking equivalent"
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    tensor_inputs = _tensor_args(node)
    if node.op == "call_method" and t in _VALUE_METHODS:
        return "value", ""
    if node.op == "call_function" and t is getattr and node.args[1] in ("shape", "ndim", "dtype", "device"):
        return "value", ""
    if t in _VALUE_FUNCTIONS:
        return "value", ""
    if not tensor_inputs and node.op == "call_function" and t.__module__ in ("_operator", "operator"):
        return "value", ""
    if t in _ACT_FUNCTIONS or t in _ACT_METHODS:
        ok, _ = activation_clip(node, gm)
        return ("activation", "") if ok else (None, "clamp/hardtanh must have min=0 and a constant max")
    if t in _MAXPOOL_FUNCTIONS:
        ok = _plain_pool(_arg(node, 6, "return_indices", False), _arg(node, 4, "dilation", 1))
        return ("maxpool", "") if ok else (None, _HINTS["maxpool"])
    if (
        t in (operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", _aten.mul.Tensor, _aten.div.Tensor)
        and len(tensor_inputs) > 1
    ):
        return None, _HINTS["mul"]
    if t in (torch.mean, "mean", _aten.mean.dim):
        dims = _arg(node, 1, "dim")
        dims = (dims,) if isinstance(dims, int) else dims
        if dims is None or 0 in dims:
            return None, "mean over the batch dimension (or over all dims) mixes samples; give dim=(2, 3)"
    if t in _LINEAR_FUNCTIONS or t in _LINEAR_METHODS:
        why = _touches_batch(node)
        if why is not None:
            return None, why
        tuples = (torch.chunk, torch.split, "chunk", "split", _aten.chunk.default, _aten.split.Tensor)
        return ("tensors", "") if t in tuples else ("linear", "")
    key = name.lower().strip("_")
    return None, _HINTS.get(key, f"op {name} has no spiking equivalent")


def _touches_batch(node: fx.Node) -> str | None:
    """Why a shape op would move or drop the batch dimension (time is folded into it), or None."""
    t, name = node.target, getattr(node.target, "__name__", node.target)
    if t in (torch.transpose, "transpose", _aten.transpose.int):
        if 0 in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")):
            return f"{name} moves the batch dimension; keep dim 0 in place"
    elif t in (torch.permute, "permute", _aten.permute.default):
        dims = node.args[1:] if node.op == "call_method" else node.args[1]
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if dims and dims[0] != 0:
            return "permute moves the batch dimension; keep dim 0 first"
    elif t in (_aten.slice.Tensor, _aten.select.int) and _arg(node, 1, "dim", 0) == 0:
        return f"{name} indexes the batch dimension; index only dims >= 1"
    elif t in (torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", _aten.unsqueeze.default, _aten.squeeze.dim):
        dim = _arg(node, 1, "dim")
        if dim is None or dim == 0 or (isinstance(dim, (tuple, list)) and 0 in dim):
            return f"{name} without a non-batch dim may add or drop the batch dimension; give dim >= 1"
    elif t in (operator.getitem, "__getitem__") and node.meta.get("snn_kind") != "value":
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        src = node.args[0]
        if isinstance(src, fx.Node) and src.meta.get("snn_kind") == "tensors":
            return None
        if not (first is Ellipsis or (isinstance(first, slice) and first == slice(None))):
            return "indexing the batch dimension picks samples; index only dims >= 1 (x[:, ...])"
    return None


def annotate(gm: fx.GraphModule) -> fx.GraphModule:
    """Set node.meta['snn_kind'] on every node; raise one ConversionError listing every unsupported op."""
    problems, counts = [], {}
    for node in gm.graph.nodes:
        kind, reason = _classify(node, gm)
        if kind is None:
            problems.append(f"  - {describe(node)}\n      why: {reason}")
            op = (
                type(gm.get_submodule(node.target)).__name__
                if node.op == "call_module"
                else getattr(node.target, "__name__", str(node.target))
            )
            counts[op] = counts.get(op, 0) + 1
            kind = "linear"
        node.meta["snn_kind"] = kind
    if problems:
        summary = ", ".join(f"{op} x{n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        raise ConversionError(
            f"{type(gm).__name__}: {len(problems)} op(s) cannot be converted to a spiking network ({summary}):\n"
            + "\n".join(problems)
            + "\n  fix: replace them with supported ops (ReLU-like activations, conv/linear/BN, "
            "avg/max pooling, add, cat, flatten/view) or retrain without them"
        )
    return gm
