"""Converted checkpoints: one .safetensors file, no pickle. Its tensors are the ANN's state_dict under
unchanged keys (so the file loads into the plain ANN too); its metadata holds the conversion state as
JSON (T, options, thresholds, biases), the snnconv version, the input shape and the model's source
(a factory spec, or the ONNX / torch.export file itself, stored as a byte tensor under a reserved name)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from snnconv import trusted
from snnconv.errors import ConversionError
from snnconv.io import atomic_write
from snnconv.model import SpikingModel
from snnconv.settings import Settings, check_allocatable

FORMAT = "snnconv-checkpoint/1"
MODEL_KEY = "__snnconv__.model_file"


def save(snn: SpikingModel, path: str | Path, source: dict | None = None, model_file: bytes | None = None) -> None:
    """Write atomically: a temporary file in the same folder, renamed over `path` only when complete."""
    from safetensors.torch import save_file

    import snnconv

    path = Path(path)
    if model_file is None and source is None:  # what the SNN records (convert("model.onnx"), load)
        model_file = getattr(snn, "model_file", None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in snn.state_dict().items()}
    if model_file is not None:  # an .onnx or .pt2 file: the source says which
        tensors[MODEL_KEY] = torch.frombuffer(bytearray(model_file), dtype=torch.uint8)
    meta = {
        "format": FORMAT,
        "snnconv_version": snnconv.__version__,
        "conversion": json.dumps(snn.conversion_state()),
        "source": json.dumps(source if source is not None else snn.source),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a converted checkpoint, validated."""
    from safetensors import safe_open

    from snnconv.io import need_file

    path = need_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ConversionError(
            f"{path}: not a readable snnconv checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'corrupt or truncated'})"
        ) from exc
    if meta.get("format") != FORMAT:
        raise ConversionError(
            f"{path}: not an snnconv checkpoint (format {meta.get('format')!r}); "
            "plain weights go to `snnconv convert --weights`"
        )
    try:
        meta = {**meta, "conversion": json.loads(meta["conversion"]), "source": json.loads(meta["source"])}
    except (KeyError, ValueError, TypeError, RecursionError) as exc:  # ValueError: JSONDecodeError, NaN forms
        raise ConversionError(f"{path}: corrupt checkpoint metadata ({type(exc).__name__}: {exc})"[:400]) from exc
    return tensors, meta


def recorded_source(path: str | Path) -> dict:
    """The checkpoint's source record (how it says the ANN is built), read from its metadata only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            source = json.loads((f.metadata() or {}).get("source", "{}"))
    except Exception:
        return {}  # read() gives the precise error
    return source if isinstance(source, dict) else {}


def load(path: str | Path, model: nn.Module | None = None, trust_source: bool = False) -> SpikingModel:
    """Rebuild the SNN from a checkpoint: the ANN from `model` or the recorded source, its weights
    strictly, then the recorded conversion state (no calibration data needed).

    The file is data: a recorded factory is imported and called only if it is one of the model constructors
    listed in snnconv.trusted, with arguments its table accepts, and an embedded torch.export program
    (deserialised with pickle) is loaded only with trust_source=True. An embedded ONNX graph is data
    (onnx2torch maps each op)."""
    from snnconv.convert import rebuild
    from snnconv.io import load_exported, load_factory, load_onnx, load_state_strict

    tensors, meta = read(path)
    model_file = tensors.pop(MODEL_KEY, None)
    source = meta["source"] or {}
    if not isinstance(source, dict):
        raise ConversionError(f"{path}: metadata field 'source' must be a JSON object, got {type(source).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise ConversionError(f"model= must be an nn.Module (the ANN's architecture), got {type(model).__name__}")
    if model is None:
        if model_file is not None and source.get("onnx"):
            model = load_onnx(bytes(model_file.numpy()), f"{path} (embedded ONNX model)")
        elif model_file is not None and source.get("export"):
            if not trust_source:
                raise ConversionError(
                    f"{path}: the checkpoint embeds a torch.export program, which torch deserialises with "
                    "pickle (it can run code); pass --trust-source (API: trust_source=True) if you trust the "
                    "file's origin, or the model yourself (--model / model=)"
                )
            model = load_exported(bytes(model_file.numpy()), f"{path} (embedded torch.export program)")
        elif "factory" in source and trust_source:
            model = load_factory(source["factory"], source.get("kwargs"))
        elif "factory" in source:
            model = trusted.build(source["factory"], source.get("kwargs"), str(path))
        else:
            raise ConversionError(
                f"{path}: the checkpoint does not record how to build the model; pass "
                "model= (the ANN's architecture) to snnconv.load (CLI: --model pkg.module:factory)"
            )
    load_state_strict(model, tensors, f"checkpoint {path}")
    state = meta["conversion"]
    where = f"{path}: metadata conversion."
    if not isinstance(state, dict) or "settings" not in state:
        raise ConversionError(f"{where}settings is missing (not a complete snnconv checkpoint)")
    settings = Settings.from_dict(state["settings"], f"{where}settings.")
    check_allocatable(settings.input_shape, 2, f"{path}: metadata conversion.settings.input_shape")
    snn = rebuild(model, settings)  # the graph only: thresholds come from the file, not from calibration
    snn.load_conversion_state(state, where)
    snn.source = source
    snn.model_file = bytes(model_file.numpy()) if model_file is not None else None
    return snn
