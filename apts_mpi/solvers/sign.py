"""The sign step: the exact minimiser of the first-order model in the inf-norm ball
(docs/method.md section 4)."""
from __future__ import annotations

import torch

from .base import FirstOrderStep


class SignStep(FirstOrderStep):
    """s = -radius sign(g), pred = radius ||g||_1 (inf-norm only: apts_mpi.options checks it)."""

    def form(self, g, s, radius, g_inf, g_2sq, g_1) -> None:
        torch.sign(g, out=s).mul_(-radius)

    def decrease(self, radius, g_inf, g_2sq, g_1):
        return radius * g_1
