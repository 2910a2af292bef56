"""A call's state lives in the call: one SpikingModel serves many threads at once, and step() with a
caller-owned state runs the same dynamics as one multi-step call."""

import threading

import pytest
import torch
from nets import ResCatNet, randomize_bn

import snnconv
from snnconv import ConversionError, passes
from snnconv.runtime import integer_spikes as int8
from snnconv.runtime.modules import SpikeMaxPool

FLOAT32_PASSES = sorted(passes.OPTIONAL - {"integer_spikes"})
THREADS, ROUNDS = 8, 3


def _jobs(device: str) -> list[tuple[torch.Tensor, dict]]:
    """Calls that differ in everything a call decides: T (time-major inputs of 3, 5 and 8 steps or the
    model's T), batch size, input kind (static [N, ...] or time-varying) and output kind."""
    g = torch.Generator().manual_seed(7)
    jobs = []
    for i, (T, n) in enumerate([(None, 4), (3, 2), (None, 5), (5, 3), (8, 2), (None, 3), (3, 4), (5, 5)]):
        shape = (n, 3, 16, 16) if T is None else (T, n, 3, 16, 16)
        x = torch.rand(shape, generator=g).to(device)
        jobs.append((x, {"time_major": T is not None, "per_step": i % 2 == 1}))
    return jobs


def _concurrent_equals_sequential(snn, device: str) -> None:
    jobs = _jobs(device)
    expected = [snn(x, **kw) for x, kw in jobs]
    assert not torch.equal(expected[0], snn(jobs[0][0], time_major=False, per_step=True)[0])  # calls do differ
    results: dict = {}
    errors: list = []
    start = threading.Barrier(THREADS)

    def worker(k: int) -> None:
        try:
            start.wait()
            for r in range(ROUNDS):
                for j in range(len(jobs)):
                    i = (j + k + r) % len(jobs)  # every thread in its own order: each call meets others
                    x, kw = jobs[i]
                    results[k, r, i] = snn(x, **kw)
        except Exception as exc:  # reported below: an exception in a thread would pass silently
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == THREADS * ROUNDS * len(jobs)
    for (k, r, i), y in results.items():
        assert torch.equal(y, expected[i]), (k, r, i, (y - expected[i]).abs().max().item())


def _model(chunk, passes_, device="cpu", **options):
    torch.manual_seed(0)
    ann = randomize_bn(ResCatNet(c=16)).to(device)
    calib = torch.rand(32, 3, 16, 16, device=device)
    return snnconv.convert(ann, T=6, calib=calib, chunk=chunk, passes=passes_, **options)


@pytest.mark.parametrize("chunk", [None, 2])
def test_threads_float_path(chunk):
    snn = _model(chunk, FLOAT32_PASSES)
    assert not any(isinstance(m, int8.SpikeLayer) for m in snn.modules())
    assert any(isinstance(m, SpikeMaxPool) for m in snn.modules())
    _concurrent_equals_sequential(snn, "cpu")


@pytest.mark.parametrize("chunk", [None, 2])
def test_threads_signed_spikes(chunk):
    """Signed neurons carry a net spike count besides the membrane: it lives in the call too."""
    _concurrent_equals_sequential(_model(chunk, FLOAT32_PASSES, signed_spikes=True), "cpu")


@pytest.mark.skipif(not int8.available(), reason="oneDNN int8 ops not exact on this CPU (no VNNI)")
@pytest.mark.parametrize("chunk", [None, 2])
def test_threads_int8_path(chunk):
    snn = _model(chunk, None, signed_spikes=False)  # the int8 layers take binary spikes
    # the 1x1 convolution too, in every mode
    assert sum(isinstance(m, int8.SpikeLayer) for m in snn.modules()) == 4
    _concurrent_equals_sequential(snn, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_threads_cuda():
    _concurrent_equals_sequential(_model(None, None, "cuda"), "cuda")


def test_calls_leave_no_state_on_modules():
    """Nothing a call computes stays on the shared modules: the graph without a call is the ANN."""
    ann = randomize_bn(ResCatNet())
    x = torch.rand(4, 3, 16, 16)
    snn = snnconv.convert(ann, T=4, calib=x)
    before = {n: dict(vars(m)) for n, m in snn.named_modules()}
    snn(torch.rand(3, 4, 3, 16, 16), time_major=True)
    for n, m in snn.named_modules():
        added = set(vars(m)) - set(before[n])
        assert not added, (n, added)
    with torch.no_grad():
        assert torch.allclose(snn.graph_module(x), ann(x), atol=1e-5)


@pytest.mark.parametrize("int8_path", [False, True])
def test_step_with_explicit_state_equals_multistep(int8_path):
    if int8_path and not int8.available():
        pytest.skip("oneDNN int8 ops not exact on this CPU")
    torch.manual_seed(0)
    # float path in float64: float32 sums would round differently over T * N and over N samples
    dtype = torch.float32 if int8_path else torch.float64
    ann = randomize_bn(ResCatNet(c=16)).to(dtype)
    snn = snnconv.convert(ann, T=6, calib=torch.rand(32, 3, 16, 16, dtype=dtype), signed_spikes=not int8_path)
    assert any(isinstance(m, int8.SpikeLayer) for m in snn.modules()) == int8_path
    x = torch.rand(6, 3, 3, 16, 16, dtype=dtype)
    ref = snn(x, time_major=True, per_step=True)
    state = snn.init_state(3)
    ys, states = [], []
    for t in range(6):
        states.append(state)
        y, state = snn.step(x[t], state)
        ys.append(y)
    assert torch.equal(torch.stack(ys), ref)
    assert state.t == 6
    # a state passed in is left as it was: stepping from it again gives the same output
    y3, _ = snn.step(x[3], states[3])
    assert torch.equal(y3, ys[3])
    # the model's own stream (step_mode 's') runs the same steps
    snn.step_mode = "s"
    snn.reset()
    assert torch.equal(torch.stack([snn(x[t]) for t in range(6)]), ref)
    # static input: step() fed the same [N, ...] at every step matches a plain multi-step call, which pools
    # the input once instead of its running sums (the same up to rounding)
    snn.step_mode = "m"
    state = snn.init_state(3)
    outs = []
    for _ in range(6):
        y, state = snn.step(x[0], state)
        outs.append(y)
    ref = snn(x[0], per_step=True)
    assert torch.allclose(torch.stack(outs), ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_step_state_errors():
    snn = snnconv.convert(ResCatNet(), T=2, calib=torch.rand(4, 3, 16, 16))
    with pytest.raises(ConversionError, match="batch size"):
        snn.init_state(0)
    with pytest.raises(ConversionError, match="init_state"):
        snn.step(torch.rand(2, 3, 16, 16), None)
    with pytest.raises(ConversionError, match=r"batch 2 does not match the state's batch 3.*init_state\(2\)"):
        snn.step(torch.rand(2, 3, 16, 16), snn.init_state(3))
