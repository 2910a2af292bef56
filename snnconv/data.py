"""Loading data the user points at: MNIST-style idx files (optionally gzipped). Nothing is downloaded."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from snnconv.errors import ConversionError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (`.gz` or plain) into an array; a clear error for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ConversionError(f"{path}: not a readable gzip file ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ConversionError(f"{path}: not an idx file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConversionError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != int(np.prod(shape)) * dtype.itemsize:
        raise ConversionError(
            f"{path}: idx payload has {len(raw) - header} bytes, shape {shape} needs "
            f"{int(np.prod(shape)) * dtype.itemsize} (truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def load_mnist(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from a folder holding the four idx files: images [N, 1, 28, 28] in [0, 1], labels [N]."""
    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}[split]
    found = {}
    for kind in ("images.idx3-ubyte", "labels.idx1-ubyte"):
        for name in (f"{prefix}-{kind}.gz", f"{prefix}-{kind}", f"{prefix}-{kind.replace('.', '-')}.gz"):
            if (root / name).is_file():
                found[kind] = root / name
                break
        else:
            raise ConversionError(f"{root}: no {prefix}-{kind}[.gz]; point at the folder with MNIST's idx files")
    images = torch.from_numpy(load_idx(found["images.idx3-ubyte"]).copy()).float().div_(255).unsqueeze(1)
    labels = torch.from_numpy(load_idx(found["labels.idx1-ubyte"]).astype(np.int64))
    if len(images) != len(labels):
        raise ConversionError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels
