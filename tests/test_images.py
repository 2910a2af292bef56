"""Folders of images with ImageNet-style preprocessing (--resize, --crop, --mean, --std): values against
numbers worked out by hand on generated images, the CLI end to end, and one-line errors for bad options."""

import textwrap

import numpy as np
import pytest
import torch

from snnconv.cli import main
from snnconv.errors import ConversionError
from snnconv.io import ImagePrep, load_data

Image = pytest.importorskip("PIL.Image")


def _folder(root, sizes=((40, 30), (30, 50), (64, 64))):
    """Class subfolders a/ and b/ with flat-coloured RGB images of different sizes (PIL sizes are w, h)."""
    for i, (w, h) in enumerate(sizes):
        d = root / ("a" if i % 2 == 0 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (10 * i, 100, 200)).save(d / f"img{i}.png")
    return root


def test_flat_images_normalise_to_the_values_worked_out_by_hand(tmp_path):
    root = _folder(tmp_path / "imgs")
    prep = ImagePrep.parse(resize=20, crop=16, mean="0.5,0.25,0", std="0.5,0.25,2")
    x, y = load_data(root, prep=prep)
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [0, 0, 1]  # class subfolders give labels, a < b
    # files in folder order: a/img0, a/img2, b/img1; a flat colour survives resizing and cropping
    for row, i in zip(x, (0, 2, 1)):
        want = [(10 * i / 255 - 0.5) / 0.5, (100 / 255 - 0.25) / 0.25, (200 / 255 - 0) / 2]
        assert torch.allclose(row, torch.tensor(want).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_crop_takes_the_centre_and_resize_the_short_side(tmp_path):
    root = tmp_path / "ramp"
    root.mkdir()
    ramp = np.tile(np.arange(20, dtype=np.uint8)[None, :] * 10, (10, 1))  # 10 high, 20 wide; value = 10 * column
    Image.fromarray(ramp).save(root / "r.png")
    x, _ = load_data(root, prep=ImagePrep.parse(crop=6))
    assert x.shape == (1, 1, 6, 6)
    assert torch.allclose(x[0, 0, 0] * 255, torch.arange(7, 13).float() * 10)  # columns 7..12 of 20, rows 2..7
    x, _ = load_data(root, prep=ImagePrep.parse(resize=5))
    assert x.shape == (1, 1, 5, 10)  # short side (height 10) to 5, aspect kept


def test_grey_images_join_colour_ones_when_mean_has_three_values(tmp_path):
    root = _folder(tmp_path / "mixed", sizes=((32, 32),))
    Image.new("L", (32, 32), 128).save(root / "a" / "grey.png")
    x, _ = load_data(root, prep=ImagePrep.parse(mean="0,0,0"))
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0], torch.full((3, 32, 32), 128 / 255))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(resize=0), "--resize must be a positive"),
        (dict(crop=-3), "--crop must be a positive"),
        (dict(mean="0.5,0.5"), "--mean must be 1 or 3"),
        (dict(mean="a,b,c"), "--mean must be 1 or 3"),
        (dict(std="0.5,0,0.5"), "--std must be positive"),
        (dict(std="nan"), "--std must be 1 or 3 finite"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        ImagePrep.parse(**kwargs)


FACTORY = textwrap.dedent("""
    import torch.nn as nn

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 2))
""")


@pytest.fixture()
def work(tmp_path, monkeypatch):
    (tmp_path / "imgnet.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "imgs", sizes=[(30 + 3 * i, 24 + 2 * i) for i in range(8)])
    torch.manual_seed(0)
    import imgnet

    torch.save(imgnet.net().state_dict(), tmp_path / "w.pth")
    return tmp_path


PREP = ["--resize", "24", "--crop", "16", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def test_cli_convert_and_run_on_an_image_folder(work, capsys):
    assert main(["convert", "imgnet:net", "--weights", "w.pth", "--calib", "imgs", "-o", "n.safetensors", *PREP]) == 0
    assert main(["run", "n.safetensors", "--model", "imgnet:net", "--data", "imgs", "--T", "4", *PREP]) == 0
    assert "accuracy on 8 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "images differ in size"),  # no --resize/--crop: the folder's sizes differ
        (["--crop", "100"], "--crop 100 is larger than the image"),
        (["--resize", "24", "--crop", "16", "--mean", "0.5,0.5"], "--mean must be 1 or 3"),
        (["--resize", "24", "--crop", "16", "--std", "0.5,0.5,0.5,0.5"], "--std must be 1 or 3"),
    ],
)
def test_cli_image_option_errors_are_one_line(work, capsys, extra, message):
    code = main(["convert", "imgnet:net", "--weights", "w.pth", "--calib", "imgs", "-o", "n.safetensors", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (work / "n.safetensors").exists()


def test_cli_image_options_refuse_other_data(work, capsys):
    np.save(work / "c.npy", np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32))
    code = main(
        ["convert", "imgnet:net", "--weights", "w.pth", "--calib", "c.npy", "-o", "n.safetensors", "--crop", "8"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "apply to a folder of images" in err and len(err.strip().splitlines()) == 1
