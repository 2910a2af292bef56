"""torch.distributed: two gloo processes on the CPU, each with its shard, against one process on all the data
(max and percentile thresholds and accuracy exactly, percentiles up to float rounding), and the CLI under
torchrun's environment writing one checkpoint."""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import snnconv
from snnconv import distributed
from snnconv.calibrate import Stats
from snnconv.distributed import Histogram, Tail

WORLD, SAMPLES = 2, 45  # odd: the DistributedSampler pads one rank with a repeated sample


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).eval()


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(SAMPLES, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = make_net()(x + 0.05 * torch.randn(x.shape, generator=g)).argmax(1)  # labels the ANN mostly gets right
    return x, y


CASES = {  # name -> convert options
    "max": {"method": "max", "bias_calibration": False},
    "percentile": {"method": "percentile", "percentile": 99.0, "bias_calibration": False},
    "per_layer": {"method": "percentile", "percentile": 99.9, "per_channel": False, "bias_calibration": False},
    "bias": {"method": "max", "bias_calibration": True, "bias_batches": 100},
    "search": {"method": "search", "percentile": 99.0, "bias_calibration": False},
}


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        x, y = make_data()
        ds = TensorDataset(x, y)
        shard = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=False))
        results = {}
        for name, options in CASES.items():
            snn = snnconv.convert(make_net(), T=4, calib=shard, calib_batches=None, **options)
            results[name] = {
                "thresholds": snn.thresholds(),
                "biases": {k: n.bias.clone() for k, n in snn.neurons().items() if n.bias is not None},
            }
            if name == "max":
                results["eval"] = snnconv.evaluate(snn, ds, T=[2, 6], batch=8, progress=False, workers=0)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _relu_outputs(x: torch.Tensor) -> list[torch.Tensor]:
    """Every ReLU's output on all the data, one row per channel, in float64: the exact reference."""
    ann, seen = make_net(), []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o)) for m in ann if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        ann(x)
    for h in hooks:
        h.remove()
    return [o.transpose(0, 1).reshape(o.shape[1], -1).double() for o in seen]


def test_every_rank_gets_the_same_conversion(two_ranks):
    a, b = two_ranks
    for name in CASES:
        for k in a[name]["thresholds"]:
            assert torch.equal(a[name]["thresholds"][k], b[name]["thresholds"][k]), (name, k)
        assert a[name]["biases"].keys() == b[name]["biases"].keys()
        for k in a[name]["biases"]:
            assert torch.equal(a[name]["biases"][k], b[name]["biases"][k]), (name, k)
    assert a["eval"] == b["eval"]


def test_max_thresholds_equal_one_process(two_ranks):
    x, _ = make_data()
    one = snnconv.convert(make_net(), T=4, calib=x, method="max").thresholds()
    assert one.keys() == two_ranks[0]["max"]["thresholds"].keys()
    for k, th in one.items():
        assert torch.equal(two_ranks[0]["max"]["thresholds"][k], th), k


def test_threshold_search_merges_across_ranks(two_ranks):
    """The search's histograms merge exactly and its top (the percentile) is one process's, so it picks one
    process's thresholds."""
    x, _ = make_data()
    one = snnconv.convert(make_net(), T=4, calib=x, method="search", percentile=99.0, bias_calibration=False)
    tops = snnconv.convert(make_net(), T=4, calib=x, method="percentile", percentile=99.0, bias_calibration=False)
    for k, th in one.thresholds().items():
        torch.testing.assert_close(two_ranks[0]["search"]["thresholds"][k], th, rtol=1e-6, atol=0, msg=k)
        assert (th < tops.thresholds()[k]).any(), k  # at T = 4 the search does clip below the percentile


def test_percentile_thresholds_equal_one_process_and_the_exact_percentile(two_ranks):
    """Per channel and per layer: each rank's largest values, gathered, give one process's percentile, whatever
    its batches, and that is torch.quantile of every activation (float64), all up to float32 rounding of the
    layer's largest threshold (a merged histogram's bins are up to 2 * max / 1024 off; a mean of per-batch
    quantiles moves with the batches)."""
    x, _ = make_data()
    outs = _relu_outputs(x)
    for name, q in (("percentile", 0.99), ("per_layer", 0.999)):
        one = snnconv.convert(make_net(), T=4, calib=x, **CASES[name]).thresholds()
        batched = snnconv.convert(make_net(), T=4, calib=list(x.split(8)), **CASES[name]).thresholds()
        two = two_ranks[0][name]["thresholds"]
        assert one.keys() == two.keys() and len(one) == len(outs)
        for (k, th), rows in zip(one.items(), outs):
            rows = rows if name == "percentile" else rows.reshape(1, -1)
            exact = torch.quantile(rows, q, dim=1).reshape(th.shape)
            tol = 1e-6 * th.max().item()
            torch.testing.assert_close(two[k], th, rtol=0, atol=tol, msg=(name, k))
            torch.testing.assert_close(batched[k], th, rtol=0, atol=tol, msg=(name, k))
            torch.testing.assert_close(th.double(), exact, rtol=0, atol=tol, msg=(name, k))


