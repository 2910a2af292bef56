"""Data as a stream: what the CLI (or a user) points at becomes a torch Dataset read sample by sample, and
a DataLoader with workers batches it, sharded over ranks by a DistributedSampler under torch.distributed.
Nothing holds the whole data set: `.npy` files and `.pt` tensors are memory-mapped, images are decoded one
at a time. Formats: `.npy`, `.npz` (x, y), `.pt` (tensor or {x, y}), an idx file, an MNIST folder, a folder
of images (class subfolders give labels: the ImageFolder layout), or a folder of `.npy`/`.npz`/`.pt` shards.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from snnconv import distributed, interrupt
from snnconv.errors import ConversionError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm"}
SHARD_EXTS = {".npy", ".npz", ".pt", ".pth"}


_NUMERIC = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_numeric(x, what: str) -> None:
    """What io.load_data refuses, checked on the array's type without reading its values."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise ConversionError(f"{what}: holds {x.dtype} values, expected numbers")
    elif not isinstance(x, torch.Tensor):
        raise ConversionError(f"{what}: expected a numeric array, found {type(x).__name__}")
    elif not (x.is_floating_point() or x.dtype in _NUMERIC):
        raise ConversionError(f"{what}: holds {x.dtype} values, expected real numbers")


def _as_float(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.float() / 255.0 if t.dtype == torch.uint8 else t.float()  # 8-bit data are images


class ArrayFile(Dataset):
    """One file of samples [N, ...] (and labels), opened lazily in each worker; .npy memory-mapped."""

    def __init__(self, path: Path, trust_pickle: bool = False):
        self.path, self.trust_pickle = path, trust_pickle
        self._x, self._y = None, None
        x, y = self._open()
        _check_numeric(x, str(path))
        if x.ndim < 2 or len(x) == 0:
            raise ConversionError(f"{path}: data has shape {tuple(x.shape)}; expected [N, ...] with N > 0")
        if y is not None and len(y) != len(x):
            raise ConversionError(f"{path}: {len(y)} labels for {len(x)} inputs in {path}; give one label per input")
        self.n, self.has_labels = len(x), y is not None
        self.labels = y
        self._x = self._y = None  # reopened where used: a worker maps the file itself

    def _open(self):
        if self._x is not None:
            return self._x, self._y
        p, y = self.path, None
        if p.suffix == ".npy":
            from snnconv.io import _npy_header_check

            _npy_header_check(p, str(p))  # a header that declares more than the file holds: one clear line
            try:
                x = np.load(p, mmap_mode="r", allow_pickle=False)
            except ValueError as exc:
                if "object" in str(exc).lower() or "pickle" in str(exc):
                    raise ConversionError(
                        f"{p}: holds Python objects (an object array), which only unpickling could read; "
                        "refusing: save a numeric array"
                    ) from exc
                raise ConversionError(f"{p}: not a readable .npy file ({exc})") from exc
            except Exception as exc:
                raise ConversionError(f"{p}: not a readable .npy file ({type(exc).__name__}: {exc})") from exc
        elif p.suffix in (".pt", ".pth"):
            x, y = _torch_file(p, self.trust_pickle)
        else:  # .npz and idx files are read whole, with io.load_data's checks
            from snnconv.io import load_data

            x, y = load_data(p, trust_pickle=self.trust_pickle)
        self._x, self._y = x, y
        return x, y

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x, y = self._open()
        xi = _as_float(np.array(x[i]) if isinstance(x, np.ndarray) else x[i].clone())
        if not torch.isfinite(xi).all():  # checked as samples are read: the file is never scanned whole
            raise ConversionError(f"{self.path}: sample {i} contains NaN or Inf values")
        return (xi, int(y[i])) if y is not None else xi


def _torch_file(p: Path, trust_pickle: bool):
    from snnconv.io import _torch_load, labels_tensor

    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle, mmap=True)
    except Exception:
        obj = _torch_load(p, trust_pickle)  # its one-line error (or a file torch cannot map: legacy format)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        obj = {"x": obj[0], "y": obj[1]}
    if isinstance(obj, dict):
        xk = next((k for k in ("x", "data", "images", "inputs") if k in obj), None)
        yk = next((k for k in ("y", "labels", "targets") if k in obj), None)
        if xk is None:
            raise ConversionError(f"{p}: expected a tensor or a dict with 'x' (and 'y'), found keys {list(obj)[:8]}")
        return obj[xk], (labels_tensor(obj[yk], str(p)) if yk else None)
    if isinstance(obj, torch.Tensor):
        return obj, None
    raise ConversionError(f"{p}: expected a tensor, found {type(obj).__name__}")


