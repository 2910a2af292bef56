"""Front end: trace the model, record per-node facts in node.meta, classify every op from one registry.

Tracing: torch.fx symbolic tracing with fx's leaf rule (torch.nn built-ins stay single `call_module` nodes;
containers and the user's own modules are traced through). Code that needs concrete sizes for Python control
flow (TF "same" padding computes its padding from `x.size()`) cannot be traced symbolically; then the model is
traced again with concrete shapes (`_ShapeTracer`): every size is a plain int except the batch dimension of
tensors that carry the batch, which stays symbolic, so the graph still runs over any batch (and over T*N).

Facts (computed once here, read by the passes):
- `snn_shape`: the tensor's shape for a batch of 2 (a tuple of shapes for tuple outputs), None otherwise;
- `snn_batched`: the value depends on the input's batch (a tensor carrying the batch in dim 0, or a size
  computed from it); parameter-only subgraphs (weights standardised in forward) are not batched;
- `snn_batch_value`: for sizes, 'int' (this int is k times the batch size), 'size' (a torch.Size whose first
  entry is k times the batch size) or 'other' (derived from the batch size some other way);
- `snn_batch_dim`, `snn_batch_factor`: for tensors, the dim carrying the batch and k where its size is k * N
  (k > 1 where the batch was merged with later dims: Swin's windows [N * nW, ...]); for 'int'/'size' values,
  snn_batch_factor is their k;
- `snn_kind`: from the registry `OPS`: 'activation' (becomes a neuron), 'maxpool', 'linear' (stateless and
  linear in its one batch-carrying input, safe on time-folded batches), 'tensors' (a tuple of such, from
  chunk/split), 'value' (shape arithmetic) or 'constant' (reads no batch-carrying tensor: any op is fine).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from snnconv import interrupt
from snnconv.errors import ConversionError, describe, frame_of
from snnconv.qcfs import QCFS

_aten = torch.ops.aten
CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---- batch rules: why an op would move, index or mix the batch dimension (time is folded into it), or None


def _dims_arg(node, index=1, name="dim"):
    d = _arg(node, index, name)
    return (d,) if isinstance(d, int) else d


def batch_dim(node) -> int | None:
    """The dim of `node`'s tensor that carries the batch (node.meta['snn_batch_dim']; 0 when not recorded)."""
    if not isinstance(node, fx.Node):
        return None
    d = node.meta.get("snn_batch_dim", 0)
    return d if isinstance(d, int) else None


def _ndim(node) -> int | None:
    shape = node.meta.get("snn_shape") if isinstance(node, fx.Node) else None
    return len(shape) if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) else None


def _hits_batch(node, dims) -> bool:
    """Do `dims` (ints, negative allowed) of node.args[0] include its batch dim?"""
    src, b = node.args[0], batch_dim(node.args[0])
    nd = _ndim(src)
    if b is None or nd is None:
        return 0 in dims
    return any(d % nd == b for d in dims if isinstance(d, int))


def _keeps_batch(name: str) -> Callable:
    def rule(node):
        dims = _dims_arg(node)
        if dims is None or _hits_batch(node, dims):
            return f"{name} over the batch dimension (or over all dims) mixes samples; give the other dims"
        return None

    return rule


def _squeeze_rule(node):
    if node.target in (torch.unsqueeze, "unsqueeze", _aten.unsqueeze.default):
        return None  # adds a dim; the batch dim's new place is recorded
    dims = _dims_arg(node)
    if dims is None or _hits_batch(node, dims):
        return "squeeze without a dim, or of the batch dim, may drop the batch dimension; give the other dims"


def _slice_rule(node):
    if _hits_batch(node, (_arg(node, 1, "dim", 0),)):
        return "indexing the batch dimension picks samples; index only the other dims"


def _getitem_rule(node):
    src = node.args[0]
    if isinstance(src, fx.Node) and (
        src.meta.get("snn_kind") == "tensors"
        or isinstance(src.meta.get("snn_batch_dim"), tuple)
        or (src.meta.get("snn_refused") and not isinstance(src.meta.get("snn_batch_dim"), int))
    ):
        return None  # picks one tensor of a tuple (chunk/split, attention's (output, weights); or one reported)
    if isinstance(src, fx.Node) and not src.meta.get("snn_batched", True):
        return None  # a table indexed by a batch-carrying index (an ONNX Gather: embedding lookup), per sample
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    nd, b = _ndim(src), batch_dim(src)
    b = 0 if b is None else b
    consuming = [i for i in index if i is not None and i is not Ellipsis]
    dim = 0
    for item in index:  # walk the index over the source's dims until the batch dim
        if item is None:
            continue
        if item is Ellipsis:
            dim += (nd if nd is not None else len(consuming)) - len(consuming)
            if dim > b:
                return None
            continue
        if dim == b:
            return None if item == slice(None) else "indexing the batch dimension picks samples; use x[:, ...] there"
        dim += 1
    return None


def _split_rule(node, index=2):
    if _hits_batch(node, (_arg(node, index, "dim", 0),)):
        return "split/chunk/unbind along the batch dimension splits the batch; split along another dim"


def _cat_rule(node):
    if node.target in (torch.stack, _aten.stack.default):
        return None  # a new dim: the batch dim moves, samples stay apart
    tensors = _arg(node, 0, "tensors", ())
    first = next((t for t in tensors if isinstance(t, fx.Node) and t.meta.get("snn_batched")), None)
    dim = _arg(node, 1, "dim", 0)
    nd, b = _ndim(first), batch_dim(first)
    if first is not None and b is not None and (dim % nd if nd else dim) == b:
        return "cat along the batch dimension mixes the batch; join along another dim"


