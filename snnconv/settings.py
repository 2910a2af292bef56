"""Everything a conversion decides that is not a weight: lives outside the state_dict, saved as JSON.

One options object, validated in one place: `convert()`, the command line and a checkpoint's metadata all
go through `Settings.validate` / `Settings.from_dict`, so a tampered checkpoint and a mistyped argument get
the same one-line error naming the field. RULES is the table: field -> (test, what the value must be).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from snnconv.errors import ConversionError

BACKENDS = ("auto", "torch", "cupy")  # who runs neuron dynamics: snnconv.runtime.get_backend
# how CPU layers sum spikes exactly (snnconv.runtime.integer_spikes; -emulated: the same integers in float64)
INT8_MODES = ("vnni", "binary", "sparse", "vnni-emulated", "binary-emulated")


@dataclass
class NeuronConfig:
    kind: str = "if"  # 'if' or 'lif'
    reset: str = "soft"  # 'soft' (subtract threshold) or 'hard' (set to v_reset)
    v_reset: float = 0.0
    v_init: float = 0.5  # initial membrane, as a fraction of the threshold
    tau: float = 2.0  # LIF time constant: decay = 1 - 1/tau
    max_spikes: int = 1  # > 1: burst mode, up to this many spikes per step (outputs are not binary)
    signed: bool = False  # spikes of -theta too, taking back an early excess (soft reset, binary magnitude)

    @property
    def decay(self) -> float:
        return 1.0 - 1.0 / self.tau if self.kind == "lif" else 1.0


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional_passes(v) -> bool:
    from snnconv.passes import OPTIONAL

    return v is None or (isinstance(v, (list, tuple)) and all(isinstance(p, str) and p in OPTIONAL for p in v))


RULES = {
    "T": (lambda v: _int(v) and 0 < v <= 10**6, "a positive integer number of time steps (at most 1000000)"),
    "threshold_method": (
        lambda v: v in ("search", "percentile", "max", "fixed"),
        "'search', 'percentile' or 'max' (or 'fixed')",
    ),
    "percentile": (lambda v: _num(v) and 0 < v <= 100, "a number in (0, 100]"),
    "per_channel": (lambda v: isinstance(v, bool), "true or false"),
    "fixed_threshold": (lambda v: v is None or (_num(v) and v > 0), "a positive number or None"),
    "passes": (_optional_passes, "None or a list of optional pass names (snnconv.passes.OPTIONAL)"),
    "chunk": (lambda v: v is None or (_int(v) and v > 0), "a positive number of steps or None"),
    "input_ndim": (lambda v: _int(v) and 0 <= v <= 8, "the input's rank [N, ...], 1 to 8"),
    "input_shape": (
        lambda v: isinstance(v, (list, tuple)) and len(v) <= 7 and all(_int(s) and s > 0 for s in v),
        "one sample's shape: a list of positive sizes",
    ),
    "memory_budget_mb": (lambda v: v is None or (_num(v) and v > 0), "a positive number of MiB or None"),
    "readout_delay": (lambda v: _int(v) and v >= 0, "a non-negative number of steps"),
    "step_bytes_per_sample": (lambda v: _int(v) and v >= 0, "a non-negative number of bytes"),
    "backend": (lambda v: v in BACKENDS, f"one of {list(BACKENDS)}"),
    "int8": (lambda v: v is None or v == "off" or v in INT8_MODES, f"None, 'off' or one of {list(INT8_MODES)}"),
    "input_integer": (lambda v: isinstance(v, bool), "true or false"),
    "spike_depthwise": (lambda v: isinstance(v, bool), "true or false"),
    "neuron.kind": (lambda v: v in ("if", "lif"), "'if' or 'lif'"),
    "neuron.reset": (lambda v: v in ("soft", "hard"), "'soft' (subtract threshold) or 'hard' (to v_reset)"),
    "neuron.v_reset": (_num, "a finite number"),
    "neuron.v_init": (lambda v: _num(v) and 0 <= v <= 1, "a fraction of the threshold in [0, 1]"),
    "neuron.tau": (lambda v: _num(v) and v > 1, "> 1 (decay = 1 - 1/tau)"),
    "neuron.max_spikes": (lambda v: _int(v) and v >= 1, "a positive integer (1: binary spikes)"),
    "neuron.signed": (lambda v: isinstance(v, bool), "true or false"),
}


# convert()'s keyword arguments for the fields they set, where the names differ
API_NAMES = {
    "threshold_method": "method",
    "fixed_threshold": "threshold",
    **{f"neuron.{k}": k for k in ("reset", "v_reset", "v_init", "tau", "max_spikes")},
    "neuron.kind": "neuron",
    "neuron.signed": "signed_spikes",
}


def check(name: str, value, label: str | None = None) -> None:
    """Raise one ConversionError unless `value` is valid for the field `name` (a RULES key); `label` is
    how the caller calls it (an argument like --T, or 'checkpoint.safetensors: settings.T')."""
    test, want = RULES[name]
    if not test(value):
        raise ConversionError(f"{label or name} must be {want}, got {value!r}")


def check_allocatable(shape, n: int, what: str) -> None:
    """Refuse, before allocating, n float32 samples of `shape` that would not fit in memory."""
    from snnconv.memory import check_fits

    check_fits(n * math.prod(shape) * 4, f"{what}: input shape {tuple(shape)} for {n} sample(s)")


@dataclass
class Settings:
    T: int = 8
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    threshold_method: str = "search"  # 'search', 'percentile', 'max', or 'fixed'
    percentile: float = 99.99
    per_channel: bool = True
    fixed_threshold: float | None = None
    passes: tuple[str, ...] | None = None  # optional passes to run; None: all
    chunk: int | None = None  # time steps per layer-by-layer chunk; None: all T at once
    input_ndim: int = 0  # rank of the model's input [N, ...]
    input_shape: tuple[int, ...] = ()  # one sample's shape, as calibrated
    input_integer: bool = False  # calibrated on integer inputs (token ids into an embedding table)
    # depthwise convolutions read spikes too (passes/spike_inputs.py); off: they read compensated values
    spike_depthwise: bool = False
    memory_budget_mb: float | None = None  # pick `chunk` so one chunk's activations fit this budget
    readout_delay: int = 0  # leading steps left out of the output mean (transient)
    step_bytes_per_sample: int = 0  # all activations of one step for one sample (measured at convert)
    backend: str = "auto"  # neuron backend: 'auto', 'torch', 'cupy'
    # CPU int8 spike layers, decided once when the graph is lowered (passes/integer_spikes.py) and recorded
    # here, so a checkpoint rebuilds the same layers; None: not decided yet (or the pass is switched off)
    int8: str | None = None

    def validate(self, where: str = "", labels: dict[str, str] | None = None) -> Settings:
        """Check every field against RULES; errors say `{where}{field}`, or labels[field] where the caller
        names it otherwise (convert()'s keyword `threshold` is the field `fixed_threshold`). Returns self."""
        values = {**self.to_dict(), **{f"neuron.{k}": v for k, v in asdict(self.neuron).items()}}
        for name in RULES:
            if name in values:
                check(name, values[name], f"{where}{(labels or {}).get(name, name)}")
        if self.input_ndim and self.input_ndim != len(self.input_shape) + 1:
            raise ConversionError(
                f"{where}input_ndim is {self.input_ndim} but input_shape {list(self.input_shape)} has "
                f"{len(self.input_shape)} dims (input_ndim counts the batch dimension too)"
            )
        if self.neuron.signed and (self.neuron.reset != "soft" or self.neuron.max_spikes != 1):
            raise ConversionError(
                f"{where}{(labels or {}).get('neuron.signed', 'neuron.signed')} needs reset 'soft' and max_spikes 1 "
                "(a signed spike undoes one soft reset)"
            )
        if self.threshold_method == "fixed" and self.fixed_threshold is None:
            raise ConversionError(f"{where}fixed_threshold must be a positive number when threshold_method is 'fixed'")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passes"] = list(self.passes) if self.passes is not None else None
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d, where: str = "settings: ") -> Settings:
        """Settings from JSON (a checkpoint's metadata), validated field by field; `where` prefixes errors."""
        if not isinstance(d, dict):
            raise ConversionError(f"{where.rstrip(': ')} must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {"T", "neuron", "input_ndim", "input_shape"}
        for name in sorted(required - set(d)):
            raise ConversionError(f"{where}{name} is missing")
        neuron = d["neuron"]
        neuron_names = {f.name for f in fields(NeuronConfig)}
        if not isinstance(neuron, dict) or set(neuron) - neuron_names:
            raise ConversionError(f"{where}neuron must be an object with fields {sorted(neuron_names)}, got {neuron!r}")
        for name in ("passes", "input_shape"):
            if d.get(name) is not None:
                check(name, d[name], f"{where}{name}")
        s = cls(**{k: v for k, v in d.items() if k in names and k != "neuron"})
        s.neuron = NeuronConfig(**neuron)
        s.passes = tuple(s.passes) if s.passes is not None else None
        s.input_shape = tuple(s.input_shape)
        s.validate(where)
        if s.input_ndim < 1:
            raise ConversionError(f"{where}input_ndim must be at least 1 (the batch dimension), got {s.input_ndim}")
        return s
