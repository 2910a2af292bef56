"""Something built once per process at first use: a compiled C kernel, an optional GPU backend."""

from __future__ import annotations

import threading
from collections.abc import Callable

_UNBUILT = object()
_lock = threading.Lock()


class Lazy:
    """`get()` builds once (under a lock) and returns what `build()` made, or None where it cannot run here:
    `off()` named the setting that turned it off, or `build()` raised (no compiler, no driver). `why` says
    which. After the first call `get()` is one attribute read (it sits on every neuron call)."""

    def __init__(self, build: Callable[[], object], off: Callable[[], str | None] | None = None):
        self._build, self._off = build, off
        self.value, self.why = _UNBUILT, None

    def get(self):
        if self.value is _UNBUILT:
            with _lock:
                if self.value is _UNBUILT:
                    self.why = self._off() if self._off is not None else None
                    if self.why:
                        self.value = None
                    else:
                        try:
                            self.value = self._build()
                        except Exception as exc:  # any failure leaves another path in charge
                            self.value, self.why = None, f"{type(exc).__name__}: {exc}"
        return self.value

    def why_not(self) -> str | None:
        """Why it does not run here, or None if it does."""
        self.get()
        return self.why
