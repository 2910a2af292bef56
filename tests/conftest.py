"""Shared test helpers, as fixtures (test modules never import each other)."""

import pytest


def _signed_reference(x, theta, v_init, tau=None):
    """Signed IF/LIF neurons one at a time in Python floats: +theta at H >= theta, -theta at H < 0 while
    the neuron's net spike count is positive."""
    T, n = len(x), len(x[0])
    decay = 1.0 - 1.0 / tau if tau else 1.0
    out = [[0.0] * n for _ in range(T)]
    for i in range(n):
        v, count = v_init * theta, 0
        for t in range(T):
            h = decay * v + x[t][i]
            s = 1 if h >= theta else -1 if (h < 0 and count > 0) else 0
            count += s
            out[t][i] = s * theta
            v = h - s * theta
    return out


@pytest.fixture
def signed_reference():
    """A float64 loop of signed IF/LIF neurons (see _signed_reference), the reference for every signed path."""
    return _signed_reference
