"""An interpreter of NIR graphs written from NIR's node definitions (the `nir` package's docstrings), not from
snnconv: the tests run a file with it to check that the file alone says what the SNN computes.

Discrete time with dt = 1, float64. Each step, a node's input is the sum of the outputs on its incoming
edges; an edge that closes a cycle (found by depth-first search from the Input nodes) carries its source's
output of the previous step, zero at the first step, as NIR's reference executors (nirtorch) do. A node
integrating `dv/dt = r·I` steps as `v += r·I` and outputs the updated state; every state starts at 0.
Tensors carry the batch as their first dimension; NIR's shapes, Flatten's dims included, leave it out.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float64))


def _pair(v) -> tuple[int, ...]:
    a = np.atleast_1d(np.asarray(v)).astype(int)
    return tuple(int(x) for x in (np.repeat(a, 2) if a.size == 1 else a))


def _order(graph) -> tuple[list[str], set[tuple[str, str]]]:
    """Nodes in execution order and the edges that close cycles (their value is one step old)."""
    import nir

    out = {n: [b for a, b in graph.edges if a == n] for n in graph.nodes}
    back, state = set(), {}  # state: 1 on the search path, 2 finished

    def visit(n):
        state[n] = 1
        for m in out[n]:
            if state.get(m) == 1:
                back.add((n, m))
            elif m not in state:
                visit(m)
        state[n] = 2

    for n, node in graph.nodes.items():
        if isinstance(node, nir.Input):
            visit(n)
    forward = [(a, b) for a, b in graph.edges if (a, b) not in back]
    order, pending = [], [n for n in graph.nodes if n in state]
    while pending:
        ready = [n for n in pending if all(a in order for a, b in forward if b == n)]
        assert ready, "no node is ready: a cycle the search did not break"
        order += ready
        pending = [n for n in pending if n not in ready]
    return order, back


class NIRInterpreter:
    """Runs `graph` for T steps on the same input at every step.

    if_reset: what an `IF` does when it fires: "node" follows the installed nir's definition (subtract the
    threshold in nir 1.0.4, whose IF has no v_reset; set to v_reset where the node has one), "subtract" or
    "v_reset" force one.
    """

    def __init__(self, graph, if_reset: str = "node"):
        self.graph, self.if_reset = graph, if_reset
        self.order, self.back = _order(graph)
        self.sources = {n: [a for a, b in graph.edges if b == n] for n in graph.nodes}

    def run(self, x: torch.Tensor, T: int) -> tuple[torch.Tensor, dict[str, int]]:
        """The Output node's value at each step [T, N, ...] and each spiking node's (Threshold, IF) spike count."""
        import nir

        x = x.to(torch.float64)
        now: dict[str, torch.Tensor] = {}
        state: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        outputs = []
        for _ in range(T):
            before, now = now, {}
            for name in self.order:
                node = self.graph.nodes[name]
                if isinstance(node, nir.Input):
                    now[name] = x
                    continue
                terms = [(before if (s, name) in self.back else now).get(s) for s in self.sources[name]]
                terms = [t for t in terms if t is not None]  # a cycle's edge at the first step: zero
                u = sum(terms[1:], terms[0])
                now[name] = y = self.step(name, node, u, state)
                if isinstance(node, (nir.Threshold, nir.IF)):
                    counts[name] = counts.get(name, 0) + int(y.sum())
                if isinstance(node, nir.Output):
                    outputs.append(y)
        return torch.stack(outputs), counts

    def step(self, name: str, node, u: torch.Tensor, state: dict) -> torch.Tensor:
        import nir

        if isinstance(node, nir.Output):
            return u
        if isinstance(node, nir.Affine):  # y = W x + b
            return u @ _t(node.weight).T + _t(node.bias)
        if isinstance(node, nir.Linear):
            return u @ _t(node.weight).T
        if isinstance(node, nir.Scale):  # y = x ⊙ s
            return u * _t(node.scale)
        if isinstance(node, nir.Conv2d):
            pad = node.padding if isinstance(node.padding, str) else _pair(node.padding)
            w, b = _t(node.weight), _t(node.bias)
            return F.conv2d(u, w, b, _pair(node.stride), pad, _pair(node.dilation), int(node.groups))
        if isinstance(node, nir.SumPool2d):  # the sum over each window, zero padding
            k, s, p = _pair(node.kernel_size), _pair(node.stride), _pair(node.padding)
            return F.avg_pool2d(u, k, s, p, count_include_pad=True, divisor_override=1)
        if isinstance(node, nir.AvgPool2d):
            k, s, p = _pair(node.kernel_size), _pair(node.stride), _pair(node.padding)
            return F.avg_pool2d(u, k, s, p, count_include_pad=True)
        if isinstance(node, nir.Flatten):  # dims of one sample: the batch dim comes first here
            end = node.end_dim + 1 if node.end_dim >= 0 else u.dim() + node.end_dim
            return u.flatten(node.start_dim + 1, end)
        if isinstance(node, nir.Threshold):  # z = 1 where v > threshold
            return (u > _t(node.threshold)).to(torch.float64)
        if isinstance(node, nir.I):  # dv/dt = r I
            v = state.get(name, torch.zeros_like(u)) + _t(node.r) * u
            state[name] = v
            return v
        if isinstance(node, nir.IF):  # dv/dt = r I; z = v > v_thr; on z, v -= v_thr (1.0.4) or v = v_reset
            th = _t(node.v_threshold)
            v = state.get(name, torch.zeros_like(u)) + _t(node.r) * u
            z = (v > th).to(torch.float64)
            reset = getattr(node, "v_reset", None)
            mode = self.if_reset if self.if_reset != "node" else "subtract" if reset is None else "v_reset"
            if mode == "subtract":
                v = v - z * th
            else:
                v = torch.where(z > 0, _t(0.0 if reset is None else reset), v)
            state[name] = v
            return z
        raise NotImplementedError(f"NIR node {name}: {type(node).__name__} is not interpreted here")