def _pad_rule(node):
    pad, nd, b = _arg(node, 1, "pad"), _ndim(node.args[0]), batch_dim(node.args[0])
    if isinstance(pad, (tuple, list)) and nd is not None and b is not None and len(pad) // 2 > nd - 1 - b:
        return "F.pad pads the batch dimension; pad only the other dims"


def _roll_rule(node):
    rolls = node.target in (torch.roll, "roll", _aten.roll.default)
    dims = _dims_arg(node, 2 if rolls else 1, "dims")
    if dims is None or _hits_batch(node, dims):
        return "roll/flip without dims, or over the batch dimension, moves values between samples; give the other dims"
    return None


_DIM_ARG_OPS = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax")


def time_varying(node) -> bool:
    """Does this node carry the batch as a tensor (not a size, not a constant)? Such values differ per step."""
    return (
        isinstance(node, fx.Node)
        and bool(node.meta.get("snn_batched"))
        and node.meta.get("snn_kind") not in ("value", "constant")
    )


def is_time_product(node: fx.Node) -> bool:
    """A product (or quotient) of time-varying tensors, or a division by one: not linear in its inputs."""
    batched = [a for a in node.all_input_nodes if time_varying(a)]
    if len(batched) > 1:
        return True
    divides = node.target in (operator.truediv, operator.itruediv, torch.div, "div", "div_", "__truediv__")
    return bool(divides and batched and batched[0] is not node.args[0])


@dataclass(frozen=True)
class Op:
    """One op as the front end knows it: its spellings, its kind, and how it treats the batch dim."""

    kind: str  # 'activation' | 'maxpool' | 'linear' | 'tensors' | 'value' | 'check'
    functions: tuple = ()  # torch / F / operator callables
    methods: tuple = ()  # Tensor method names
    aten: tuple = ()  # OpOverloads (torch.export programs)
    modules: tuple = ()  # nn.Module classes (leaves)
    batch: Callable | None = None  # node -> reason it mixes the batch, or None


