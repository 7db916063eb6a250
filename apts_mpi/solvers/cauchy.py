"""The Cauchy step of the first-order model: s = -radius g / ||g|| (docs/method.md section 4)."""
from __future__ import annotations

import torch

from .base import FirstOrderStep, boundary_norm


class CauchyStep(FirstOrderStep):
    """s = -radius g / ||g||, pred = radius ||g||_2^2 / ||g|| (||.|| the trust-region norm).

    On the device the factor -radius / ||g|| is formed in float64 and rounded to the parameters'
    dtype, as the multiplication by a host float does: the step is bitwise the one formed from
    host values."""

    def form(self, g, s, radius, g_inf, g_2sq, g_1) -> None:
        g_norm = boundary_norm(self.config.norm, g_inf, g_2sq)
        if isinstance(g_norm, torch.Tensor):
            factor = -torch.as_tensor(radius, dtype=torch.float64, device=g.device) / g_norm
            torch.mul(g, factor.to(g.dtype), out=s)
        else:
            torch.mul(g, -radius / g_norm, out=s)

    def decrease(self, radius, g_inf, g_2sq, g_1):
        return radius * g_2sq / boundary_norm(self.config.norm, g_inf, g_2sq)
