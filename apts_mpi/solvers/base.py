"""The local solvers' interface (see :mod:`apts_mpi.solvers`) and the first-order steps' shared
parts."""
from __future__ import annotations

import math

import torch


def boundary_norm(norm: str, g_inf, g_2sq):
    """||g|| in the trust-region norm: host floats, or float64 of 0-dim tensors."""
    if isinstance(g_2sq, torch.Tensor):
        return g_inf.double() if norm == "inf" else g_2sq.double().sqrt()
    return g_inf if norm == "inf" else math.sqrt(g_2sq)


class Solver:
    """A trust-region subproblem solver (module docstring of :mod:`apts_mpi.solvers`)."""

    device = False

    def __init__(self, config, numel: int, dtype, device):
        self.config, self.numel = config, numel

    def solve(self, core, radius: float, g_inf: float, g_2sq: float, g_1: float):
        """Write the step for ``radius`` into ``core.step``; return (pred, ||s|| or None)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FirstOrderStep(Solver):
    """A step of the linear model m(s) = f + g^T s formed from g and its norms alone, on the
    boundary of the trust region: ``form`` writes it, ``decrease`` gives -g^T s from the norms."""

    device = True

    def form(self, g, s, radius, g_inf, g_2sq, g_1) -> None:
        raise NotImplementedError

    def decrease(self, radius, g_inf, g_2sq, g_1):
        raise NotImplementedError

    def solve(self, core, radius, g_inf, g_2sq, g_1):
        self.form(core.grad, core.step, radius, g_inf, g_2sq, g_1)
        return self.decrease(radius, g_inf, g_2sq, g_1), None
