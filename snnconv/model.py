"""SpikingModel: the converted network. It adopts the ANN's own modules, so its state_dict keys and
values are the ANN's; the spiking graph runs over that same tree, T steps per call."""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.fx as fx
import torch.nn as nn

from snnconv.errors import ConversionError
from snnconv.memory import plan_chunk
from snnconv.runtime.context import Call, running
from snnconv.runtime.malloc import keep_freed_memory
from snnconv.runtime.modules import Neuron
from snnconv.settings import Settings

# settings that shaped the graph or its buffers at conversion; a loaded state does not change them
_BUILT_IN = {
    "neuron",
    "passes",
    "input_ndim",
    "input_shape",
    "input_integer",
    "spike_depthwise",
    "step_bytes_per_sample",
    "int8",
}


def _map(fn, y):
    if isinstance(y, torch.Tensor):
        return fn(y)
    if isinstance(y, (tuple, list)):
        return type(y)(_map(fn, v) for v in y)
    if isinstance(y, dict):
        return {k: _map(fn, v) for k, v in y.items()}
    return y


class SpikingModel(nn.Module):
    """A spiking twin of an ANN. `snn(x)` takes the ANN's input [N, ...] and returns the ANN-shaped output
    averaged over T steps.

    - `snn(x, time_major=True)`: x is [T, N, ...], a different input at each step.
    - `snn(x, per_step=True)`: return the per-step outputs [T, N, ...] instead of their mean.
    - `state = snn.init_state(N)`; `y, state = snn.step(x, state)`: one step at a time (streaming), the
      state (membranes, pooling sums) owned by the caller.
    - `snn.step_mode = 's'`: each call is one step, the state kept on the model (one stream at a time,
      not thread-safe); call `snn.reset()` between samples.

    Calls in multi-step mode (the default) and `step()` keep their state in the call, never on the
    modules: one model serves any number of threads at once.
    """

    def __init__(self, gm: fx.GraphModule, settings: Settings):
        super().__init__()
        self._parameters, self._buffers, self._modules = gm._parameters, gm._buffers, gm._modules
        self._non_persistent_buffers_set = gm._non_persistent_buffers_set
        self.__dict__["graph_module"] = gm  # not a child: its modules are ours already
        self.settings = settings
        self.step_mode = "m"
        self._stream: StepState | None = None  # step mode 's': the state of the one stream on the model
        self.pass_log: list[tuple[str, str]] = []
        self.source: dict | None = None  # how to rebuild the ANN (factory spec, ONNX): see snnconv.save
        self.model_file: bytes | None = None  # the .onnx / .pt2 file it was converted from, which save embeds

    @property
    def T(self) -> int:
        return self.settings.T

    @T.setter
    def T(self, value: int) -> None:
        if not isinstance(value, int) or value <= 0:
            raise ConversionError(f"T must be a positive integer, got {value!r}")
        self.settings.T = value

    def reset(self) -> None:
        """Start a new sample in step mode 's' (clears the state kept on the model)."""
        self._stream = None

    def init_state(self, batch: int) -> StepState:
        """The state of a new stream of `batch` samples for `step()`: every membrane at its start value."""
        if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
            raise ConversionError(f"init_state takes the batch size, a positive integer, got {batch!r}")
        return StepState(batch)

    def step(self, x: torch.Tensor, state: StepState) -> tuple:
        """One time step: x is this step's input [N, ...]; returns (this step's output, the new state).
        The state passed in is left as it was, so it can be stepped again (e.g. two continuations)."""
        if not isinstance(state, StepState):
            raise ConversionError(f"step() takes the state from snn.init_state(batch), got {type(state).__name__}")
        self._check_input(x, False)
        if x.shape[0] != state.batch:
            raise ConversionError(
                f"input batch {x.shape[0]} does not match the state's batch {state.batch}; "
                f"start a new stream with snn.init_state({x.shape[0]})"
            )
        return self._step(x, StepState(state.batch, _map(torch.clone, state.modules), state.t))

    def _step(self, x: torch.Tensor, state: StepState) -> tuple:
        """One step that updates `state`'s membranes in place. Each step's input may differ (input_static
        False): max pooling then pools running sums, as a time-major multi-step call does."""
        call = Call(1, False, self.settings.backend, state.modules)
        with torch.inference_mode(False), torch.no_grad(), running(call):  # caches read version counters
            y = _map(torch.clone, self.graph_module(x))  # neuron outputs live in reused buffers
        return y, StepState(state.batch, call.state, state.t + 1)

    def float_ops(self) -> list[str]:
        """The graph's compensated ops (passes/compensate.py) and two-sided neurons: float computation that a
        format describing only spiking layers (NIR 1.0; this ONNX export) cannot carry."""
        gm = self.graph_module
        kinds = [(n.name, n.meta.get("snn_kind"), n.meta.get("two_sided")) for n in gm.graph.nodes]
        return [name for name, kind, two in kinds if kind == "compensated" or (kind == "neuron" and two)]

    def refuse_float_ops(self, what: str) -> None:
        ops = self.float_ops()
        if ops:
            shown = ", ".join(ops[:5]) + (f" and {len(ops) - 5} more" if len(ops) > 5 else "")
            raise ConversionError(
                f"{what}: this SNN computes {len(ops)} op(s) on running means (softmax, LayerNorm, GELU, products, "
                f"two-sided neurons: {shown}), which {what} cannot express; run it with snnconv"
            )

    def neurons(self) -> dict[str, Neuron]:
        return {name: m for name, m in self.named_modules() if isinstance(m, Neuron)}

    def thresholds(self) -> dict[str, torch.Tensor]:
        return {name: n.threshold.detach().clone() for name, n in self.neurons().items()}

    def _check_input(self, x, time_major: bool) -> None:
        if not isinstance(x, torch.Tensor):
            raise ConversionError(f"input must be a tensor, got {type(x).__name__}")
        want = self.settings.input_ndim + (1 if time_major else 0)
        if x.dim() != want:
            layout = "[T, N, ...]" if time_major else "[N, ...]"
            raise ConversionError(
                f"input has {x.dim()} dims {tuple(x.shape)}, expected {want} ({layout} as in "
                "calibration); for a time-major input pass time_major=True"
            )
        if self.settings.input_integer:
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise ConversionError(f"input dtype {x.dtype}: this model was calibrated on integer inputs (token ids)")
        elif not x.is_floating_point():
            raise ConversionError(f"input dtype {x.dtype} is not floating point; convert with x.float()")
        if not torch.isfinite(x).all():
            raise ConversionError("input contains NaN or Inf")

    def forward(self, x: torch.Tensor, *, time_major: bool = False, per_step: bool = False):
        if self.step_mode not in ("m", "s"):
            raise ConversionError(f"step_mode must be 'm' or 's', got {self.step_mode!r}")
        if self.step_mode == "s" and (time_major or per_step):
            raise ConversionError(
                "time_major and per_step apply to step_mode 'm'; in step mode 's' each call "
                "takes one step's input [N, ...] and returns that step's output"
            )
        if self.step_mode == "s":
            self._check_input(x, False)
            if self._stream is None or self._stream.batch != x.shape[0]:
                self._stream = self.init_state(x.shape[0])
            y, self._stream = self._step(x, self._stream)  # the model's own state: no copy
            return y
        self._check_input(x, time_major)
        if x.device.type == "cpu":  # large activations reuse freed memory, not fresh pages (runtime/malloc.py)
            keep_freed_memory()
        call = Call(backend=self.settings.backend)  # this call's state: membranes carry across time chunks
        with torch.inference_mode(False), torch.no_grad(), running(call):  # caches read version counters
            T = x.shape[0] if time_major else self.T
            n = x.shape[1] if time_major else x.shape[0]
            chunk = self._chunk(T, n, x.device)
            call.total_steps = T
            delay = min(self.settings.readout_delay, T - 1)  # leading steps left out of the mean
            total, outs = None, []
            for t0 in range(0, T, chunk):
                steps = min(chunk, T - t0)
                xin = x[t0 : t0 + steps].flatten(0, 1) if time_major else x
                call.steps, call.input_static, call.last = steps, not time_major, t0 + steps == T
                y = _map(lambda a, s=steps: a.view(s, n, *a.shape[1:]), self.graph_module(xin))
                if per_step:
                    outs.append(_map(torch.clone, y))
                elif t0 + steps > delay:
                    skip = max(0, delay - t0)
                    s = _map(lambda a, k=skip: a[k:].sum(0), y)
                    total = s if total is None else _map_pair(total, s)
            if per_step:
                return outs[0] if len(outs) == 1 else _cat(outs)
            return _map(lambda a: a / (T - delay), total)

    def _chunk(self, T: int, n: int, device: torch.device | str = "cpu") -> int:
        """Steps per layer-by-layer pass: set, or chosen from the memory available (snnconv.memory)."""
        return plan_chunk(self.settings, T, n, device).chunk

    def conversion_state(self) -> dict:
        """Everything the conversion decided that is not a weight (JSON-able): T, options, thresholds."""
        return {
            "settings": self.settings.to_dict(),
            "thresholds": {k: v.tolist() for k, v in self.thresholds().items()},
            "biases": {k: n.bias.tolist() for k, n in self.neurons().items() if n.bias is not None},
        }

    def load_conversion_state(self, state: dict, where: str = "conversion state: ") -> None:
        """Apply a conversion_state() dict (a checkpoint's): settings, thresholds and biases, each
        validated against this graph (one ConversionError naming the field, prefixed by `where`)."""
        if not isinstance(state, dict):
            raise ConversionError(f"{where.rstrip(': ')} must be a JSON object, got {type(state).__name__}")
        for key in ("settings", "thresholds"):
            if key not in state:
                raise ConversionError(f"{where}{key} is missing")
        s = Settings.from_dict(state["settings"], f"{where}settings.")
        thresholds, biases = state["thresholds"], state.get("biases", {})
        neurons = self.neurons()
        for key, table in (("thresholds", thresholds), ("biases", biases)):
            if not isinstance(table, dict):
                raise ConversionError(f"{where}{key} must map neuron names to values, got {type(table).__name__}")
        missing = set(neurons) ^ set(thresholds)
        if missing or set(biases) - set(neurons):
            raise ConversionError(
                f"{where}thresholds do not match this graph's neurons: {sorted(missing | (set(biases) - set(neurons)))}"
            )
        channels = self._neuron_channels(s.input_shape, s.input_integer)
        values = {}
        for key, table in (("thresholds", thresholds), ("biases", biases)):
            for name, value in table.items():
                t = _values(value, f"{where}{key}.{name}", positive=key == "thresholds")
                if t.numel() not in (1, channels.get(name, 1)) or t.dim() > 1:
                    raise ConversionError(
                        f"{where}{key}.{name} has {t.numel()} values; the layer has {channels.get(name, 1)} "
                        "channels (give one value, or one per channel)"
                    )
                values[key, name] = t
        for f in fields(Settings):  # all but what the graph itself fixed when it was built
            if f.name not in _BUILT_IN:
                setattr(self.settings, f.name, getattr(s, f.name))
        self.settings.neuron.__dict__.update(s.neuron.__dict__)
        for name, n in neurons.items():
            n.threshold = values["thresholds", name].to(n.threshold.device)
            n.bias = values.get(("biases", name))

    def _neuron_channels(self, input_shape, integer: bool = False) -> dict[str, int]:
        """Each neuron's channel count (dim 1 of its input), from one ANN-mode pass over one zero sample."""
        found, hooks = {}, []
        for name, n in self.neurons().items():
            hooks.append(
                n.register_forward_pre_hook(
                    lambda m, a, name=name: found.__setitem__(name, a[0].shape[m.channel_dim] if a[0].dim() > 1 else 1)
                )
            )
        try:
            with torch.no_grad():
                self.graph_module(torch.zeros(1, *input_shape, dtype=torch.long if integer else torch.float))
        except Exception as exc:
            raise ConversionError(
                f"the model does not run on its recorded input shape {list(input_shape)}: {type(exc).__name__}"
            ) from exc
        finally:
            for h in hooks:
                h.remove()
        return found

    def extra_repr(self) -> str:
        return f"T={self.T}, step_mode={self.step_mode!r}, neurons={len(self.neurons())}"