def expect_shape(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    """x itself, if its sample shape is `shape` (the graph was traced with that shape's concrete sizes)."""
    if tuple(x.shape[1:]) != shape:
        raise ConversionError(
            f"this model was traced with concrete sizes (its forward() does Python arithmetic on x.size()), "
            f"so it takes inputs [N, {', '.join(map(str, shape))}] as calibrated; got {tuple(x.shape)}: resize the "
            "input or convert again with calibration data of this shape"
        )
    return x


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
OPS: dict[str, Op] = {
    # ReLU-like activations (activation_clip gives the clip; hardtanh/clamp need min 0)
    "relu": Op(
        "activation",
        (F.relu, torch.relu, F.relu_, torch.relu_),
        ("relu", "relu_"),
        (_aten.relu.default, _aten.relu_.default),
        (nn.ReLU, QCFS),
    ),
    "relu6": Op("activation", (F.relu6,), (), (), (nn.ReLU6,)),
    "hardtanh": Op(
        "activation", (F.hardtanh, F.hardtanh_), (), (_aten.hardtanh.default, _aten.hardtanh_.default), (nn.Hardtanh,)
    ),
    "clamp": Op(
        "activation",
        (torch.clamp, torch.clip, torch.clamp_min),
        ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"),
        (_aten.clamp.default, _aten.clamp_min.default),
    ),
    "max_pool": Op(
        "maxpool",
        (F.max_pool1d, F.max_pool2d, F.max_pool3d),
        (),
        (_aten.max_pool1d.default, _aten.max_pool2d.default, _aten.max_pool3d.default),
        MAXPOOL_MODULES,
    ),
    # linear stateless ops: run once over the time-folded batch
    "conv": Op(
        "linear",
        (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
        (),
        (_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default, _aten.convolution.default),
        (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    ),
    "linear": Op("linear", (F.linear,), (), (_aten.linear.default,), (nn.Linear,)),
    "batch_norm": Op("linear", (F.batch_norm,), (), (_aten.batch_norm.default,), BATCHNORM),
    "avg_pool": Op(
        "linear",
        (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
        (),
        (
            _aten.avg_pool1d.default,
            _aten.avg_pool2d.default,
            _aten.avg_pool3d.default,
            _aten.adaptive_avg_pool1d.default,
            _aten.adaptive_avg_pool2d.default,
            _aten.adaptive_avg_pool3d.default,
        ),
        (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    ),
    "upsample": Op(  # nearest picks, bilinear averages: both linear, per sample
        "linear",
        (F.interpolate, F.upsample, getattr(F, "upsample_nearest", F.interpolate), F.upsample_bilinear),
        (),
        (
            _aten.upsample_nearest1d.vec,
            _aten.upsample_nearest2d.vec,
            _aten.upsample_nearest3d.vec,
            _aten.upsample_bilinear2d.vec,
            _aten.upsample_linear1d.vec,
            _aten.upsample_trilinear3d.vec,
            _aten.upsample_bicubic2d.vec,
        ),
        (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
    ),
    "identity": Op(
        "linear",
        (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, expect_shape),
        ("contiguous", "clone", "detach", "float", "type_as", "to", "type", "long", "int"),
        (_aten.dropout.default, _aten.clone.default, _aten.contiguous.default, _aten.alias.default),
        (nn.Identity, *_DROPOUTS),
    ),
    "pad": Op(
        "linear",
        (F.pad,),
        (),
        (_aten.pad.default, _aten.constant_pad_nd.default),
        (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
        _pad_rule,
    ),
    "add": Op(
        "linear",
        (torch.add, torch.sub, operator.add, operator.sub, operator.iadd, operator.isub, operator.neg, torch.neg),
        ("add", "add_", "sub", "sub_", "neg", "__add__", "__radd__", "__sub__"),
        (_aten.add.Tensor, _aten.add_.Tensor, _aten.sub.Tensor, _aten.neg.default),
    ),
    "mul": Op(  # linear when at most one factor carries the batch; else compensated (_classify)
        "linear",
        (operator.mul, operator.imul, operator.truediv, operator.itruediv, torch.mul, torch.div),
        ("mul", "mul_", "div", "div_", "__mul__", "__rmul__", "__truediv__"),
        (_aten.mul.Tensor, _aten.div.Tensor, _aten.mul.Scalar),
    ),
    "cat": Op(
        "linear", (torch.cat, torch.concat, torch.stack), (), (_aten.cat.default, _aten.stack.default), (), _cat_rule
    ),
    "split": Op(
        "tensors",
        (torch.chunk, torch.split, torch.tensor_split, torch.unbind),
        ("chunk", "split", "tensor_split", "unbind"),
        (_aten.chunk.default, _aten.split.Tensor, _aten.split_with_sizes.default, _aten.unbind.int),
        (),
        lambda node: (
            _split_rule(node)
            if node.target not in (torch.unbind, "unbind", _aten.unbind.int)
            else _split_rule(node, index=1)
        ),
    ),
    "reshape": Op(  # merging the batch with later dims is checked on the facts; batch sizes folded (passes/)
        "linear",
        (torch.flatten, torch.reshape),
        ("view", "reshape", "flatten", "view_as", "reshape_as", "expand_as", "expand", "unflatten"),
        (_aten.view.default, _aten.reshape.default, _aten.flatten.using_ints, _aten._unsafe_view.default),
        (nn.Flatten, nn.Unflatten),
    ),
    "transpose": Op("linear", (torch.transpose,), ("transpose", "mT"), (_aten.transpose.int,)),  # batch dim: facts
    "permute": Op("linear", (torch.permute, torch.movedim), ("permute", "movedim"), (_aten.permute.default,)),
    "squeeze": Op(
        "linear",
        (torch.squeeze, torch.unsqueeze),
        ("squeeze", "unsqueeze"),
        (_aten.squeeze.dim, _aten.unsqueeze.default),
        (),
        _squeeze_rule,
    ),
    "roll": Op(  # moves values within each sample (Swin's shifted windows) when the dims leave the batch alone
        "linear",
        (torch.roll, torch.flip),
        ("roll", "flip"),
        (_aten.roll.default, _aten.flip.default),
        (),
        _roll_rule,
    ),
    "shuffle": Op(
        "linear",
        (
            torch.channel_shuffle,
            getattr(F, "channel_shuffle", torch.channel_shuffle),
            F.pixel_shuffle,
            F.pixel_unshuffle,
        ),
        (),
        (_aten.channel_shuffle.default, _aten.pixel_shuffle.default),
        (nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle),
    ),
    "mean": Op(
        "linear",
        (torch.mean, torch.sum),
        ("mean", "sum"),
        (_aten.mean.dim, _aten.sum.dim_IntList),
        (),
        _keeps_batch("mean/sum"),
    ),
    "index": Op(
        "linear",
        (operator.getitem,),
        ("__getitem__",),
        (_aten.slice.Tensor, _aten.select.int),
        (),
        lambda node: _slice_rule(node) if isinstance(node.target, torch._ops.OpOverload) else _getitem_rule(node),
    ),
    # ops an IF neuron cannot represent: run on the running mean of their inputs (passes/compensate.py)
    "smooth": Op(
        "compensated",
        (
            F.gelu,
            F.silu,
            F.hardswish,
            F.hardsigmoid,
            F.mish,
            F.elu,
            F.selu,
            F.celu,
            F.leaky_relu,
            F.softplus,
            F.sigmoid,
            F.tanh,
            F.logsigmoid,
            torch.sigmoid,
            torch.tanh,
            torch.erf,
            torch.exp,
            torch.log,
            torch.sqrt,
            torch.rsqrt,
            torch.reciprocal,
            torch.pow,
            torch.abs,
            torch.square,
            operator.pow,
        ),
        ("sigmoid", "tanh", "erf", "exp", "log", "sqrt", "rsqrt", "reciprocal", "pow", "__pow__", "abs", "square"),
        (_aten.gelu.default, _aten.silu.default, _aten.hardswish.default, _aten.sigmoid.default, _aten.tanh.default),
        (
            nn.GELU,
            nn.SiLU,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Sigmoid,
            nn.Tanh,
            nn.Mish,
            nn.ELU,
            nn.SELU,
            nn.CELU,
            nn.LeakyReLU,
            nn.Softplus,
            nn.LogSigmoid,
        ),
    ),
    "normalise": Op(  # over features of one sample (dims >= 1): the batch rule checks the dim
        "compensated",
        (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.layer_norm, F.group_norm, F.normalize)
        + ((F.rms_norm,) if hasattr(F, "rms_norm") else ()),
        ("softmax", "log_softmax"),
        (_aten._softmax.default, _aten.softmax.int, _aten.layer_norm.default, _aten.native_layer_norm.default),
        (nn.Softmax, nn.LogSoftmax, nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
        lambda node: _keeps_batch("softmax/normalisation")(node) if node.target in _DIM_ARG_OPS else None,
    ),
    "product": Op(  # products of two time-varying tensors (attention, gates); with a weight: linear
        "linear",
        (operator.matmul, torch.matmul, torch.bmm, torch.einsum, F.scaled_dot_product_attention),
        ("matmul", "__matmul__", "bmm"),
        (_aten.matmul.default, _aten.bmm.default, _aten.mm.default),
        (nn.MultiheadAttention,),
    ),
    # new tensors whose only batch-dependent arguments are sizes (hoist_static_input knows where each size was read)
    "new_tensor": Op(
        "linear",
        (torch.ones, torch.zeros, torch.full, torch.empty, torch.ones_like, torch.zeros_like, torch.full_like),
        ("new_ones", "new_zeros", "new_full", "new_empty"),
        (_aten.ones.default, _aten.zeros.default, _aten.full.default),
    ),
    "embedding": Op("linear", (F.embedding,), (), (_aten.embedding.default,), (nn.Embedding,)),
    # shape arithmetic: sizes, dims, numbers
    "size": Op("value", (), ("size", "dim", "numel", "__len__"), (_aten.sym_size.int,)),
    # shape checks: they check the ANN's shapes, the T*N batch inside the SNN differs; dropped
    "assert": Op(
        "check",
        (torch._assert, getattr(torch, "_assert_async", torch._assert), torch._check),
        (),
        tuple(getattr(_aten, n).default for n in ("_assert_async", "_assert_scalar") if hasattr(_aten, n)),
    ),
}
_BY_TARGET: dict = {}
_BY_METHOD: dict[str, str] = {}
for _name, _op in OPS.items():
    for _t in _op.functions + _op.aten:
        _BY_TARGET.setdefault(_t, _name)
    for _m in _op.methods:
        _BY_METHOD.setdefault(_m, _name)
_MODULE_OPS = [(op.modules, name) for name, op in OPS.items() if op.modules]


def op_of(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """The registry name of the op a node calls, or None if unknown."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return next((name for classes, name in _MODULE_OPS if isinstance(m, classes)), None)
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op == "call_function":
        try:
            name = _BY_TARGET.get(node.target)
        except TypeError:  # unhashable target
            return None
        return "identity" if name is None and _inference_identity(node) else name
    return None


def _inference_identity(node: fx.Node) -> bool:
    from snnconv.passes.remove_identity import inference_identity  # one definition, where it is removed

    return inference_identity(node)


_HINTS = {  # why an op the registry does not know cannot run, where there is more to say than its name
    "maxpool": "max pooling with return_indices or dilation is not supported",
    "lstm": "recurrent state across the sequence: an LSTM has no spiking equivalent here",
    "gru": "recurrent state across the sequence: a GRU has no spiking equivalent here",
    "rnn": "recurrent state across the sequence: an RNN has no spiking equivalent here",
}


# ---- tracing


class _Tracer(fx.Tracer):
    """fx's default leaf rule (torch.nn built-ins are leaves, Sequential is traced), QCFS as a leaf too,
    with stack traces on."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QCFS) or super().is_leaf_module(m, qualname)


class _ShapeProxy(fx.Proxy):
    """A proxy that knows its concrete value: sizes are plain ints, except the batch dim of batched tensors.
    Python may read the values of tensors that do not depend on the input's values (shape tensors computed
    from sizes and constants, as ONNX graphs do): `bool`, iteration, `int`, `torch.Size` get concrete values,
    and an entry that equals the batch size becomes the symbolic batch size."""

    def _value(self):
        return self.tracer.values[self.node]

    def _batched(self) -> bool:
        return self.tracer.batched[self.node]

    def size(self, dim=None):
        v = self._value()
        if dim is None:
            return self.shape
        if dim % v.dim() == 0 and self._batched():
            return self.tracer.create_proxy("call_method", "size", (self, 0), {})
        return v.size(dim)

    @property
    def shape(self):
        v = self._value()
        return (self.size(0), *v.shape[1:]) if self._batched() else v.shape

    def dim(self):
        return self._value().dim()

    @property
    def ndim(self):
        return self._value().dim()

    @property
    def dtype(self):
        return self._value().dtype

    @property
    def device(self):
        return self._value().device

    @property
    def is_cuda(self):
        return self._value().is_cuda

    def is_floating_point(self):
        return self._value().is_floating_point()

    def is_complex(self):
        return self._value().is_complex()

    def numel(self):
        return (
            self.tracer.create_proxy("call_method", "numel", (self,), {}) if self._batched() else self._value().numel()
        )

    def __len__(self):
        n = self.node
        if self._batched() or len(self.tracer.values[n]) != len(self.tracer.values3[n]):
            raise fx.proxy.TraceError("len() of a batch-carrying tensor depends on the batch size")
        return len(self._value())

    def __index__(self):
        return operator.index(self.tracer.concrete(self, "a Python int"))

    def __int__(self):
        return int(self.tracer.concrete(self, "int()"))

    def __float__(self):
        return float(self.tracer.concrete(self, "float()"))


@contextlib.contextmanager
def _untraced():
    """Run real modules while fx's tracing patches (module call and attribute access) are in place."""
    from torch.fx import _symbolic_trace as st

    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = st._orig_module_call, st._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


# ops whose result depends on the shapes of their inputs, not on the values
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "new_ones", "new_zeros", "new_empty", "new_full"}
_SHAPE_FUNCTIONS = {torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like, torch.numel}
# methods that turn a tensor into Python values (read concretely when the tensor does not depend on the input)
_PYTHON_METHODS = {"tolist", "item", "numpy", "nelement", "numel", "__len__", "dim"}
_TorchSize, _torch_tensor = torch.Size, torch.tensor


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all()) if a.numel() else a.shape == b.shape
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b) if not hasattr(a, "shape") or getattr(a, "ndim", 0) == 0 else bool((a == b).all())
    except Exception:
        return False


def _has_proxy(a) -> bool:
    found = []
    fx.node.map_aggregate(a, lambda x: found.append(x) if isinstance(x, fx.Proxy) else None)
    return bool(found)


class _ShapeTracer(_Tracer):
    """Tracing with concrete values alongside (a real forward pass on batches of 2 and of 3 built from
    `example`): sizes are concrete, so Python arithmetic and control flow on them runs, except on the batch
    size, which stays symbolic. A value Python reads (bool, int, iteration, torch.Size, tolist) must not depend
    on the input's values; it is the same for both batches (then it is a constant) or k times the batch size
    (then it is `x.size(0) * k`), else tracing fails."""

    def __init__(self, example: torch.Tensor):
        super().__init__()
        two = example[:2] if example.shape[0] >= 2 else torch.cat([example[:1], example[:1]])
        self.examples = (two, torch.cat([two, two[:1]]))
        self.example = two
        self.values, self.values3, self.batched, self.data = {}, {}, {}, {}
        self.sized, self.params = {}, {}  # computed from the batch size / reads a parameter
        self._batch_size = None

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeProxy(node, self)

    # ---- values

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "call_function" and target is operator.getitem and len(args) == 2:
            index = args[1]  # a list holding slices indexes like a tuple; fx keeps lists as lists
            if isinstance(index, list) and any(i is None or i is Ellipsis or isinstance(i, slice) for i in index):
                args = (args[0], tuple(index))
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        n = p.node
        if n not in self.values:
            self._evaluate(n)
        if kind == "call_method" and target in _PYTHON_METHODS and not self.data[n]:
            value = self.python_value(p)  # tensor.tolist() of a shape tensor: Python values, as in eager mode
            if value is not p:
                return value
        return p

    def _value(self, a: fx.Node):
        if a not in self.values:  # constants fx registered itself (get_attr nodes made without a proxy)
            self._evaluate(a)
        return self.values[a]

    def _value3(self, a: fx.Node):
        self._value(a)
        return self.values3[a]

    def _evaluate(self, n: fx.Node) -> None:
        (self.values[n], self.batched[n]), self.values3[n] = self._run(n, 0), self._run(n, 1)[0]
        ins = n.all_input_nodes
        reads_size = n.op == "call_method" and n.target in ("size", "numel") and self.batched[ins[0]]
        self.sized[n] = reads_size or any(self.sized.get(a, False) for a in ins)
        self.params[n] = (n.op == "get_attr" and isinstance(self.values[n], nn.Parameter)) or any(
            self.params.get(a, False) for a in ins
        )
        if n.op == "placeholder":
            self.data[n] = True
        elif n.op == "get_attr" or (n.op == "call_method" and n.target in _SHAPE_METHODS):
            self.data[n] = False
        elif n.op == "call_function" and (n.target in _SHAPE_FUNCTIONS or n.target is getattr):
            self.data[n] = False
        else:
            self.data[n] = any(self.data.get(a, False) for a in ins)

    def _run(self, n: fx.Node, run: int):
        values = (self._value, self._value3)[run]
        if n.op == "placeholder":
            first = not any(m.op == "placeholder" for m in self.values if m is not n)
            return (self.examples[run], True) if first else ((n.args[0] if n.args else None), False)
        if n.op == "get_attr":
            obj = self.root
            with _untraced():
                for part in n.target.split("."):
                    obj = getattr(obj, part)
            return obj, False
        args, kwargs = fx.node.map_arg(n.args, values), fx.node.map_arg(n.kwargs, values)
        batched = any(self.batched[a] for a in n.all_input_nodes)
        with torch.no_grad(), _untraced():
            if n.op == "call_module":
                return self.root.get_submodule(n.target)(*args, **kwargs), batched
            if n.op == "call_method":
                return getattr(args[0], n.target)(*args[1:], **kwargs), batched
            return n.target(*args, **kwargs), batched

    # ---- Python reading values

    def concrete(self, p: fx.Proxy, what: str):
        """The value of `p` as a constant, if it depends neither on the input's values nor on the batch size."""
        n = p.node
        if self.data[n]:
            raise fx.proxy.TraceError(
                f"{what} of {n.name} depends on the values of the input (data-dependent control flow)"
            )
        v, v3 = self.values[n], self.values3[n]
        if not _same(v, v3):
            raise fx.proxy.TraceError(f"{what} of {n.name} depends on the batch size")
        return v

    def _batch_multiple(self, v, v3):
        """`x.size(0) * k` for a number that is k times the batch size in both runs, else None."""
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point() and v.dtype != torch.bool:
            v, v3 = v.item(), v3.item()
        if hasattr(v, "item") and not isinstance(v, torch.Tensor):
            v, v3 = v.item(), getattr(v3, "item", lambda: v3)()
        if not isinstance(v, int) or isinstance(v, bool) or not isinstance(v3, int):
            return None
        n2, n3 = self.examples[0].shape[0], self.examples[1].shape[0]
        if v % n2 or v3 % n3 or v // n2 != v3 // n3 or v == 0:
            return None
        if self._batch_size is None:
            x = next(n for n in self.graph.nodes if n.op == "placeholder")
            self._batch_size = self.create_proxy("call_method", "size", (self.proxy(x), 0), {})
        k = v // n2
        if k == 1:
            return self._batch_size
        return self.create_proxy("call_function", operator.mul, (self._batch_size, k), {})

    def python_value(self, p: fx.Proxy):
        """What Python sees for `p`: its value if it is constant, the batch size (times k) for a batch-sized
        number, a list of such for a list or 1-d tensor; `p` itself if it depends on the input's values."""
        n = p.node
        if self.data[n]:
            return p
        v, v3 = self.values[n], self.values3[n]
        if _same(v, v3):
            return v
        if (k := self._batch_multiple(v, v3)) is not None:
            return k
        if isinstance(v, (list, tuple)) and isinstance(v3, (list, tuple)) and len(v) == len(v3):
            items = [self._element(a, b, p, i) for i, (a, b) in enumerate(zip(v, v3))]
            return type(v)(items) if not isinstance(v, _TorchSize) else tuple(items)
        return p

    def _element(self, a, b, p, i):
        if _same(a, b):
            return a
        k = self._batch_multiple(a, b)
        return k if k is not None else self.create_proxy("call_function", operator.getitem, (p, i), {})

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "control flow on the value"))

    def iter(self, obj: fx.Proxy):
        n = obj.node
        if self.data[n]:
            raise fx.proxy.TraceError(f"iterating {n.name} depends on the values of the input")
        v, v3 = self.values[n], self.values3[n]
        if len(v) != len(v3):
            raise fx.proxy.TraceError(f"iterating {n.name} depends on the batch size")
        return iter([self._element(a, b, obj, i) for i, (a, b) in enumerate(zip(v, v3))])

    def make_size(self, seq=()):
        """torch.Size(seq) while tracing: a tuple holding the symbolic batch size if there is one."""
        items = list(self.iter(seq) if isinstance(seq, fx.Proxy) else seq)
        items = [self.python_value(i) if isinstance(i, fx.Proxy) else i for i in items]
        if _has_proxy(items):
            return tuple(i if isinstance(i, fx.Proxy) else operator.index(i) for i in items)
        return _TorchSize(items)

    def create_arg(self, a):
        if isinstance(a, fx.Proxy):
            return super().create_arg(a)
        if isinstance(a, slice):  # slice bounds from iterated shape tensors: plain ints
            a = slice(*(operator.index(b) if _is_index(b) else b for b in (a.start, a.stop, a.step)))
        elif _is_index(a) and not isinstance(a, int) and a not in self.tensor_attrs:
            a = operator.index(a)
        elif hasattr(a, "dtype") and not isinstance(a, torch.Tensor) and getattr(a, "ndim", None) == 0:
            a = a.item()  # numpy scalars
        return super().create_arg(a)

    def trace(self, root, concrete_args=None):
        tracer = self

        class _SizeMeta(type):
            def __instancecheck__(cls, obj):
                return isinstance(obj, _TorchSize)

            def __subclasscheck__(cls, sub):
                return issubclass(sub, _TorchSize)

            def __call__(cls, seq=()):
                return tracer.make_size(seq)

        class Size(metaclass=_SizeMeta):
            pass

        def tensor(data, *args, **kwargs):
            if _has_proxy(data):  # torch.tensor(x.shape): a node
                return tracer.create_proxy("call_function", _torch_tensor, (data, *args), kwargs)
            return _torch_tensor(data, *args, **kwargs)

        try:
            torch.Size, torch.tensor = Size, tensor
            graph = super().trace(root, concrete_args)
        finally:
            torch.Size, torch.tensor = _TorchSize, _torch_tensor
        _drop_unused_shape_nodes(graph, self.data)
        self._fold_shape_tensors(graph)
        _drop_unused_shape_nodes(graph, self.data)
        used = {n.target for n in graph.nodes if n.op == "get_attr"}
        for name in [k for k in vars(self.root) if k.startswith("_shape_constant") and k not in used]:
            delattr(self.root, name)
        return graph

    def _foldable(self, n: fx.Node) -> bool:
        """A tensor computed from sizes and constants only whose value is the same for any batch size (the
        exporter's `head_dim ** -0.5` from Shape/Gather/Div): a constant."""
        return (
            n.op in ("call_function", "call_method")
            and self.sized.get(n, False)
            and not self.data.get(n, True)
            and not self.params.get(n, True)
            and isinstance(self.values.get(n), torch.Tensor)
            and _same(self.values[n], self.values3[n])
        )

    def _fold_shape_tensors(self, graph: fx.Graph) -> None:
        for n in list(graph.nodes):
            if self._foldable(n) and any(not self._foldable(u) for u in n.users):
                i = 0
                while hasattr(self.root, f"_shape_constant{i}"):
                    i += 1
                setattr(self.root, f"_shape_constant{i}", self.values[n])
                with graph.inserting_before(n):
                    const = graph.get_attr(f"_shape_constant{i}")
                n.replace_all_uses_with(const)
                self.data[const] = False


def _is_index(b) -> bool:
    if isinstance(b, fx.Proxy):
        return False
    if isinstance(b, torch.Tensor):
        return b.dim() == 0 and not b.is_floating_point() and not b.is_complex() and b.dtype != torch.bool
    return hasattr(b, "__index__") and not isinstance(b, (bool, fx.Proxy)) and not isinstance(b, int)


def _drop_unused_shape_nodes(graph: fx.Graph, data: dict) -> None:
    """Remove what Python read concretely and nothing else uses: shape tensors, .tolist(), numpy copies."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "call_method", "get_attr") and not node.users and not data.get(node, True):
            graph.erase_node(node)


def trace(model: nn.Module, example: torch.Tensor | None = None) -> fx.GraphModule:
    """Trace `model` symbolically; if that fails and `example` (one input batch) is given, trace again with
    concrete shapes. Shape checks (torch._assert) leave the graph. A failure becomes a ConversionError naming
    the user's source line."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        interrupt.check()  # a Ctrl-C that broke a lazy import here is no fault of the model
        if example is None:
            raise _trace_error(model, exc) from exc
        try:
            tracer = _ShapeTracer(example[:2])
            graph = tracer.trace(model)
        except Exception:
            interrupt.check()
            raise _trace_error(model, exc) from exc
    interrupt.check()  # one that torch dropped (its C++ callbacks swallow errors) stops here too
    _bind_defaults(graph)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["snn_concrete_shapes"] = isinstance(tracer, _ShapeTracer)
    if isinstance(tracer, _ShapeTracer):  # sizes other than the batch are baked in: check the input's
        x = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(x):
            guard = graph.call_function(expect_shape, (x, tuple(example.shape[1:])))
        x.replace_all_uses_with(guard, delete_user_cb=lambda u: u is not guard)
    _drop_checks(gm)
    return gm


def _bind_defaults(graph: fx.Graph) -> None:
    """forward()'s optional arguments after the input (`attn_mask=None`, `return_features=False`) take their
    defaults: the converted network is called with the input alone, so each such placeholder becomes its
    default value in the graph (a None mask otherwise reaches ops and passes as a tensor input)."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        if not node.args:  # a required argument: left to fail where it is used
            continue
        default = node.args[0]
        for user in list(node.users):
            user.args = fx.node.map_aggregate(user.args, lambda a, n=node, d=default: d if a is n else a)
            user.kwargs = fx.node.map_aggregate(user.kwargs, lambda a, n=node, d=default: d if a is n else a)
        graph.erase_node(node)


def _trace_error(model, exc) -> ConversionError:
    where = frame_of(exc)
    fix = (
        "move data-dependent Python control flow (if/for on tensor values) out of forward(), "
        "or into a submodule that contains no activation and mark it a leaf"
    )
    return ConversionError(
        f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {exc}\n  at {where}\n  fix: {fix}"
    )


_PURE = {
    getattr,
    operator.eq,
    operator.ne,
    operator.lt,
    operator.le,
    operator.gt,
    operator.ge,
    operator.not_,
    operator.getitem,
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.truediv,
    operator.mod,
}


def _drop_checks(gm: fx.GraphModule) -> None:
    """Remove shape checks (torch._assert and friends), then the size arithmetic nothing reads any more."""
    for node in list(gm.graph.nodes):
        if op_of(node, gm) == "assert":
            gm.graph.erase_node(node)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            pure = op_of(node, gm) == "size" or (node.op == "call_function" and node.target in _PURE)
            if pure and not node.users:
                gm.graph.erase_node(node)
                changed = True
    gm.recompile()


# ---- per-node facts


def _tensor_batch(a: torch.Tensor, b: torch.Tensor, n: int) -> tuple[int | None, int]:
    """(batch dim, batch factor) of one tensor seen at batch n (a) and n + 1 (b): the one dim whose size
    is k * n, then k * (n + 1); (None, 0) if none changed, (-1, 0) if the batch spread over several dims."""
    if a.dim() != b.dim():
        return -1, 0
    changed = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
    if not changed:
        return None, 0
    if len(changed) > 1:
        return -1, 0
    d = changed[0]
    k = b.shape[d] - a.shape[d]
    return (d, k) if k > 0 and a.shape[d] == k * n else (-1, 0)


def _record(out, out2, n: int):
    """(shape, batched, batch_value, batch_dim, batch_factor) of one node's value for batch n (out) and
    batch n + 1 (out2)."""
    if isinstance(out, torch.Tensor):
        d, k = _tensor_batch(out, out2, n)
        return tuple(out.shape), tuple(out.shape) != tuple(out2.shape), None, d, k
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) or o is None for o in out):
        pairs = list(zip(out, out2))  # (attention's output, None): a tuple with an empty place
        facts = [None if o is None else _tensor_batch(o, p, n) for o, p in pairs]
        dims = tuple(None if f is None else f[0] for f in facts)
        batched = any(o is not None and o.shape != p.shape for o, p in pairs)
        # the tuple's factor: its batched members' common one (unbind of Swin's qkv: the windows' nW)
        ks = {f[1] for f in facts if f is not None and f[1] > 0}
        return (
            tuple(None if o is None else tuple(o.shape) for o in out),
            batched,
            None,
            dims,
            ks.pop() if len(ks) == 1 else 1,
        )
    if isinstance(out, int) and not isinstance(out, bool):
        if out == out2:
            return None, False, None, None, 0
        k = _int_factor(out, out2, n)
        return None, True, "int" if k else "other", None, k
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, int) for o in out):
        if tuple(out) == tuple(out2):
            return None, False, None, None, 0
        same_rest = len(out) == len(out2) and tuple(out[1:]) == tuple(out2[1:])
        k = _int_factor(out[0], out2[0], n) if same_rest else 0
        return None, True, "size" if k else "other", None, k
    return None, False, None, None, 0


def _int_factor(a: int, b: int, n: int) -> int:
    """k where a size is k times the batch (k * n at batch n, k * (n + 1) at n + 1), else 0: Swin's B_ of its
    windows [B * nW, ...] is nW times the batch."""
    k = b - a
    return k if k > 0 and a == k * n else 0


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.outs = {}

    def run_node(self, node):
        self.outs[node] = out = super().run_node(node)
        return out


def record_facts(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Run the graph on batches of 2 and 3 copies of the example's first sample; record snn_shape,
    snn_batched, snn_batch_value, snn_batch_dim and snn_batch_factor in node.meta."""
    runs = []
    for n in (2, 3):
        rec = _Recorder(gm)
        with torch.no_grad():
            rec.run(example[:1].expand(n, *example.shape[1:]).clone())
        runs.append(rec.outs)
    for node in gm.graph.nodes:
        if node.op == "output" or node not in runs[0]:
            continue
        shape, batched, value, dim, factor = _record(runs[0][node], runs[1][node], 2)
        node.meta.update(snn_shape=shape, snn_batched=batched, snn_batch_value=value)
        node.meta.update(snn_batch_dim=dim, snn_batch_factor=factor)


# ---- classification


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
    op = op_of(node, gm)
    if op == "relu":
        return True, None
    if op == "relu6":
        return True, 6.0
    if op == "hardtanh":
        lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
        return lo == 0, hi
    if node.target in (torch.clamp_min, "clamp_min", "clamp_min_", _aten.clamp_min.default):
        return _arg(node, 1, "min") == 0, None
    if op == "clamp":
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
        return lo == 0 and (hi is None or isinstance(hi, (int, float))), hi
    return False, None


def _plain_pool(return_indices, dilation) -> bool:
    dilation = dilation if isinstance(dilation, (tuple, list)) else (dilation,)
    return not return_indices and all(d == 1 for d in dilation)


def _batched(node: fx.Node) -> bool:
    """Does this node carry the batch? From the recorded facts; without them, any tensor not a parameter."""
    if "snn_batched" in node.meta:
        return bool(node.meta["snn_batched"])
    return node.op != "get_attr" and node.meta.get("snn_kind") not in ("value", "constant")


def _classify(node: fx.Node, gm: fx.GraphModule) -> tuple[str | None, str]:
    """(kind, reason): kind is None for an op the SNN cannot run, with the reason why."""
    if node.op in ("placeholder", "get_attr", "output"):
        return "linear", ""
    t = node.target
    ins = node.all_input_nodes
    if "snn_batched" in node.meta and not any(_batched(a) for a in ins):
        # reads no batch-carrying tensor (parameters, constants): step-invariant; a module too where it reads
        # a constant (test_vit_relpos's position MLP, Linear -> ReLU on a coordinate table: no neurons there)
        if node.op != "call_module" or (ins and not node.meta["snn_batched"]):
            return "constant", ""
    if node.op == "call_function" and t is getattr:
        return "value", ""
    name = op_of(node, gm)
    op = OPS.get(name)
    if op is not None and op.kind == "value":
        return "value", ""
    if node.op == "call_function" and getattr(t, "__module__", None) in ("_operator", "operator", "math"):
        if all(a.meta.get("snn_kind") == "value" for a in ins):
            return "value", ""
    for a in _flat_args(node):
        if isinstance(a, fx.Node) and a.meta.get("snn_batch_value") == "other":
            return None, f"a size computed from the batch size ({a.name}) cannot follow the time-folded batch"
    if op is None:
        if node.op == "call_module":
            m = gm.get_submodule(t)
            hint = _HINTS.get(type(m).__name__.lower())
            return (
                None,
                f"{type(m).__name__}: {hint}" if hint else f"module type {type(m).__name__} has no spiking equivalent",
            )
        label = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        key = str(label).lower().strip("_")
        return None, _HINTS.get(key, f"op {label} has no spiking equivalent")
    if name in ("mul", "product") and (node.op == "call_module" or is_time_product(node)):
        return "compensated", ""  # a product of rates is not a rate: run on their running means
    for a in ins:
        if a.meta.get("snn_batch_dim") == -1 and op.kind != "tensors" and not a.meta.get("snn_refused"):
            return None, f"its input {a.name} spreads the batch over several dims (samples would mix over time)"
    if op.kind in ("activation", "maxpool") and ins and batch_dim(ins[0]) not in (0, None):
        return None, "a neuron needs the batch in dim 0; move it back (permute/transpose) before the activation"
    if (why := _merge_rule(node)) is not None:
        return None, why
    tainted = any(a.meta.get("snn_refused") for a in ins)
    if any(u.op == "output" for u in node.users) and batch_dim(node) not in (0, None) and not tainted:
        return None, "the model's output must keep the batch in dim 0 (snn(x) averages it over time)"
    if op.kind == "activation":
        ok, _ = activation_clip(node, gm)
        return ("activation", "") if ok else ("compensated", "")  # clamp(-1, 1), hardtanh: on the means
    if op.kind == "maxpool":
        if node.op == "call_module":
            m = gm.get_submodule(t)
            ok = _plain_pool(m.return_indices, m.dilation)
        else:
            ok = _plain_pool(_arg(node, 6, "return_indices", False), _arg(node, 4, "dilation", 1))
        return ("maxpool", "") if ok else (None, _HINTS["maxpool"])
    if op.kind == "check":
        return "value", ""
    if name == "mean" and _arg(node, 1, "dim") is None:
        return None, "mean over the batch dimension (or over all dims) mixes samples; give dim=(2, 3)"
    if op.batch is not None and node.op != "call_module" and (why := op.batch(node)) is not None:
        return None, why
    if name == "reshape" and any(
        isinstance(a, fx.Node) and a.meta.get("snn_batch_value") in ("int", "size") for a in _flat_args(node)
    ):
        expands = node.target in ("expand", "expand_as") and node.meta.get("snn_batch_dim") == 0
        if not expands and not (ins and _batched(node.args[0] if isinstance(node.args[0], fx.Node) else ins[0])):
            return None, "a tensor built from the batch size of another tensor cannot follow the time-folded batch"
    return op.kind, ""


def _merge_rule(node: fx.Node) -> str | None:
    """A reshape may merge the batch with the dims after it only where the batch is the outermost dim: the
    time-folded batch [T * N] then stays outermost, and each step's rows stay together."""
    factor = node.meta.get("snn_batch_factor", 1)
    if not node.meta.get("snn_batched") or not isinstance(node.meta.get("snn_batch_dim"), int) or factor == 0:
        return None
    src = next((a for a in node.all_input_nodes if time_varying(a)), None)
    if src is None or src.meta.get("snn_batch_factor", 1) == factor:
        return None
    if batch_dim(src) == 0 and node.meta.get("snn_batch_dim") == 0:
        return None
    return "this reshape merges the batch with an outer dim, so samples would interleave; keep the batch outermost"


def _flat_args(node: fx.Node) -> list:
    out = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a))
    return out


def annotate(gm: fx.GraphModule, example: torch.Tensor | None = None) -> fx.GraphModule:
    """Record facts (if `example` is given) and set node.meta['snn_kind'] on every node; raise one
    ConversionError listing every unsupported op."""
    if example is not None:
        record_facts(gm, example)
    problems, counts = [], {}
    for node in gm.graph.nodes:
        kind, reason = _classify(node, gm)
        # downstream of a refused op, a spread batch is that op's doing: reported once, there
        node.meta["snn_refused"] = kind is None or any(a.meta.get("snn_refused") for a in node.all_input_nodes)
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
            + "\n  fix: replace them with supported ops (activations, conv/linear/BN, norms, softmax, attention, "
            "products, pooling, upsampling, add, cat, reshapes that keep each sample apart) or retrain without them"
        )
    return gm