class Shards(Dataset):
    """Several array files read as one data set, in name order."""

    def __init__(self, files: list[ArrayFile]):
        self.files = files
        self.starts = np.cumsum([0] + [len(f) for f in files]).tolist()
        self.has_labels = all(f.has_labels for f in files)
        if any(f.has_labels for f in files) and not self.has_labels:
            raise ConversionError(f"{files[0].path.parent}: some shards carry labels and some do not")

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int):
        k = bisect.bisect_right(self.starts, i) - 1
        return self.files[k][i - self.starts[k]]


def class_labels(names: list[str]) -> tuple[dict[str, int], str]:
    """Class subfolder names -> labels, and the rule in words. Names that are all integers are class indices
    (ImageNet's "243/"); other names are numbered in sorted order, as torchvision's ImageFolder does."""
    names = sorted(names)
    if all(n.isascii() and n.isdigit() for n in names):
        labels, rule = {n: int(n) for n in names}, "class subfolder names are integers, read as the class indices"
    else:
        labels, rule = {n: i for i, n in enumerate(names)}, "class subfolders numbered in sorted order (ImageFolder)"
    shown = ", ".join(f"{n}/ -> {c}" for n, c in list(labels.items())[:3]) + (", ..." if len(names) > 3 else "")
    return labels, f"labels: {rule}: {shown}"


class ImageFiles(Dataset):
    """Images decoded one at a time: [C, H, W] in [0, 1]; class subfolders give labels (class_labels)."""

    def __init__(self, root: Path, prep=None):
        try:
            import PIL.Image  # noqa: F401
        except ImportError as exc:
            raise ConversionError("reading a folder of images needs Pillow: pip install pillow") from exc
        classes, self.label_rule = class_labels([p.name for p in root.iterdir() if p.is_dir()])
        if classes:
            files = [(f, c) for d, c in classes.items() for f in sorted((root / d).iterdir())]
        else:
            files = [(f, -1) for f in sorted(root.iterdir())]
            self.label_rule = None
        self.files = [(f, c) for f, c in files if f.suffix.lower() in IMAGE_EXTS]
        if not self.files:
            raise ConversionError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
        self.root, self.has_labels, self.prep = root, bool(classes), prep
        self.shape = tuple(self._load(0).shape)

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image

        f = self.files[i][0]
        try:
            with Image.open(f) as im:
                im.load()
                prepped = self.prep is not None and self.prep.active()
                a = self.prep(im, f) if prepped else np.asarray(im)  # prep: resize, crop, (x / 255 - mean) / std
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"{f}: not a readable image ({exc})") from exc
        x = torch.from_numpy(np.array(a, dtype=np.float32))
        x = x if prepped else x / 255.0
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
        if i and tuple(x.shape) != self.shape:
            raise ConversionError(
                f"{f}: images differ in size ({tuple(x.shape)}, the first {self.shape}); resize them to one shape "
                "(--resize, --crop)"
            )
        return x

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        x = self._load(i)
        return (x, self.files[i][1]) if self.has_labels else x


class Labelled(Dataset):
    """Inputs from one data set, labels from a separate file (.npy or idx)."""

    def __init__(self, data: Dataset, labels: Path, data_path: Path):
        from snnconv.io import load_labels

        self.labels = load_labels(labels)
        if len(self.labels) != len(data):
            raise ConversionError(
                f"{labels}: {len(self.labels)} labels for {len(data)} inputs in {data_path}; give one label per input"
            )
        self.data, self.has_labels = data, True

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        item = self.data[i]
        return (item[0] if isinstance(item, tuple) else item, int(self.labels[i]))