def _values(value, what: str, positive: bool) -> torch.Tensor:
    """A threshold or bias from JSON: a number or a flat list of finite numbers (thresholds positive)."""
    flat = value if isinstance(value, list) else [value]
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat) and len(flat) > 0
    t = torch.tensor(flat, dtype=torch.float64) if ok else None
    if t is None or not torch.isfinite(t).all() or (positive and not (t > 0).all()):
        raise ConversionError(
            f"{what} must be {'a positive' if positive else 'a finite'} number or a list of them, got {value!r:.80}"
        )
    return t.float().reshape(()) if not isinstance(value, list) else t.float()


class StepState:
    """The state of one stream in step-by-step mode, owned by the caller: `snn.init_state(batch)`, then
    `y, state = snn.step(x, state)`. Opaque: membranes and pooling sums by module, and the steps taken."""

    def __init__(self, batch: int, modules: dict | None = None, t: int = 0):
        self.batch, self.modules, self.t = batch, modules if modules is not None else {}, t

    def __repr__(self) -> str:
        return f"StepState(batch={self.batch}, t={self.t})"


def _map_pair(a, b):
    if isinstance(a, torch.Tensor):
        return a + b
    if isinstance(a, (tuple, list)):
        return type(a)(_map_pair(u, v) for u, v in zip(a, b))
    return {k: _map_pair(a[k], b[k]) for k in a}


def _cat(outs: list):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, 0)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([o[i] for o in outs]) for i in range(len(first)))
    return {k: _cat([o[k] for o in outs]) for k in first}
