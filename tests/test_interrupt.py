"""Ctrl-C at any point of `snnconv convert` and `snnconv run` (issue #33): exit 130, the one line
`snnconv VERB: interrupted`, and no output or temporary file, whatever swallowed or transformed the
KeyboardInterrupt (a DataLoader iterator's shutdown or __del__, a finaliser, C++ code that drops it, a
lazy import it broke). Each point is hit deterministically: a driver process patches a function there to
raise SIGINT (signal.raise_signal runs the handler before it returns) and calls snnconv.cli.main once
per point; a few real `python -m snnconv convert` processes get SIGINT at seeded random delays after the
model factory is called."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

FACTORY = textwrap.dedent("""
    import pathlib

    import torch
    import torch.nn as nn


    def net(width: int = 8):
        pathlib.Path("factory-called").touch()  # the timed kills start counting from here
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(width * 16, 10),
        ).eval()
""")

CONVERT = ["convert", "wide:net", "--calib", "calib.npy", "--T", "4"]  # 300 samples: 3 loader batches of 128
RUN = ["run", "ok.safetensors", "--model", "wide:net", "--data", "data.npz", "--workers", "1", "--batch", "32"]
ARGV = {
    "convert": [*CONVERT, "-o", "out.safetensors"],
    "run": [*RUN, "--T", "2,4", "--plot", "out.png"],  # the plot is run's output file
}
INPUTS = {"wide.py", "calib.npy", "data.npz", "ok.safetensors", "driver.py", "factory-called", "__pycache__"}

DRIVER = textwrap.dedent('''
    import contextlib, io, json, os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if CI started us ignoring it
    import safetensors.torch
    import torch.utils.data.dataloader as dl
    import snnconv.calibrate, snnconv.checkpoint, snnconv.datasets, snnconv.io, snnconv.trace
    from snnconv.cli import main

    snnconv.datasets.default_workers = lambda: 1  # convert's loader: one worker process on any machine

    fired = []


    def ctrl_c(point):
        fired.append(point)
        signal.raise_signal(signal.SIGINT)  # runs the process's SIGINT handler before it returns


    class Finaliser:  # Python reports an exception raised in __del__ as "Exception ignored" and drops it
        def __init__(self, point):
            self.point = point

        def __del__(self):
            ctrl_c(self.point)


    @contextlib.contextmanager
    def patched(owner, name, point, nth=1, when="return"):
        """owner.name raises SIGINT on its nth call: on entry, as it returns, or in a finaliser dropped there."""
        real, calls = getattr(owner, name), [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            hit = calls[0] == nth
            if hit and when == "enter":
                ctrl_c(point)
            out = real(*args, **kwargs)
            if hit and when == "return":
                ctrl_c(point)
            if hit and when == "finaliser":
                Finaliser(point)  # collected at once
            return out

        setattr(owner, name, wrapper)
        try:
            yield
        finally:
            setattr(owner, name, real)


    fork = {"nth": 0}


    def before_fork():
        fork["nth"] -= 1
        if fork["nth"] == 0:
            ctrl_c("fork")  # inside os.fork's at-fork hooks, where Python drops exceptions


    os.register_at_fork(before=before_fork)


    @contextlib.contextmanager
    def forking(nth):
        fork["nth"] = nth
        try:
            yield
        finally:
            fork["nth"] = 0


    class DynamoImport:  # the front end imports torch._dynamo lazily, from C++ code that drops exceptions
        def __init__(self, nth):
            self.nth = nth

        def find_spec(self, name, path=None, target=None):
            if name.startswith("torch._dynamo"):
                self.nth -= 1
                if self.nth == 0:
                    ctrl_c("import")
            return None


    @contextlib.contextmanager
    def importing(nth):
        finder = DynamoImport(nth)
        sys.meta_path.insert(0, finder)
        try:
            yield
        finally:
            sys.meta_path.remove(finder)


    Iter, Workers = dl._BaseDataLoaderIter, dl._MultiProcessingDataLoaderIter
    POINTS = {
        "none": contextlib.nullcontext,
        "import-first": lambda: importing(1),  # the KeyboardInterrupt is dropped: conversion goes on
        "import-later": lambda: importing(20),  # the broken import reads as an untraceable model
        "trace": lambda: patched(snnconv.trace._Tracer, "trace", "trace", when="enter"),
        "example-batch": lambda: patched(Iter, "__next__", "batch"),  # convert's first batch
        "calib-batch": lambda: patched(Iter, "__next__", "batch", nth=2),  # first batch of calibration
        "last-calib-batch": lambda: patched(Iter, "__next__", "batch", nth=4),
        "search-batch": lambda: patched(Iter, "__next__", "batch", nth=6),  # the threshold search pass
        "bias-batch": lambda: patched(Iter, "__next__", "batch", nth=8),  # the bias calibration pass
        "calib-forward": lambda: patched(snnconv.calibrate.Stats, "__call__", "forward", when="enter"),
        "bias-forward": lambda: patched(snnconv.calibrate, "_channel_sums", "bias", when="enter"),
        "bias-finaliser": lambda: patched(snnconv.calibrate, "_channel_sums", "bias", nth=3, when="finaliser"),
        "worker-start": lambda: forking(1),
        "later-worker-start": lambda: forking(3),
        "worker-shutdown": lambda: patched(Workers, "_shutdown_workers", "shutdown", when="enter"),
        "later-worker-shutdown": lambda: patched(Workers, "_shutdown_workers", "shutdown", nth=2, when="enter"),
        "iterator-del": lambda: patched(Workers, "__del__", "del", when="enter"),
        "write": lambda: patched(safetensors.torch, "save_file", "write"),
        "write-finaliser": lambda: patched(safetensors.torch, "save_file", "write", when="finaliser"),
        "after-write": lambda: patched(snnconv.checkpoint, "atomic_write", "written"),
        "plot-write": lambda: patched(snnconv.io, "atomic_write", "plot", when="enter"),
        "after-plot-write": lambda: patched(snnconv.io, "atomic_write", "plot"),
    }

    INPUTS = set(json.loads(sys.argv[2]))
    for point, argv in json.loads(sys.argv[1]):
        fired.clear()
        err, escaped = io.StringIO(), None
        with contextlib.redirect_stderr(err), POINTS[point]():
            try:
                rc = main(argv)
            except BaseException as exc:  # the interrupt, or anything else, escaped main
                rc, escaped = None, repr(exc)
        made = sorted(set(os.listdir()) - INPUTS)
        result = {"rc": rc, "err": err.getvalue(), "made": made, "fired": fired[:1], "escaped": escaped}
        print(json.dumps({"verb": argv[0], "point": point, **result}), flush=True)
        for name in made:  # the next point starts from the inputs alone
            os.unlink(name)
''')

CONVERT_POINTS = [
    "trace",
    "example-batch",
    "calib-batch",
    "last-calib-batch",
    "search-batch",
    "bias-batch",
    "calib-forward",
    "bias-forward",
    "bias-finaliser",
    "worker-start",
    "later-worker-start",
    "worker-shutdown",
    "later-worker-shutdown",
    "iterator-del",
    "write",
    "write-finaliser",
    "after-write",
]
RUN_POINTS = ["example-batch", "calib-batch", "worker-start", "worker-shutdown", "iterator-del", "plot-write"]
RUN_POINTS += ["after-plot-write"]
# while torch._dynamo is not yet imported: once each, the first in the process that runs the points above
# (an import cut short at its start leaves nothing behind), the second in a process of its own
IMPORT_POINTS = ["import-first", "import-later"]
REPEATS = 2
TIMED_KILLS = 3


def _env(d):
    # one thread per process: several run at once on a small machine
    path = os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupt")
    (d / "wide.py").write_text(FACTORY)
    (d / "driver.py").write_text(DRIVER)
    rng = np.random.default_rng(0)
    np.save(d / "calib.npy", rng.random((300, 3, 8, 8), dtype=np.float32))
    np.savez(d / "data.npz", x=rng.random((96, 3, 8, 8), dtype=np.float32), y=rng.integers(0, 10, 96))
    return d


def _driver(d, runs):
    return subprocess.Popen(
        [sys.executable, "driver.py", json.dumps(runs), json.dumps(sorted(INPUTS))],
        cwd=d,
        env=_env(d),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def results(work):
    """Every point's runs: {(verb, point): [result, ...]}, from driver processes run side by side (each in
    its own copy of the inputs: they write the same output names)."""
    # each repeat in its own process (the points' commands run one after another in it, as main() is also
    # called in-process), side by side
    reps = [("none", [*CONVERT, "-o", "ok.safetensors"]), ("none", ARGV["run"])]  # without Ctrl-C: outputs
    reps += [(p, ARGV["convert"]) for p in CONVERT_POINTS] + [(p, ARGV["run"]) for p in RUN_POINTS]
    jobs = [[("import-first", ARGV["convert"]), *reps], *[reps] * (REPEATS - 1), [("import-later", ARGV["convert"])]]
    procs = []
    for i, runs in enumerate(jobs):
        sub = work / f"job{i}"
        sub.mkdir()
        for name in ("wide.py", "driver.py", "calib.npy", "data.npz"):
            shutil.copy(work / name, sub / name)
        procs.append(_driver(sub, runs))
    out = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr  # the driver itself ran every point
        for line in stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                out.setdefault((r["verb"], r["point"]), []).append(r)
    return out


def test_points_are_reached_and_pass_without_ctrl_c(results):
    """Uninterrupted, both commands succeed and write their output: the points below interrupt real work."""
    convert, run = results["convert", "none"], results["run", "none"]
    assert [r["rc"] for r in convert + run] == [0] * 2 * REPEATS, (convert, run)
    assert all(r["made"] == ["out.png"] for r in run), run  # convert's output, ok.safetensors, is run's input


def _check(r, verb):
    assert r["escaped"] is None, r
    assert r["fired"], f"{r['point']}: the Ctrl-C point was never reached; the test no longer tests it"
    assert r["rc"] == 130, r
    assert r["err"].strip().splitlines() == [f"snnconv {verb}: interrupted"], r
    assert r["made"] == [], r  # no output, no temporary file


@pytest.mark.parametrize("point", CONVERT_POINTS + IMPORT_POINTS)
def test_ctrl_c_in_convert(results, point):
    runs = results["convert", point]
    assert len(runs) == (1 if point in IMPORT_POINTS else REPEATS)
    for r in runs:
        _check(r, "convert")


@pytest.mark.parametrize("point", RUN_POINTS)
def test_ctrl_c_in_run(results, point):
    runs = results["run", point]
    assert len(runs) == REPEATS
    for r in runs:
        _check(r, "run")


def _timed_kill(d, delay):
    """`python -m snnconv convert` given SIGINT `delay` s after it calls the model factory: (whether the
    Ctrl-C was sent, exit code, stderr, files made). Not sent: the command had finished by then."""
    (d / "factory-called").unlink(missing_ok=True)
    with open(d / "stdout", "wb") as stdout:
        # SIG_DFL: Python handles Ctrl-C as in a terminal, even if CI started us ignoring it (it then would too)
        proc = subprocess.Popen(
            [sys.executable, "-m", "snnconv", *ARGV["convert"]],
            cwd=d,
            env=_env(d),
            stdout=stdout,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            while not (d / "factory-called").exists() and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(delay)
            sent = proc.poll() is None and b"wrote " not in (d / "stdout").read_bytes()  # not at its last line
            if sent:
                proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    made = sorted(set(os.listdir(d)) - INPUTS - {"stdout"})
    for name in made:
        os.unlink(d / name)
    return sent, proc.returncode, err.decode().strip().splitlines(), made


def test_ctrl_c_at_random_times(work):
    """Real processes, as a user presses Ctrl-C: the deterministic points above, and whatever lies between."""
    d = work / "timed"
    d.mkdir()
    for name in ("wide.py", "calib.npy"):
        (d / name).write_bytes((work / name).read_bytes())
    rng = random.Random(33)
    outcomes = [_timed_kill(d, rng.uniform(0.0, 1.5)) for _ in range(TIMED_KILLS)]
    finished = [o for o in outcomes if not o[0]]
    assert all(o[1:] == (0, [], ["out.safetensors"]) for o in finished), finished  # done before the Ctrl-C
    landed = [o[1:] for o in outcomes if o[0]]
    if not landed:
        pytest.skip("every command finished before its Ctrl-C")
    assert [o for o in landed if o != (130, ["snnconv convert: interrupted"], [])] == [], landed


def test_main_in_process_restores_the_callers_state(work, tmp_path, monkeypatch):
    """main() is also called in-process: after an interrupted command the caller's SIGINT handler and
    unraisable hook are back, and the next command runs and writes its output."""
    import snnconv.convert  # noqa: F401  (the module; snnconv.convert the attribute is the function)
    from snnconv.cli import main

    module = sys.modules["snnconv.convert"]

    for name in ("wide.py", "calib.npy"):
        (tmp_path / name).write_bytes((work / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    handler, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    real = module.calibrate_bias

    def interrupted(*args, **kwargs):  # as the default handler would, without a signal
        raise KeyboardInterrupt

    argv = [*ARGV["convert"], "--method", "max", "--calib-limit", "128"]  # the least work
    monkeypatch.setattr(module, "calibrate_bias", interrupted)
    assert main(argv) == 130
    assert (signal.getsignal(signal.SIGINT), sys.unraisablehook) == (handler, hook)
    assert set(os.listdir(tmp_path)) - {"__pycache__"} == {"calib.npy", "factory-called", "wide.py"}  # no output
    monkeypatch.setattr(module, "calibrate_bias", real)
    assert main(argv) == 0
    assert (tmp_path / "out.safetensors").is_file()
    assert (signal.getsignal(signal.SIGINT), sys.unraisablehook) == (handler, hook)
