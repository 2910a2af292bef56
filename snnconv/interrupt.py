"""Ctrl-C for the snnconv command, whatever becomes of its KeyboardInterrupt. Python raises it wherever the
main thread next checks for signals, and code there may drop it (an exception in __del__, in an at-fork
hook or under a C++ callback is reported and discarded) or turn it into another error (an import it cut
short fails later as a missing attribute). So while a command runs (`begin` .. `end`), SIGINT also sets a
process-wide flag: the command's outputs (io.atomic_write) are held back and renamed into place only if
the command ends with exit code 0 and the flag unset; otherwise they are deleted and the outcome, whatever
error came after, is the interrupt."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from pathlib import Path

# hit: SIGINT arrived during the command; armed: SIGINT raises KeyboardInterrupt (until the outcome is
# being decided); pending: finished outputs [(temporary file, path)], a list only while a command runs;
# ended: end() has taken over; saved: what end() restores
_state: dict = {"hit": False, "armed": False, "pending": None, "ended": True, "saved": None}


def interrupted() -> bool:
    """Has SIGINT arrived during the running command, whether or not its KeyboardInterrupt got through?"""
    return _state["hit"]


def ended() -> bool:
    """Has the command's end() begun (a KeyboardInterrupt from here on is not the command's)?"""
    return _state["ended"]


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT arrived and something dropped or replaced it: stop here."""
    if _state["hit"] and _state["armed"]:
        raise KeyboardInterrupt


def _handler(signum, frame) -> None:
    _state["hit"] = True  # first: whatever happens to the exception, the interrupt is known
    if _state["armed"]:
        raise KeyboardInterrupt


def _after_fork_in_child() -> None:
    """A forked process (a DataLoader worker) is not the command: no flag, no outputs of its own, and
    Ctrl-C does what it did before the command (workers then ignore it, see datasets._ignore_ctrl_c)."""
    _state.update(hit=False, armed=False, pending=None, ended=True, saved=None)
    if signal.getsignal(signal.SIGINT) is _handler and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


os.register_at_fork(after_in_child=_after_fork_in_child)


def hold(tmp: str | Path, path: Path) -> bool:
    """Keep a finished output (its temporary file) until the command ends; False outside a command: the
    caller renames it into place now."""
    if _state["pending"] is None:
        return False
    _state["pending"].append((Path(tmp), Path(path)))
    return True


def _quiet(hook):
    def unraisable(info) -> None:
        if not _state["hit"]:  # after Ctrl-C: objects torn down half-built, and the KeyboardInterrupt itself
            hook(info)

    return unraisable


def begin() -> None:
    """Start a command: from now SIGINT sets the flag (and raises KeyboardInterrupt, as by default), and
    outputs wait for end()."""
    _state["ended"] = False
    # only the main thread handles signals; a process started with SIGINT ignored (nohup, a background job) keeps it so
    main = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) != signal.SIG_IGN
    _state["saved"] = {"main": main, "handler": signal.getsignal(signal.SIGINT), "hook": sys.unraisablehook}
    _state["saved"]["pending"] = _state["pending"]
    _state.update(hit=False, armed=True, pending=[])
    sys.unraisablehook = _quiet(_state["saved"]["hook"])
    if main:
        signal.signal(signal.SIGINT, _handler)


def end(code: int | None, report, exiting: bool = False) -> int:
    """End the command begun with begin(), whose exit code is `code` (None: it did not finish). Interrupted:
    exit code 130 and its outputs deleted; else with code 0 its outputs are renamed into place.
    `report(code, error)` prints the outcome (error: a failed rename) while SIGINT is held off. Safe to call
    when a Ctrl-C cut begin() short. exiting: the process ends with this outcome (the snnconv program), so
    SIGINT stays ignored instead of going back to the caller's handler: a late Ctrl-C (or one re-delivered
    by a finaliser) cannot turn the decided exit code into death by SIGINT."""
    _state["armed"] = False  # the outcome is decided once: a Ctrl-C from here on only sets the flag
    _state["ended"] = True
    saved, _state["saved"] = _state["saved"] or {"main": False, "hook": sys.unraisablehook, "pending": None}, None
    pending, error = _state["pending"] or [], None
    interrupted = _state["hit"] or code == 130  # 130: a KeyboardInterrupt raised without SIGINT, or not seen here
    try:
        if interrupted:
            _state["hit"], code = True, 130
        elif code == 0:
            while pending:
                tmp, path = pending[0]
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    code, error = 2, f"{path}: cannot write the output ({exc.strerror or exc})"
                    break
                pending.pop(0)
        for tmp, _ in pending:  # not committed: an interrupt, an error, or a failed rename before them
            tmp.unlink(missing_ok=True)
        report(code, error)
        if interrupted:
            gc.collect()  # what the interrupt left half-built is finalised while its reports are dropped
    finally:
        _state["pending"] = saved["pending"]
        sys.unraisablehook = saved["hook"]
        if saved["main"]:  # a handler installed from C reads as None: leave SIGINT to Python's default
            handler = signal.SIG_IGN if exiting else saved["handler"] or signal.default_int_handler
            signal.signal(signal.SIGINT, handler)
    return code