def open_dataset(path: str | Path, labels: str | Path | None = None, trust_pickle: bool = False, prep=None) -> Dataset:
    """A Dataset over what `path` names (see the module doc); `.has_labels` says whether items are (x, y).
    prep (snnconv.io.ImagePrep): how each image of a folder is resized, cropped and normalised."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if prep is not None and prep.active() and not (path.is_dir() and not _mnist(path)):
        raise ConversionError(f"{path}: --resize/--crop/--mean/--std apply to a folder of images; this is not one")
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if any(n.startswith(("t10k-images", "train-images")) for n in names):
            from snnconv.data import load_mnist

            x, y = load_mnist(path, "test" if any(n.startswith("t10k") for n in names) else "train")
            ds: Dataset = torch.utils.data.TensorDataset(x, y)
            ds.has_labels = True
        elif any(p.is_file() and p.suffix in SHARD_EXTS for p in path.iterdir()):
            ds = Shards([ArrayFile(p, trust_pickle) for p in sorted(path.iterdir()) if p.suffix in SHARD_EXTS])
        else:
            ds = ImageFiles(path, prep)
    else:
        ds = ArrayFile(path, trust_pickle)
    if labels is not None:
        ds = Labelled(ds, Path(labels), path)
    return ds


def _max_label(ds: Dataset) -> int | None:
    if isinstance(ds, (ArrayFile, Labelled)):
        y = ds.labels
    elif isinstance(ds, Shards):
        return max((_max_label(f) or 0) for f in ds.files)
    elif isinstance(ds, ImageFiles):
        return max(c for _, c in ds.files)
    elif isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) > 1:
        y = ds.tensors[1]
    else:
        return None
    return int(torch.as_tensor(y).max()) if y is not None and len(y) else None


def check_labels(ds: Dataset, snn, what) -> None:
    """Labels must index the model's outputs (checked once, before the run)."""
    top = _max_label(ds)
    if top is None:
        return
    item = ds[0]
    with torch.no_grad():
        out = snn.graph_module((item[0] if isinstance(item, tuple) else item).unsqueeze(0))  # ANN mode
    classes = out.shape[-1] if isinstance(out, torch.Tensor) and out.dim() == 2 else None
    if classes is not None and top >= classes:
        raise ConversionError(f"{what}: label {top} is out of range for the model's {classes} outputs")


def _mnist(path: Path) -> bool:
    return any(p.name.startswith(("t10k-images", "train-images")) for p in path.iterdir())


def sample_shape(ds: Dataset) -> tuple[int, ...]:
    item = ds[0]
    return tuple((item[0] if isinstance(item, (tuple, list)) else item).shape)


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


def _ignore_ctrl_c(_worker_id: int) -> None:
    """Ctrl-C reaches the workers too; the main process stops them (an interrupted worker breaks shutdown)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _ctrl_c_held():
    """Ctrl-C waits until the block is done, then is delivered to whichever handler the caller had. Python
    runs a pending SIGINT's handler wherever it next checks: inside os.fork's at-fork hooks (logging's lock
    release) or a worker iterator's shutdown, which often runs in __del__, the KeyboardInterrupt is printed
    as "Exception ignored" and dropped (snnconv.interrupt still sees the Ctrl-C), and a shutdown cut short
    leaves its worker processes running."""
    if threading.current_thread() is not threading.main_thread():  # only there are signals handled
        yield
        return
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            signal.raise_signal(signal.SIGINT)


class _WorkerIter(_MultiProcessingDataLoaderIter):
    def _shutdown_workers(self) -> None:
        with _ctrl_c_held():
            super()._shutdown_workers()


class _Loader(DataLoader):
    """A DataLoader whose worker processes start and stop with Ctrl-C held back (see _ctrl_c_held)."""

    def __iter__(self):
        interrupt.check()  # a Ctrl-C dropped since the last pass (in a finaliser, an iterator's __del__)
        if not self.num_workers:
            return super().__iter__()
        with _ctrl_c_held():
            return super().__iter__()  # forks the workers

    def _get_iterator(self):
        if not self.num_workers:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _WorkerIter(self)


def loader(ds: Dataset, batch: int, workers: int | None = None, limit: int | None = None, pin: bool = False):
    """Batches of ds (its first `limit` samples), this rank's shard under torch.distributed."""
    if limit is not None and limit < len(ds):
        sub = torch.utils.data.Subset(ds, range(limit))
        sub.has_labels = getattr(ds, "has_labels", False)
        ds = sub
    sampler = DistributedSampler(ds, shuffle=False) if distributed.active() else None
    workers = default_workers() if workers is None else workers
    return _Loader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        worker_init_fn=_ignore_ctrl_c if workers else None,
        prefetch_factor=2 if workers else None,
    )


def reraise_worker_error(exc: Exception) -> ConversionError:
    """A ConversionError raised in a DataLoader worker arrives wrapped with the worker's traceback: keep the
    one line that names the file."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return ConversionError(lines[-1].removeprefix("snnconv.errors.ConversionError: ") if lines else str(exc))
