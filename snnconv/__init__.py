"""snnconv: convert trained PyTorch ANNs into spiking neural networks that keep their weights.

snn = snnconv.convert(model, T=8, calib=data)
y = snn(x)                      # mean output over T steps, ANN-shaped
"""

from snnconv.checkpoint import load, save
from snnconv.convert import convert
from snnconv.errors import ConversionError
from snnconv.model import SpikingModel
from snnconv.nir_graph import from_nir, to_nir, write_nir
from snnconv.qcfs import QCFS
from snnconv.report import inspect

__all__ = [
    "QCFS",
    "ConversionError",
    "SpikingModel",
    "convert",
    "from_nir",
    "inspect",
    "load",
    "save",
    "to_nir",
    "write_nir",
]
__version__ = "0.1.0"
