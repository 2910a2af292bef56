"""QCFS (quantisation-clip-floor-shift, Bu et al., ICLR 2022): a drop-in for nn.ReLU while training, so the
trained network converts to IF neurons with (near) no loss at small T.

    y = lam * clamp(floor(x * L / lam + 1/2) / L, 0, 1),   lam learnable, gradient straight through floor

With threshold lam, soft reset and membrane starting at lam/2, an IF neuron fed a constant input x
emits exactly floor(x * T / lam + 1/2) spikes (clamped to [0, T]) in T steps, so at T = L its mean output
equals QCFS(x): snnconv converts a QCFS module into such a neuron, with its learned lam as threshold.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class QCFS(nn.Module):
    def __init__(self, levels: int = 8, threshold: float = 8.0):
        super().__init__()
        if levels < 1:
            raise ValueError(f"QCFS levels must be >= 1, got {levels}")
        self.levels = levels
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def extra_repr(self) -> str:
        return f"levels={self.levels}, threshold={self.threshold.item():.4g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return qcfs(x, self.threshold, self.levels)


def qcfs(x: torch.Tensor, lam: torch.Tensor, levels: int) -> torch.Tensor:
    y = x * (levels / lam) + 0.5
    y = y + (torch.floor(y) - y).detach()  # floor forward, identity backward
    return torch.clamp(y / levels, 0, 1) * lam
