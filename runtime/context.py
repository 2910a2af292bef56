"""The state of one spiking call, held by the call: never on the shared modules.

`SpikingModel` opens a `Call` for each `snn(x)` (and each `snn.step(x, state)`) and makes it current in a
`contextvars.ContextVar`, which is per thread (and per asyncio task), so concurrent calls on one model
never see each other's membranes or step counts. Modules read it with `current()`; when no call is open
they compute the ANN (calibration, `snn.graph_module(x)`, shape propagation in passes).

Reused output buffers (fresh large allocations cost page faults on every call) are kept per thread:
one thread runs one call at a time, and a buffer is read only before its module runs again.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch


@dataclass
class Call:
    steps: int = 1  # time steps the current graph run covers (one time chunk, or 1 in step mode)
    input_static: bool = True  # the input is one [N, ...] tensor fed at every step (direct encoding)
    backend: str = "auto"  # neuron backend: 'auto', 'torch', 'cupy'
    state: dict = field(default_factory=dict)  # module -> its state (membrane, pooling sums) in this call
    last: bool = False  # this graph run is the call's last: nothing reads the state it leaves
    total_steps: int | None = None  # the steps of the whole call (None: a stream, unbounded)


_current: ContextVar[Call | None] = ContextVar("snnconv_call", default=None)


def current() -> Call | None:
    """The spiking call running in this thread, or None: then modules behave as the ANN."""
    return _current.get()


@contextlib.contextmanager
def running(call: Call):
    token = _current.set(call)
    try:
        yield call
    finally:
        _current.reset(token)


_scratch = threading.local()


def reused(owner: object, shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A buffer of this thread for `owner`, reused while the shape stays: valid until `owner` asks again."""
    cache = getattr(_scratch, "by_owner", None)
    if cache is None:
        cache = _scratch.by_owner = weakref.WeakKeyDictionary()  # dies with its module
    key = (tuple(shape), dtype, device, memory_format)
    hit = cache.get(owner)
    if hit is None or hit[0] != key:
        hit = cache[owner] = (key, torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format))
    return hit[1]


def release_scratch() -> None:
    """Drop this thread's reused buffers (e.g. before measuring peak memory)."""
    _scratch.by_owner = weakref.WeakKeyDictionary()
