"""Everything a conversion decides that is not a weight: lives outside the state_dict, saved as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from snnconv.runtime.modules import NeuronConfig


@dataclass
class Settings:
    T: int = 8
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    threshold_method: str = "percentile"  # 'max', 'percentile', or 'fixed'
    percentile: float = 99.99
    per_channel: bool = True
    fixed_threshold: float | None = None
    passes: tuple[str, ...] | None = None  # optional passes to run; None: all
    chunk: int | None = None  # time steps per layer-by-layer chunk; None: all T at once
    input_ndim: int = 0  # rank of the model's input [N, ...]
    input_shape: tuple[int, ...] = ()  # one sample's shape, as calibrated
    memory_budget_mb: float | None = None  # pick `chunk` so one chunk's activations fit this budget
    readout_delay: int = 0  # leading steps left out of the output mean (transient)
    step_bytes_per_sample: int = 0  # all activations of one step for one sample (measured at convert)
    backend: str = "auto"  # neuron backend: 'auto', 'torch', 'cupy'

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passes"] = list(self.passes) if self.passes is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Settings:
        d = dict(d)
        d["neuron"] = NeuronConfig(**d["neuron"])
        d["passes"] = tuple(d["passes"]) if d.get("passes") is not None else None
        d["input_shape"] = tuple(d.get("input_shape", ()))
        return cls(**d)