def test_bias_calibration_equals_one_process_on_the_gathered_batches(two_ranks):
    x, _ = make_data()
    shards = [x[r::WORLD].split(8) for r in range(WORLD)]  # each rank's batches (rank 1: no padding sample)
    turns = [b[i] for i in range(3) for b in shards]  # the order every rank runs them in (distributed.everyones)
    one = snnconv.convert(make_net(), T=4, calib=turns, method="max", bias_calibration=True, bias_batches=100)
    for k, n in one.neurons().items():
        torch.testing.assert_close(two_ranks[0]["bias"]["biases"][k], n.bias, rtol=1e-5, atol=1e-6)


def test_merged_evaluation_equals_one_process(two_ranks):
    x, y = make_data()
    snn = snnconv.convert(make_net(), T=4, calib=x, method="max", bias_calibration=False)
    one = snnconv.evaluate(snn, x, y, T=[2, 6], batch=8, progress=False)
    merged = two_ranks[0]["eval"]
    assert merged["samples"] == one["samples"] == SAMPLES  # the sampler's padding counted once
    assert merged["accuracy_by_T"] == one["accuracy_by_T"]
    assert merged["ann_accuracy"] == one["ann_accuracy"]
    assert len(one["accuracy_by_T"]) == 6 and one["Ts"] == [2, 6]
    for k in ("ann_macs", "snn_acs", "snn_macs", "snn_energy_uj"):
        assert merged[k] == pytest.approx(one[k], rel=1e-9), k
    for k, rate in one["firing_rates"].items():
        assert merged["firing_rates"][k] == pytest.approx(rate, rel=1e-9), k


def test_histogram_merges_exactly_and_keeps_its_bound():
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(3, 20000, generator=g)) * torch.tensor([[1.0], [50.0], [1e-3]])
    whole, parts = Histogram(3), [Histogram(3), Histogram(3)]
    whole.add(x)
    for i, part in enumerate(x.sort(1).values.split(5000, 1)):  # small values first: the ranges must grow
        parts[i % 2].add(part)
    top = torch.maximum(parts[0].log2_range, parts[1].log2_range)
    for p in parts:  # what merge_across_ranks does, without a process group
        p._grow(top)
    assert torch.equal(parts[0].log2_range, parts[1].log2_range)
    assert torch.equal(parts[0].counts + parts[1].counts, whole.counts)
    for q in (0.5, 0.99, 0.9999):
        err = (whole.quantile(q).double() - torch.quantile(x.double(), q, dim=1)).abs()
        assert (err <= whole.bin_width).all() and (whole.bin_width <= 2 * x.amax(1) / 1024).all()


def test_tail_is_exact_until_its_values_run_out_then_the_histogram_decides():
    """Tail: the exact quantile of all batches in any order; when a row's large values all came first and the
    number of values it needs outgrew what it kept, it says so (NaN) and the observer takes the histogram's
    estimate, within one bin of the exact quantile."""
    g = torch.Generator().manual_seed(4)
    x = torch.relu(torch.randn(3, 30000, generator=g)) * torch.tensor([[1.0], [50.0], [1e-3]])
    orders = {"random": torch.randperm(30000, generator=g), "up": x[0].argsort(), "down": x[0].argsort(descending=True)}
    for name, order in orders.items():
        for q in (0.5, 0.99, 0.9999):
            tail = Tail(3, q)
            for part in x[:, order].split(1000, 1):
                tail.add(part)
            exact = torch.quantile(x.double(), q, dim=1)
            got = tail.quantile(q).double()
            fine = ~got.isnan()
            assert ((got - exact).abs() <= 1e-6 * exact)[fine].all(), (name, q)
            assert fine.all() or (name == "down" and q == 0.99), (name, q)  # 0.9999 needs fewer than it keeps
    stats = Stats(True, 0.99)  # row 0's largest values first: its tail cannot decide, the histogram does
    for part in x[:, orders["down"]].split(1000, 1):
        stats(part.T)  # [samples, channels]
    assert stats.tail.quantile(0.99).isnan().tolist() == [True, False, False]
    exact = torch.quantile(x.double(), 0.99, dim=1)
    err = (stats.threshold("percentile").double() - exact).abs()
    assert err[0] <= stats.histogram.bin_width[0] and (err[1:] <= 1e-6 * exact[1:]).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_under_torchrun_env_writes_one_checkpoint(tmp_path):
    """Two ranks of `python -m snnconv convert` with torchrun's variables: one file, rank 0's, whose
    thresholds equal a one-process conversion's (max)."""
    import subprocess

    x, _ = make_data()
    np.save(tmp_path / "calib.npy", x.numpy())
    (tmp_path / "out").mkdir()
    port = _free_port()
    env_base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD)}
    cmd = [sys.executable, "-m", "snnconv", "convert", "tests.test_distributed:make_net", "--calib"]
    cmd += [str(tmp_path / "calib.npy"), "--method", "max", "-o", str(tmp_path / "out" / "m.safetensors")]
    procs = [
        subprocess.Popen(
            cmd,
            env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"},
            cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(WORLD)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "on 2 ranks" in outs[0][0] and outs[1][0] == ""  # rank 0 reports, rank 1 is silent
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.safetensors"]  # no temporaries left
    loaded = snnconv.load(tmp_path / "out" / "m.safetensors", model=make_net())
    one = snnconv.convert(make_net(), T=8, calib=x, method="max")
    for k, th in one.thresholds().items():
        assert torch.equal(loaded.thresholds()[k], th), k
    assert not distributed.active()
