"""The modules a converted graph calls. None holds a persistent tensor, so none adds a state_dict key,
and none holds the state of a call: membranes and pooling sums live in the current `Call`
(runtime/context.py), so one graph serves the ANN (no call open: calibration), layer-by-layer runs over
any number of steps and step-by-step streaming, from any number of threads at once.
Inside the graph, tensors after the first neuron carry time folded into the batch: [steps * N, ...].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from snnconv.runtime import cpu_kernel, get_backend, torch_backend
from snnconv.runtime.context import current, reused
from snnconv.settings import NeuronConfig


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """Keep channels-last tensors channels-last (see passes/channels_last.py)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Neuron(nn.Module):
    """Replaces one ReLU-like activation clamp(x, 0, clip).

    ANN mode: computes the activation itself and feeds an observer (calibration).
    SNN mode: integrate-and-fire (or LIF) with threshold `threshold`, spikes valued `threshold`.
    """

    def __init__(self, config: NeuronConfig, clip: float | None = None):
        super().__init__()
        self.config, self.clip = config, clip
        self.register_buffer("threshold", torch.tensor(1.0), persistent=False)
        self.bias: torch.Tensor | None = None  # per-channel current added every step (bias calibration)
        self.levels: int | None = None  # QCFS quantisation levels of the ANN activation (snnconv.qcfs)
        self.fixed = False  # threshold given by the model (QCFS), not by calibration
        self.static_input = False  # set by the hoisting pass: input is the same at every step
        self.observer = None
        self.calls = {"kernel": 0, "cpu": 0, "torch": 0}  # SNN-mode calls served: CUDA kernel, CPU kernel, torch
        self._count_key = _Scratch()  # signed spikes: the call's net spike count lives under this key
        self._code_key = _Scratch()  # the call's spikes as int8-layer input, where the CPU kernel wrote them
        # (interleave, base, per_channel) of each int8 layer reading these spikes (SpikeLayer adds it): if they
        # agree, the CPU kernel writes their uint8 input as it fires, in groups of C (per_channel) or of a row
        self.int8_readers: list[tuple[bool, int, bool]] = []
        # every reader of the spikes is such a layer, or a neuron reading them as its residual (the integer_spikes
        # and residual_into_neuron passes say): with the uint8 input written and no forward hook to see them, the
        # float spikes are not written at all
        self.int8_only = False
        self.set_residual_source(None)  # the neuron whose spikes are this one's residual, if another neuron's
        # an identity in the ANN (passes/spike_inputs.py): fires +theta and -theta, its net count unbounded below
        self.two_sided = False
        self.channel_dim = 1  # the dim per-channel thresholds and biases run along (-1: features last)

    def extra_repr(self) -> str:
        th = self.threshold
        th = f"{th.item():.4g}" if th.numel() == 1 else f"per-channel[{th.numel()}]"
        bias = "" if self.bias is None else ", calibrated bias"
        kind = f"{self.config.kind}, two-sided" if self.two_sided else self.config.kind
        return f"{kind}, reset={self.config.reset}, threshold={th}, clip={self.clip}{bias}"

    def forget(self, call) -> None:
        """Drop this neuron's state from `call`: its next run starts from the initial membrane."""
        call.state.pop(self, None)
        call.state.pop(self._count_key, None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: the input current; residual (passes/residual_into_neuron.py): a second one, x + residual is the input."""
        call = current()
        static = call is not None and self.static_input and call.input_static
        if residual is not None and (call is None or static or residual.shape != x.shape):
            x, residual = x + self._residual_floats(residual), None  # added first, as the graph's add did
        if call is None:  # the ANN
            if self.two_sided:
                y = x
            elif self.levels is not None:
                y = torch.clamp(torch.floor(x * (self.levels / self.clip) + 0.5) / self.levels, 0, 1) * self.clip
            else:
                y = torch.clamp(x, 0, self.clip) if self.clip is not None else torch.relu(x)
            if self.observer is not None:
                self.observer(y)
            return y
        steps = call.steps
        bias = None  # calibrated correction of the input current (bias calibration), broadcast over channels
        if self.bias is not None:
            b = self.bias.to(x.device, x.dtype)
            bias = _per_channel(b, x.dim(), self.channel_dim)
        shape = x.shape if static else (x.shape[0] // steps, *x.shape[1:])
        theta = self.threshold
        if theta.device != x.device:
            self.threshold = theta = theta.to(x.device)
        theta = _per_channel(theta, len(shape), self.channel_dim)
        fmt = _memory_format(x)
        cfg = self.config
        capturing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        # reused per thread (SpikingModel copies anything it hands out; graph capture gets none); the backends
        # update v in place
        out = None
        if not capturing:
            out = reused(self, (steps * shape[0], *shape[1:]), x.dtype, x.device, fmt).view(steps, *shape)
        kernel_may_run = (
            out is not None
            and call.backend == "auto"
            and cfg.max_spikes == 1
            and x.device.type == "cpu"
            and not self.two_sided
            and self.channel_dim == 1
        )
        v = call.state.get(self)  # the membrane, carried over from the call's previous chunk or step
        first = v is None or v.shape != shape  # the call's first steps: the CPU kernel starts v and count itself
        v0 = None
        if first:  # the CPU kernel fills it; elsewhere (graph capture too: ONNX has no in-place copy) made filled
            state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            # the initial membrane (graph capture: computed in the graph, not a constant of an earlier call)
            v0 = cfg.v_init * theta.to(state_dtype) if capturing else self._initial_membrane(theta, state_dtype)
            if kernel_may_run:
                v = torch.empty(shape, dtype=v0.dtype, device=x.device, memory_format=fmt)
            else:  # a copy always (contiguous() may return v0 itself, which the backends would then update)
                v = v0.expand(shape).clone(memory_format=fmt)
        call.state[self] = v
        # the dynamics every backend takes
        dyn = dict(steps=steps, static=static, soft_reset=cfg.reset == "soft", v_reset=cfg.v_reset, decay=cfg.decay)
        count = None
        if cfg.signed and not self.two_sided:  # the net spike count so far, carried like the membrane
            count = call.state.get(self._count_key)
            if first or count is None or count.shape != shape:
                if first and kernel_may_run:  # the kernel starts it; uint8 where the call cannot count past 255
                    small = call.total_steps is not None and call.total_steps <= 255  # (less state traffic)
                    count = torch.empty_like(v, dtype=torch.uint8 if small else None)
                else:
                    count = torch.zeros_like(v)
            call.state[self._count_key] = count
        backend = get_backend(call.backend, x.device) if cfg.max_spikes == 1 else None
        if kernel_may_run:
            # the fused CPU kernel takes the bias itself; it declines (False) layouts and dtypes it does not walk
            x_in = x if static else x.view(steps, *shape)  # splitting dim 0 is always a view
            code = self._code_buffer(out, fmt)
            hooked = self._forward_hooks or torch.nn.modules.module._global_forward_hooks
            float_out = not self.int8_only or bool(hooked)
            kw = dict(out=out, count=count, bias=bias, code=code, float_out=float_out)
            kw.update(v0=v0, store=not call.last)
            source = self.residual_source
            written = None if residual is None or source is None else source.written_code(residual)
            if residual is not None:  # its layout; its values too unless read from the code its neuron wrote
                kw.update(residual=residual.view(steps, *shape))
            if written is not None:
                buf, group, interleave, _ = written[0]
                r_theta = _per_channel(source.threshold, len(shape))
                kw.update(residual_code=(buf, group, interleave, r_theta, int(source.config.signed)))
            for retry in (False, True):
                if cpu_kernel.multistep(x_in, v, theta, **kw, **dyn):
                    self.calls["cpu"] += 1
                    flat = out.view(steps * shape[0], *shape[1:])
                    if code is not None:  # valid while `flat` is not written again (its version counter says)
                        call.state[self._code_key] = (flat, flat._version, code, float_out)
                    return flat
                if residual is None or retry:
                    break
                # declined, perhaps for the residual's layout alone: add it first (as floats) and try once more
                x, residual = x + self._residual_floats(residual), None
                x_in = x if static else x.view(steps, *shape)
                kw.update(residual=None, residual_code=None)
            if first:  # declined: v and count start here
                v.copy_(v0.expand(shape))
                if count is not None:
                    count = call.state[self._count_key] = torch.zeros_like(v)
            elif count is not None and count.dtype != v.dtype:  # the kernel's uint8 count, now for torch ops
                count = call.state[self._count_key] = count.to(v.dtype)
        if residual is not None:
            x = x + residual
        if bias is not None:
            x = x + bias
        x_in = x if static else x.reshape(steps, *shape)
        if capturing:  # graph capture: no reused buffers
            state = torch_backend.multistep_functional(x_in, v, theta, max_spikes=cfg.max_spikes, count=count, **dyn)
            call.state[self] = state[1]
            if count is not None:
                call.state[self._count_key] = state[2]
            return state[0].reshape(steps * shape[0], *shape[1:])
        if self.two_sided:  # single spikes of +-theta, soft reset: the torch backend
            self.calls["torch"] += 1
            dyn.update(soft_reset=True, signed=True, two_sided=True)
            torch_backend.multistep(x_in, v, theta, out=out, **dyn)
            return out.view(steps * shape[0], *shape[1:])
        if cfg.max_spikes > 1:  # burst neurons: the torch backend
            self.calls["torch"] += 1
            torch_backend.multistep_burst(x_in, v, theta, max_spikes=cfg.max_spikes, out=out, **dyn)
            return out.view(steps * shape[0], *shape[1:])
        if cfg.signed:  # the net count is their state too
            dyn.update(count=count, signed=True)
        backend(x_in, v, theta, out=out, calls=self.calls, **dyn)
        return out.view(steps * shape[0], *shape[1:])

    def _initial_membrane(self, theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """v_init * theta (read only), kept while theta is unchanged: the CPU kernel then finds its row made."""
        key = (theta.data_ptr(), theta._version, theta.shape, theta.device, dtype, self.config.v_init)
        hit = self.__dict__.get("_v0")
        if hit is None or hit[0] != key:
            hit = self.__dict__["_v0"] = (key, self.config.v_init * theta.to(dtype))
        return hit[1]

    def _code_buffer(self, out: torch.Tensor, fmt) -> tuple | None:
        """(uint8 buffer, group, interleave, base) for the CPU kernel to write the int8 layer's input into."""
        if len(set(self.int8_readers)) != 1:
            return None
        interleave, base, per_channel = self.int8_readers[0]
        if per_channel and (out.dim() != 5 or fmt != torch.channels_last):
            return None  # a convolution reads channels-last integers: only channels-last spikes map 1:1
        group = out.shape[2] if per_channel else out[0, 0].numel()
        buf = reused(self._code_key, (out.numel() * (2 if interleave else 1),), torch.uint8, out.device)
        return buf, group, interleave, base

    def set_residual_source(self, source: Neuron | None) -> None:
        """Read the residual input as `source`'s spikes (residual_into_neuron); held unregistered (a plain attribute
        assignment would make `source` a submodule of this neuron too)."""
        self.__dict__["residual_source"] = source

    def written_code(self, x: torch.Tensor) -> tuple | None:
        """((uint8 buffer, group, interleave, base), were the float spikes written too) if x is this call's spikes
        of this neuron, unchanged, and the CPU kernel wrote them as an int8 layer's input; else None."""
        call = current()
        hit = None if call is None else call.state.get(self._code_key)
        if hit is None:
            return None
        spikes, version, code, float_out = hit
        same = x.data_ptr() == spikes.data_ptr() and x.shape == spikes.shape and x.stride() == spikes.stride()
        return (code, float_out) if same and x._version == version else None

    def int8_input(self, x: torch.Tensor) -> torch.Tensor | None:
        """The uint8 input the CPU kernel wrote beside x, if x is this call's spikes of this neuron, unchanged."""
        written = self.written_code(x)
        return None if written is None else written[0][0]

    def spikes_from_code(self, x: torch.Tensor, code: tuple) -> torch.Tensor:
        """This neuron's float spikes, laid out as x (its unwritten output), from the code it wrote: (u - shift) *
        theta, the product the kernel would have stored."""
        buf, group, interleave, _ = code
        u = buf.view(-1, 2, group)[:, 1] if interleave else buf.view(-1, group)  # in x's memory order
        spikes = torch.empty_like(x)
        torch.sub(u.reshape(-1).float(), int(self.config.signed), out=spikes.as_strided((spikes.numel(),), (1,)))
        return spikes.mul_(_per_channel(self.threshold, x.dim()))

    def _residual_floats(self, residual: torch.Tensor) -> torch.Tensor:
        """The residual as floats: itself, or made from its neuron's code where that neuron wrote no floats."""
        source = self.residual_source
        written = None if source is None else source.written_code(residual)
        return residual if written is None or written[1] else source.spikes_from_code(residual, written[0])


def _per_channel(theta: torch.Tensor, dims: int, channel_dim: int = 1) -> torch.Tensor:
    """A per-channel value broadcast over a [N, C, ...] tensor of `dims` dims: [C] -> [C, 1, ...]; a scalar as is.
    Channels last (channel_dim -1): [C] broadcasts as it is."""
    if theta.dim() == 0 or channel_dim in (-1, dims - 1):
        return theta
    return theta.view(-1, *([1] * (dims - 2)))


class _Scratch:
    """A key for one more reused buffer of a module (context.reused keys buffers by owner)."""


def _storage_steps(x: torch.Tensor, steps: int, channels_last: bool) -> torch.Tensor:
    """[steps * N, C, ...] as [steps, N * C * ...] in the layout's memory order: a view where x has that
    layout (channels-last [T * N, C, H, W] is [T, N, H, W, C] in memory), else a copy with the same values."""
    return (x.permute(0, 2, 3, 1) if channels_last else x).reshape(steps, -1)


def _pool_by_maximum(acc: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, k: tuple[int, int]) -> None:
    """Non-overlapping 2-D max pooling of channels-last `acc` into channels-last `out` by elementwise maxima
    of strided views (rows first, into `rows`, then columns): same values as max_pool2d (NaN included),
    faster on CPU than its channels-last kernel, which also writes indices."""
    a, o = acc.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)  # [TN, H, W, C], C contiguous
    (kh, kw), (ho, wo) = k, o.shape[1:3]
    _max_of([a[:, i : ho * kh : kh] for i in range(kh)], rows)
    _max_of([rows[:, :, j : wo * kw : kw] for j in range(kw)], o)


