"""The one exception users catch: everything snnconv refuses is a ConversionError."""

from __future__ import annotations

import traceback

import torch.fx as fx


class ConversionError(ValueError):
    """A model, option or input snnconv cannot convert or run; the message names what and how to fix it."""


_INTERNAL = ("/torch/", "/snnconv/", "/passes/", "/runtime/", "<eval_with_key>")


def user_source_line(stack_trace: str | None, module: str | None = None) -> str:
    """'file:line: code' of the innermost frame of the user's own code in an fx stack trace; for modules
    called by a container (nn.Sequential) that is torch's own code, so name the module instead."""
    if not stack_trace:
        return f"module {module}" if module else "<source line unknown>"
    frames = [f.strip() for f in stack_trace.strip().split("\n")]
    best = None
    for i, line in enumerate(frames):
        if line.startswith("File ") and not any(s in line for s in _INTERNAL):
            code = frames[i + 1] if i + 1 < len(frames) and not frames[i + 1].startswith("File ") else ""
            best = f"{line[5:]}: {code}" if code else line[5:]
    if best is None and module:
        return f"module {module} (called by a container)"
    return best or frames[0]


def frame_of(exc: BaseException) -> str:
    """'file:line: code' of the innermost frame of user code in an exception's traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not any(s in f.filename for s in _INTERNAL)]
    if not frames:
        return "<source line unknown>"
    f = frames[-1]
    return f'"{f.filename}", line {f.lineno}: {f.line}'


def describe(node: fx.Node) -> str:
    """One line naming a graph node and the user's source line that created it."""
    module = node.target if node.op == "call_module" else None
    return f"{node.format_node()}\n      at {user_source_line(node.stack_trace, module)}"
