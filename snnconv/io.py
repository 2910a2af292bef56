"""Reading what users point the CLI at: models (factory + weights, ONNX, torch.export), weights files and
data. Every failure is a ConversionError that names the file and the problem; nothing runs pickled code
unless the user passes trust_pickle."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from snnconv.data import load_idx, load_mnist
from snnconv.errors import ConversionError


@contextlib.contextmanager
def quiet_torch_logs(level: int = logging.ERROR):
    """Raise torch's loggers to `level` for a while: torch logs whole tracebacks as warnings (e.g. when a
    .pt2 file does not parse) above the one-line error snnconv gives for the same failure."""
    names = ["torch", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.level))
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def need_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, expected a file")
    return path


def _torch_load(path: Path, trust_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:
        text = str(exc)
        with open(path, "rb") as f:
            raw_pickle = f.read(1) == b"\x80"  # a bare pickle stream rather than torch's zip container
        if "Unsupported global" in text or (raw_pickle and "WeightsUnpickler" in text):
            raise ConversionError(
                f"{path}: refusing to unpickle: the file holds Python objects beyond tensors, "
                "and unpickling can run arbitrary code; re-save it as a state_dict, or pass "
                "--trust-pickle if you trust its origin"
            ) from exc
        raise ConversionError(
            f"{path}: not a readable torch file ({type(exc).__name__}: "
            f"{text.splitlines()[0] if text else 'corrupt or truncated'})"
        ) from exc


def load_weights(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state_dict from .pth/.pt (also nested under 'state_dict'/'model', DDP 'module.' prefixes) or
    .safetensors."""
    path = need_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        sd = _torch_load(path, trust_pickle)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
                break
        if isinstance(sd, nn.Module):
            sd = sd.state_dict()
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{path}: expected a state_dict (names -> tensors), found {type(sd).__name__}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_state_strict(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that says which keys and shapes disagree."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:

        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = ([f"missing keys: {few(missing)}"] if missing else []) + (
            [f"unexpected keys: {few(unexpected)}"] if unexpected else []
        )
        raise ConversionError(f"{what} does not fit the model: {'; '.join(parts)}")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ConversionError(f"{what}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)


def _why(exc: BaseException) -> str:
    """One line about an exception: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def load_factory(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Build a model from 'package.module:callable' the user named (e.g. torchvision.models:resnet18; a file's
    record goes through snnconv.trusted instead). Whatever the module or the factory raises (import errors,
    syntax errors, rejected arguments) becomes one ConversionError."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConversionError(f"model factory {spec!r} must look like 'package.module:function'")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConversionError(f"cannot import {mod_name!r} for factory {spec!r}: {exc}") from exc
    except SyntaxError as exc:
        raise ConversionError(
            f"cannot import {mod_name!r} for factory {spec!r}: syntax error in {exc.filename}, line {exc.lineno}"
        ) from exc
    except Exception as exc:
        raise ConversionError(f"importing {mod_name!r} for factory {spec!r} failed: {_why(exc)}") from exc
    fn = module
    for part in attr.split("."):  # a class method too: package.module:Class.from_name
        fn = getattr(fn, part, None)
    if fn is None or not callable(fn):
        raise ConversionError(f"{mod_name} has no callable {attr!r} (factory {spec!r})")
    return call_factory(fn, spec, kwargs)


def call_factory(fn, spec: str, kwargs: dict | None) -> nn.Module:
    """fn(**kwargs); whatever it raises, or a result that is not an nn.Module, becomes one ConversionError."""
    try:
        model = fn(**(kwargs or {}))
    except TypeError as exc:
        raise ConversionError(f"factory {spec!r} rejected --kwargs {json.dumps(kwargs or {})}: {exc}") from exc
    except Exception as exc:
        raise ConversionError(f"factory {spec!r} failed with --kwargs {json.dumps(kwargs or {})}: {_why(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ConversionError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def load_onnx(source: str | Path | bytes, what: str = "ONNX bytes") -> nn.Module:
    """An ONNX CNN as a traceable torch GraphModule, through onnx2torch (extra: snnconv[onnx])."""
    try:
        import onnx
        from onnx2torch import convert as onnx_to_torch
    except ImportError as exc:
        raise ConversionError("ONNX import needs the extra: pip install 'snnconv[onnx]' (onnx, onnx2torch)") from exc
    try:
        model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(need_file(source)))
        onnx.checker.check_model(model)
        external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(
            f"{source if not isinstance(source, bytes) else what}: not a valid ONNX model ({_why(exc)})"
        ) from exc
    if external:  # the graph would read other files named inside it
        raise ConversionError(
            f"{source if not isinstance(source, bytes) else what}: tensors stored in external files "
            f"({external[0]}, ...); save the model with its weights inside (save_as_external_data=False)"
        )
    _drop_identity_nodes(model)
    _drop_trailing_empty_inputs(model)
    try:
        return onnx_to_torch(model)
    except NotImplementedError as exc:
        raise ConversionError(
            f"ONNX import: {exc}; supported: Conv, Gemm/MatMul, Relu, Clip, "
            "BatchNormalization, pools, Add, Concat, Flatten/Reshape"
        ) from exc


def load_exported(data: bytes, what: str = "torch.export program") -> nn.Module:
    """A torch.export program (.pt2) as a module. It must be exported with a dynamic batch dimension
    (dynamic_shapes={"x": {0: torch.export.Dim("batch")}}): the SNN folds time into the batch."""
    import io as _io

    try:
        with quiet_torch_logs():
            program = torch.export.load(_io.BytesIO(data))
    except Exception as exc:
        raise ConversionError(
            f"{what}: not a readable torch.export program ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'corrupt'})"
        ) from exc
    batch = program.graph_module.graph.find_nodes(op="placeholder")
    user_inputs = [n for n in batch if n.name in program.graph_signature.user_inputs]
    if user_inputs and isinstance(user_inputs[0].meta.get("val"), torch.Tensor):
        size0 = user_inputs[0].meta["val"].shape[0]
        if isinstance(size0, int):
            raise ConversionError(
                f"{what}: exported with a fixed batch size {size0}; export again with "
                "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}"
            )
    gm = program.module()
    for node in list(gm.graph.nodes):  # the input guards check the export-time shapes; T*N batches differ
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _drop_identity_nodes(model) -> None:
    """Identity nodes (exporters emit them for shared initializers) confuse onnx2torch: rewire around them."""
    alias = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity"}
    if not alias:
        return
    graph_outputs = {o.name for o in model.graph.output}
    keep = [n for n in model.graph.node if n.op_type != "Identity" or n.output[0] in graph_outputs]
    for n in keep:
        for i, name in enumerate(n.input):
            while name in alias:
                name = alias[name]
            n.input[i] = name
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _drop_trailing_empty_inputs(model) -> None:
    """An empty input name is an omitted optional input (Clip(x, min, '') from torch.onnx.export); onnx2torch
    reads it as a dynamic value. Trailing ones mean the same as no input at all: drop them."""
    for node in model.graph.node:
        while node.input and node.input[-1] == "":
            del node.input[-1]


def load_model(
    source: str, weights: str | None = None, kwargs: dict | None = None, trust_pickle: bool = False
) -> tuple[nn.Module, dict]:
    """(model, source record) from a factory spec (+ weights file), an .onnx file or a .pt2 program."""
    if source.endswith(".onnx"):
        data = need_file(source).read_bytes()
        return load_onnx(data, source), {"onnx": True}
    if source.endswith(".pt2"):
        return load_exported(need_file(source).read_bytes(), source), {"export": True}
    model = load_factory(source, kwargs)
    if weights is not None:
        load_state_strict(model, load_weights(weights, trust_pickle), f"weights file {weights}")
    return model, {"factory": source, "kwargs": kwargs or {}}


def _as_float(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray) and x.dtype.kind not in "biuf":
        raise ConversionError(f"{what}: holds {x.dtype} values, expected numbers")
    try:
        t = torch.as_tensor(x)
    except Exception as exc:
        raise ConversionError(f"{what}: expected a numeric array, found {type(x).__name__} ({_why(exc)})") from exc
    if not (
        t.is_floating_point() or t.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    ):
        raise ConversionError(f"{what}: holds {t.dtype} values, expected real numbers")
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()  # 8-bit data are images
    if not torch.isfinite(t).all():
        raise ConversionError(f"{what}: contains NaN or Inf values")
    return t


def _npy_header_check(path: Path, what: str) -> None:
    """Compare a .npy header's declared size with the file before numpy allocates it (a crafted header
    can declare terabytes)."""
    _numpy_magic(path, what)
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            have = os.fstat(f.fileno()).st_size - f.tell()
    except Exception:
        return  # np.load gives the precise error
    if dtype.hasobject:
        return
    need = math.prod(shape) * dtype.itemsize
    if need > have:
        raise ConversionError(
            f"{what}: header declares shape {shape} ({need / 2**20:.4g} MiB) but the file holds {have} bytes "
            "(truncated or corrupt)"
        )


_NUMPY_MAGIC = {".npy": b"\x93NUMPY", ".npz": b"PK"}  # NumPy's header; a zip archive


def _numpy_magic(path: Path, what: str) -> None:
    """A file without NumPy's own magic bytes would reach np.load's pickle fallback, whose refusal reads as an
    object array: say what it is instead."""
    magic = _NUMPY_MAGIC.get(path.suffix)
    with open(path, "rb") as f:
        head = f.read(len(magic or b""))
    if magic and head and head != magic:
        kind, writer = ("NumPy header", "save") if path.suffix == ".npy" else ("zip archive", "savez")
        raise ConversionError(f"{what}: not a readable {path.suffix} file (no {kind}); write it with numpy.{writer}")


def _np_load(path: Path, what: str):
    """np.load without pickle; an object array or an unreadable file is one ConversionError."""
    if path.suffix == ".npy":
        _npy_header_check(path, what)
    else:
        _numpy_magic(path, what)
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise ConversionError(
                f"{what}: holds Python objects (an object array), which only unpickling could read; refusing: "
                "save a numeric array"
            ) from exc
        raise ConversionError(f"{what}: not a readable {path.suffix} file ({_why(exc)})") from exc
    except Exception as exc:
        raise ConversionError(f"{what}: not a readable {path.suffix} file ({_why(exc)})") from exc


def load_labels(path) -> torch.Tensor:
    """Class labels from a separate file: .npy or an idx file."""
    lp = need_file(path)
    if "idx" in lp.name:
        raw = load_idx(lp)
    elif lp.suffix == ".npy":
        raw = _np_load(lp, str(lp))
    else:
        raise ConversionError(f"{lp}: unknown labels format {lp.suffix!r}; use .npy or an idx file")
    return labels_tensor(raw, str(lp))


def labels_tensor(y, what: str) -> torch.Tensor:
    """Class labels: a 1-d array of non-negative integers (integral floats accepted)."""
    if isinstance(y, np.ndarray) and y.dtype.kind not in "biuf":
        raise ConversionError(f"{what}: labels hold {y.dtype} values, expected class indices")
    try:
        t = torch.as_tensor(y)
    except Exception as exc:
        raise ConversionError(f"{what}: labels must be an array of class indices ({_why(exc)})") from exc
    if t.dim() != 1:
        raise ConversionError(f"{what}: labels have shape {tuple(t.shape)}; expected one class index per sample [N]")
    if t.is_complex() or t.dtype == torch.bool:
        raise ConversionError(f"{what}: labels hold {t.dtype} values, expected class indices")
    if t.is_floating_point() and not (torch.isfinite(t).all() and (t == t.round()).all()):
        raise ConversionError(f"{what}: labels must be whole numbers (class indices)")
    t = t.long()
    if len(t) and t.min() < 0:
        raise ConversionError(f"{what}: label {t.min().item()} is negative; labels are class indices 0..C-1")
    return t


@dataclass(frozen=True)
class ImagePrep:
    """How a folder of images becomes one tensor (ImageNet style): resize the short side, crop the centre,
    then (x / 255 - mean) / std per channel. None: leave that step out."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, resize=None, crop=None, mean: str | None = None, std: str | None = None) -> ImagePrep:
        """From the CLI's --resize/--crop/--mean/--std; every bad value is a one-line ConversionError."""
        for name, v in (("resize", resize), ("crop", crop)):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ConversionError(f"--{name} must be a positive number of pixels, got {v!r}")

        def floats(name: str, text: str | None) -> tuple[float, ...] | None:
            if text is None:
                return None
            try:
                vals = tuple(float(t) for t in text.split(","))
            except ValueError:
                raise ConversionError(f"--{name} must be 1 or 3 numbers like 0.485,0.456,0.406, got {text!r}") from None
            if len(vals) not in (1, 3) or not all(np.isfinite(vals)):
                raise ConversionError(f"--{name} must be 1 or 3 finite numbers like 0.485,0.456,0.406, got {text!r}")
            return vals

        m, sd = floats("mean", mean), floats("std", std)
        if sd is not None and min(sd) <= 0:
            raise ConversionError(f"--std must be positive, got {std!r}")
        return cls(resize, crop, m, sd)

    def active(self) -> bool:
        return any(v is not None for v in (self.resize, self.crop, self.mean, self.std))

    def __call__(self, im, name: Path) -> np.ndarray:
        from PIL import Image

        if im.mode != "RGB" and any(v is not None and len(v) == 3 for v in (self.mean, self.std)):
            im = im.convert("RGB")  # a grey photo among colour ones
        if self.resize is not None:
            w, h = im.size
            s = self.resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        if self.crop is not None:
            w, h = im.size
            if self.crop > min(w, h):
                raise ConversionError(
                    f"{name}: --crop {self.crop} is larger than the image ({w}x{h}); pass --resize {self.crop} or more"
                )
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            im = im.crop((left, top, left + self.crop, top + self.crop))
        a = np.asarray(im, dtype=np.float32) / 255.0
        a = a[..., None] if a.ndim == 2 else a
        for what, v in (("mean", self.mean), ("std", self.std)):
            if v is not None and len(v) not in (1, a.shape[-1]):
                raise ConversionError(f"{name}: --{what} has {len(v)} values, the image has {a.shape[-1]} channels")
        if self.mean is not None:
            a = a - np.asarray(self.mean, dtype=np.float32)
        if self.std is not None:
            a = a / np.asarray(self.std, dtype=np.float32)
        return a


def load_data(
    path: str | Path, labels: str | Path | None = None, trust_pickle: bool = False, prep: ImagePrep | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and labels where the data has them) from .npy/.npz/.pt, an idx file, an MNIST folder or a
    folder of images (class subfolders give labels; `prep` resizes, crops and normalises them)."""
    path = Path(path)
    y = None
    if prep is not None and prep.active() and not (path.is_dir() and not _is_mnist(path)):
        raise ConversionError(f"{path}: --resize/--crop/--mean/--std apply to a folder of images; this is not one")
    if path.is_dir():
        if _is_mnist(path):
            names = {p.name for p in path.iterdir()}
            x, y = load_mnist(path, "test" if any(n.startswith("t10k") for n in names) else "train")
        else:
            x, y = _image_folder(path, prep or ImagePrep())
    else:
        path = need_file(path)
        if path.suffix == ".npy":
            x = _as_float(_np_load(path, str(path)), str(path))
        elif path.suffix == ".npz":
            z = _np_load(path, str(path))
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ConversionError(f"{path}: not an .npz archive (it holds one array; name it .npy)")
            with z:
                if "x" not in z:
                    raise ConversionError(f"{path}: expected arrays 'x' (and optionally 'y'), found {list(z)}")
                try:
                    xa, ya = z["x"], (z["y"] if "y" in z else None)
                except ValueError as exc:
                    raise ConversionError(
                        f"{path}: holds Python objects (an object array) or a corrupt member; refusing: save "
                        "numeric arrays"
                    ) from exc
                except Exception as exc:
                    raise ConversionError(f"{path}: not a readable .npz file ({_why(exc)})") from exc
            x, y = _as_float(xa, str(path)), (labels_tensor(ya, str(path)) if ya is not None else None)
        elif path.suffix in (".pt", ".pth"):
            obj = _torch_load(path, trust_pickle)
            if isinstance(obj, (tuple, list)) and len(obj) == 2:
                obj = {"x": obj[0], "y": obj[1]}
            if isinstance(obj, dict):
                xk = next((k for k in ("x", "data", "images", "inputs") if k in obj), None)
                yk = next((k for k in ("y", "labels", "targets") if k in obj), None)
                if xk is None:
                    raise ConversionError(
                        f"{path}: expected a tensor or a dict with 'x' (and 'y'), found keys {list(obj)[:8]}"
                    )
                x, y = _as_float(obj[xk], str(path)), labels_tensor(obj[yk], str(path)) if yk else None
            elif isinstance(obj, torch.Tensor):
                x = _as_float(obj, str(path))
            else:
                raise ConversionError(f"{path}: expected a tensor, found {type(obj).__name__}")
        elif "idx" in path.name:
            arr = load_idx(path)
            x = _as_float(arr, str(path))
            if x.dim() == 3:
                x = x.unsqueeze(1)
        else:
            raise ConversionError(
                f"{path}: unknown data format {path.suffix!r}; use .npy, .npz, .pt, an idx file or a folder of images"
            )
    if x.dim() < 2 or len(x) == 0:
        raise ConversionError(f"{path}: data has shape {tuple(x.shape)}; expected [N, ...] with N > 0")
    where = str(path)
    if labels is not None:
        y, where = load_labels(labels), str(labels)
    if y is not None and len(y) != len(x):
        raise ConversionError(f"{where}: {len(y)} labels for {len(x)} inputs in {path}; give one label per input")
    return x, y


def _is_mnist(path: Path) -> bool:
    return path.is_dir() and any(p.name.startswith(("t10k-images", "train-images")) for p in path.iterdir())


def _image_folder(path: Path, prep: ImagePrep) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConversionError("reading a folder of images needs Pillow: pip install pillow") from exc
    exts = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm"}
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    files = (
        [(f, classes.index(d.name)) for d in sorted(path.iterdir()) if d.is_dir() for f in sorted(d.iterdir())]
        if classes
        else [(f, None) for f in sorted(path.iterdir())]
    )
    files = [(f, c) for f, c in files if f.suffix.lower() in exts]
    if not files:
        raise ConversionError(f"{path}: no images ({', '.join(sorted(exts))}) found")
    arrays = []
    for f, _ in files:
        try:
            im = Image.open(f)
            im.load()
        except Exception as exc:
            raise ConversionError(f"{f}: not a readable image ({exc})") from exc
        if prep.active():
            arrays.append(prep(im if im.mode in ("L", "RGB") else im.convert("RGB"), f))
        else:
            arrays.append(np.asarray(im))
    if len({a.shape for a in arrays}) != 1:
        raise ConversionError(
            f"{path}: images differ in size or channels; pass --resize and --crop (e.g. --resize 256 --crop 224)"
        )
    x = torch.as_tensor(np.stack(arrays)).float()
    x = x if prep.active() else x / 255.0
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([c for _, c in files]) if classes else None
    return x, y


def atomic_write(path: Path, content) -> None:
    """Write `content` (bytes, or a function writing to a path) to a temporary file beside `path`, then
    rename it over `path`: a failure (an unwritable folder, a full disk, Ctrl-C) never leaves a half-written
    or temporary file, and is one ConversionError naming the path. While an snnconv command runs, the rename
    waits for its end (snnconv.interrupt): an interrupted or failed command writes nothing."""
    from snnconv import interrupt

    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, expected a file path for the output")
    if path.exists() and not path.is_file():  # renaming over a device or pipe would replace it
        raise ConversionError(f"{path}: is not a regular file (a device or pipe); choose a file path")
    if not path.parent.is_dir():
        raise ConversionError(f"{path.parent}: output folder does not exist")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        if isinstance(content, bytes):
            Path(tmp).write_bytes(content)
        else:
            content(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        interrupt.check()  # a Ctrl-C dropped on the way here (in a finaliser, under C++ code): no output
        if interrupt.hold(tmp, path):  # the command renames it when it ends, unless interrupted or failed
            tmp = None
        else:
            os.replace(tmp, path)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot write the output ({exc.strerror or _why(exc)})") from exc
    except ConversionError:
        raise
    except Exception as exc:  # the writer's own errors (safetensors, matplotlib)
        raise ConversionError(f"{path}: writing the output failed ({_why(exc)})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def parse_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"--kwargs must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({exc})") from exc
    if not isinstance(kw, dict):
        raise ConversionError("--kwargs must be a JSON object")
    return kw