def _max_of(views: list[torch.Tensor], out: torch.Tensor) -> None:
    if len(views) == 1:
        out.copy_(views[0])
        return
    torch.maximum(views[0], views[1], out=out)
    for v in views[2:]:
        torch.maximum(out, v, out=out)


class SpikeMaxPool(nn.Module):
    """Max pooling placed on the analog input of a neuron (the prepare pass moves it there).

    On an input that is the same at every step it is plain max pooling. On a time-varying input the max
    of per-step values over-estimates the max of their averages, so it pools the running sum instead and
    emits its increment: out[t] = maxpool(sum x[:t+1]) - maxpool(sum x[:t]). The outputs up to any step
    then sum to exactly the max pool of the inputs' sum, the ANN's max of the average input.
    """

    def __init__(self, pool_kwargs: dict, dims: int):
        super().__init__()
        self.pool_kwargs, self.dims = pool_kwargs, dims
        self.static_input = False
        self._acc_key, self._rows_key = _Scratch(), _Scratch()  # keys of its other reused buffers

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.pool_kwargs.items())

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.dims - 1]
        return fn(x, **self.pool_kwargs)

    def _fast_kernel(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The window of a non-overlapping, unpadded 2-D pool on a channels-last input, else None."""
        kw = self.pool_kwargs
        if (
            self.dims != 2
            or kw.get("return_indices")
            or kw.get("ceil_mode")
            or _memory_format(x) != torch.channels_last
        ):
            return None
        k = _pair(kw["kernel_size"])
        s = _pair(kw.get("stride") or k)
        if len(k) != 2 or s != k or _pair(kw.get("padding", 0)) != (0, 0) or _pair(kw.get("dilation", 1)) != (1, 1):
            return None
        return k if x.shape[2] >= k[0] and x.shape[3] >= k[1] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = current()
        if call is None or (self.static_input and call.input_static):
            return self._pool(x)
        steps, n = call.steps, x.shape[0] // call.steps
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        fmt = _memory_format(x)
        cl = fmt == torch.channels_last
        capture = torch.jit.is_tracing() or torch.compiler.is_compiling()  # graph capture: no reused buffers
        k = self._fast_kernel(x)
        if k is not None and not capture and call.backend == "auto" and x.dtype == torch.float32:
            # the fused CPU kernel: running sums, maxima and increments in one pass (the steps below take ~20)
            acc, last = call.state.get(self, (None, None))
            if acc is None:  # the call's first chunk: sums from zero
                pooled = (n, x.shape[1], x.shape[2] // k[0], x.shape[3] // k[1])
                acc, last = (
                    torch.empty(s, device=x.device, memory_format=fmt).zero_() for s in ((n, *x.shape[1:]), pooled)
                )
            out = reused(self, (x.shape[0], *last.shape[1:]), dtype, x.device, fmt)
            if cpu_kernel.pool_steps(x, acc, last, out, k):
                call.state[self] = (acc, last)  # updated in place: the running sum and its max pool now
                return out
        # all running sums, step by step in memory order (contiguous adds; cumsum over a strided
        # channels-last dim is ~8x slower), continuing the call's previous chunk or step
        if capture:
            acc = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=fmt)
        else:
            acc = reused(self._acc_key, x.shape, dtype, x.device, fmt)
        xf, af = _storage_steps(x, steps, cl), _storage_steps(acc, steps, cl)
        last_acc, last_pooled = call.state.get(self, (None, None))  # as the kernel path keeps them
        if last_acc is None:
            af[0].copy_(xf[0])
        else:
            torch.add(_storage_steps(last_acc, 1, cl)[0], xf[0], out=af[0])
        for t in range(1, steps):
            torch.add(af[t - 1], xf[t], out=af[t])
        if k is None:
            pooled = self._pool(acc)
        else:
            h, w = x.shape[2] // k[0], x.shape[3] // k[1]
            shape, rows_shape = (x.shape[0], x.shape[1], h, w), (x.shape[0], h, x.shape[3], x.shape[1])
            if capture:
                pooled = torch.empty(shape, dtype=dtype, device=x.device, memory_format=fmt)
                rows = torch.empty(rows_shape, dtype=dtype, device=x.device)
            else:
                pooled = reused(self, shape, dtype, x.device, fmt)
                rows = reused(self._rows_key, rows_shape, dtype, x.device)
            _pool_by_maximum(acc, pooled, rows, k)
        pooled_steps = pooled.unflatten(0, (steps, n))
        # (running sum, its max pool) at the last step, for the call's next chunk or step
        call.state[self] = (acc[-n:].clone(), pooled_steps[-1].clone())
        # out[t] = pooled[t] - pooled[t - 1], in place from the last step back
        for t in range(steps - 1, 0, -1):
            pooled_steps[t].sub_(pooled_steps[t - 1])
        if last_pooled is not None:
            pooled_steps[0].sub_(last_pooled)
        return pooled.to(x.dtype)


class TimeBroadcast(nn.Module):
    """Turns a step-invariant [N, ...] tensor into [steps * N, ...] where it meets time-varying ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = current()
        if call is None or not call.input_static or call.steps == 1:
            return x
        return x.unsqueeze(0).expand(call.steps, *x.shape).reshape(-1, *x.shape[1:])


class FoldedBN(nn.Module):
    """conv/linear followed by eval-mode BN, as one op. Holds the two modules by reference, unregistered. The
    folded weight is derived from their own parameters at run time and cached on their versions, so
    load_state_dict() or .to() on the SNN refolds automatically, and state_dict() stays the ANN's."""

    def __init__(self, layer: nn.Module, bn: nn.Module, names: tuple[str, str]):
        super().__init__()
        self.__dict__["_layer"], self.__dict__["_bn"] = layer, bn
        self.names, self._cache = names, (None, None)  # (key of the tensors folded, (weight, bias)): one tuple

    def extra_repr(self) -> str:
        return f"{self.names[0]} + {self.names[1]}"

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer, bn = self._layer, self._bn
        tensors = [layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        key = tuple((t.data_ptr(), t._version, t.device) if t is not None else None for t in tensors)
        cached_key, wb = self._cache  # read once: concurrent calls may both refold, never mix two folds
        if key != cached_key:
            with torch.no_grad():
                var, mean = bn.running_var.double(), bn.running_mean.double()
                scale = torch.rsqrt(var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.double()
                bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
                bias = (bias - mean) * scale
                if bn.bias is not None:
                    bias = bias + bn.bias.double()
                w = layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1)))
                fmt = (
                    torch.channels_last
                    if w.dim() == 4
                    and not layer.weight.is_contiguous()
                    and layer.weight.is_contiguous(memory_format=torch.channels_last)
                    else torch.contiguous_format
                )
                wb = (w.to(layer.weight.dtype).contiguous(memory_format=fmt), bias.to(layer.weight.dtype))
            self._cache = (key, wb)
        return wb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.folded()
        if isinstance(self._layer, nn.Linear):
            return F.linear(x, w, b)
        return self._layer._conv_forward(x, w, b)
