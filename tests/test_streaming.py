"""Streamed data (snnconv.datasets) against the in-memory loader, snnconv.evaluate against a direct loop,
and the automatic time chunk (snnconv.memory)."""

import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import snnconv
from snnconv import datasets, memory
from snnconv.cli import main
from snnconv.io import load_data


def _stack(ds):
    items = [ds[i] for i in range(len(ds))]
    if isinstance(items[0], tuple):
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])
    return torch.stack(items), None


@pytest.fixture
def files(tmp_path):
    g = np.random.default_rng(0)
    x = g.integers(0, 256, (12, 3, 5, 5), dtype=np.uint8)
    y = g.integers(0, 4, 12)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    torch.save({"x": torch.from_numpy(x).float() / 255, "y": torch.from_numpy(y)}, tmp_path / "xy.pt")
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.array_split(np.arange(12), 3)):
        np.savez(shards / f"part{i}.npz", x=x[part], y=y[part])
    from PIL import Image

    for i in range(12):
        (tmp_path / "images" / f"c{y[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i].transpose(1, 2, 0)).save(tmp_path / "images" / f"c{y[i]}" / f"{i:02d}.png")
    return tmp_path, torch.from_numpy(x).float() / 255, torch.from_numpy(y)


@pytest.mark.parametrize("name", ["x.npy", "xy.npz", "xy.pt", "images"])
def test_streamed_formats_equal_the_in_memory_loader(files, name):
    root, _, _ = files
    labels = root / "y.npy" if name == "x.npy" else None
    x_ref, y_ref = load_data(root / name, labels)
    if name == "images":  # the in-memory loader lists class folders in directory order; the stream sorts them
        _, x_ref, y_ref = files
        order = sorted(range(len(y_ref)), key=lambda i: (int(y_ref[i]), i))
        x_ref, y_ref = x_ref[order], y_ref[order]
    x, y = _stack(datasets.open_dataset(root / name, labels))
    assert torch.equal(x, x_ref)
    assert torch.equal(y, y_ref)


def test_shards_read_as_one_data_set(files):
    root, x_ref, y_ref = files
    ds = datasets.open_dataset(root / "shards")
    assert len(ds) == 12 and ds.has_labels
    x, y = _stack(ds)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    batches = list(datasets.loader(ds, 5, workers=1))  # worker processes map the files themselves
    assert torch.equal(torch.cat([b[0] for b in batches]), x_ref)


def test_npy_is_memory_mapped(files):
    root, _, _ = files
    ds = datasets.open_dataset(root / "x.npy")
    ds[0]
    assert isinstance(ds._x, np.memmap)


def test_bad_image_names_the_file(files, capsys):
    root, _, _ = files
    (root / "images" / "c0" / "zz.png").write_bytes(b"not a png")
    ds = datasets.open_dataset(root / "images")
    with pytest.raises(snnconv.ConversionError, match=r"zz\.png: not a readable image"):
        _stack(ds)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 8), nn.ReLU(), nn.Linear(8, 4)
    ).eval()


_FORK_HOOK = {"registered": False, "armed": False}


def _interrupt_fork():
    if _FORK_HOOK["armed"]:
        _FORK_HOOK["armed"] = False
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands inside os.fork's hooks


def test_ctrl_c_while_workers_start_is_not_lost():
    """Unguarded, Python prints "Exception ignored" for a KeyboardInterrupt raised in an at-fork hook and
    carries on: a Ctrl-C pressed while a DataLoader forked its workers was silently dropped."""
    if not _FORK_HOOK["registered"]:
        os.register_at_fork(before=_interrupt_fork)  # cannot be removed: inert unless armed
        _FORK_HOOK["registered"] = True
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ds = torch.utils.data.TensorDataset(torch.arange(8.0))
        _FORK_HOOK["armed"] = True
        with pytest.raises(KeyboardInterrupt):
            for _ in datasets.loader(ds, batch=2, workers=1):
                pass
        assert not _FORK_HOOK["armed"]  # the hook did fire
        batches = [b for (b,) in datasets.loader(ds, batch=2, workers=1)]  # and loaders work after it
        assert torch.equal(torch.cat(batches), torch.arange(8.0))
    finally:
        _FORK_HOOK["armed"] = False
        signal.signal(signal.SIGINT, previous)


def test_evaluate_matches_a_direct_loop(files):
    _, x, y = files
    snn = snnconv.convert(_net(), T=5, calib=x)
    r = snnconv.evaluate(snn, DataLoader(list(zip(x, y)), batch_size=5), T=[2, 5], progress=False)
    with torch.no_grad():
        per_step = snn(x, per_step=True)  # [T, N, classes]
        ann = _net()(x).argmax(1)
    ref = [(per_step[:t].mean(0).argmax(1) == y).float().mean().item() * 100 for t in range(1, 6)]
    assert r["accuracy_by_T"] == pytest.approx(ref)
    assert r["ann_accuracy"] == pytest.approx((ann == y).float().mean().item() * 100)
    assert r["samples"] == 12 and r["Ts"] == [2, 5] and snn.T == 5


def test_cli_run_streams_a_shard_folder(files, capsys, tmp_path):
    root, _, _ = files
    import sys

    sys.modules["streaming_net"] = type(sys)("streaming_net")
    sys.modules["streaming_net"].net = _net
    ckpt = tmp_path / "m.safetensors"
    assert main(["convert", "streaming_net:net", "--calib", str(root / "shards"), "-o", str(ckpt)]) == 0
    run = ["run", str(ckpt), "--model", "streaming_net:net", "--data", str(root / "shards"), "--T", "2,4"]
    assert main([*run, "--batch", "5", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "accuracy on 12 samples" in out and "T=4" in out
    assert "planned time chunk" in out and "peak resident memory" in out


def test_auto_chunk_follows_available_memory(monkeypatch):
    x = torch.rand(4, 3, 5, 5)
    snn = snnconv.convert(_net(), T=16, calib=x)
    step = snn.settings.step_bytes_per_sample * len(x)
    full = snn(x)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": int(2 * 3.5 * step))  # half: 3.5 steps
    plan = memory.plan_chunk(snn.settings, 16, len(x))
    assert plan.chunk == 3 and "auto" in plan.why
    torch.testing.assert_close(snn(x), full, rtol=0, atol=1e-6)  # chunking changes no spike
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1 << 40)
    assert memory.plan_chunk(snn.settings, 16, len(x)).chunk == min(16, memory.CAP_BYTES // step)
    snn.settings.chunk = 4
    assert memory.plan_chunk(snn.settings, 16, len(x)).chunk == 4


@pytest.mark.parametrize("passes", [None, []])  # hoisted input layer, and one that runs at every step
def test_evaluation_counts_do_not_depend_on_the_time_chunk(files, passes):
    _, x, y = files
    snn = snnconv.convert(_net(), T=6, calib=x, passes=passes)
    whole = snnconv.evaluate(snn, x, y, batch=5, progress=False)
    snn.settings.chunk = 4  # chunks of 4 and 2 steps
    chunked = snnconv.evaluate(snn, x, y, batch=5, progress=False)
    assert chunked["accuracy_by_T"] == whole["accuracy_by_T"]
    for k in ("ann_macs", "snn_acs", "snn_macs"):
        assert chunked[k] == pytest.approx(whole[k], rel=1e-9), k
    assert whole["snn_macs"] > 0
