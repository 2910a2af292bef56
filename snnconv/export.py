"""ONNX export: the SNN with its T steps unrolled into one static graph (fixed batch size), checked by
onnx.checker. Neurons export their out-of-place form (runtime/torch_backend.multistep_functional)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from snnconv.errors import ConversionError
from snnconv.model import SpikingModel


class _Unrolled(nn.Module):
    def __init__(self, snn: SpikingModel):
        super().__init__()
        self.snn = snn

    def forward(self, x):
        return self.snn(x)


def export_onnx(snn: SpikingModel, path: str | Path, batch: int = 1, opset: int = 17) -> None:
    try:
        import onnx
    except ImportError as exc:
        raise ConversionError("ONNX export needs onnx: pip install 'snnconv[onnx]'") from exc
    example = torch.rand(batch, *snn.settings.input_shape)
    backend, chunk = snn.settings.backend, snn.settings.chunk
    snn.settings.backend, snn.settings.chunk = "torch", None
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Unrolled(snn),
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["x"],
                output_names=["y"],
            )
    except Exception as exc:
        raise ConversionError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    finally:
        snn.settings.backend, snn.settings.chunk = backend, chunk
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    from snnconv.io import atomic_write

    atomic_write(Path(path), buf.getvalue())
