"""The quasi-Newton step: the minimiser of m(s) = f + g^T s + 1/2 s^T B s in the trust region,
B a limited-memory L-BFGS or L-SR1 matrix (:mod:`apts_mpi.quasi_newton`; docs/method.md section 4)."""
from __future__ import annotations

import math

import torch

from ..quasi_newton import LimitedMemoryMatrix
from .base import Solver, boundary_norm

CAUCHY_FRACTION = 0.1     # a quasi-Newton step must give >= 0.1 x the Cauchy decrease (N&W 4.20)


class QuasiNewtonStep(Solver):
    """The quasi-Newton step, or the Cauchy point of the same model when it is not good enough;
    with no pair stored yet, the first-order step of the ``step`` keyword (``fallback``).

    2-norm: the exact minimiser of the model in the ball (N&W Alg. 4.3).  inf-norm: the exact
    minimiser in the 2-ball of radius sqrt(n) radius (which contains the inf-ball), clipped to
    ||s||_inf <= radius, so that the step is not sqrt(n) times shorter than the first-order one.
    The Cauchy point s_c = -t g, t = min(radius / ||g||, g^T g / g^T B g) (N&W eqs. 4.11-4.12 in
    either norm) replaces the step when its decrease is not >= 0.1 x that of s_c (N&W 4.20): a
    decrease the exact minimiser always exceeds, so failing it in the 2-norm means the
    representation of B has lost its accuracy, and the memory is cleared.  Every decrease is
    computed in the representation the solver used (``LimitedMemoryMatrix.model_decrease``).
    The engine stores the pairs (``qn.update``) after every finite trial.
    """

    def __init__(self, config, numel, dtype, device, fallback):
        super().__init__(config, numel, dtype, device)
        self.qn = LimitedMemoryMatrix(config.model, config.memory, numel, dtype=dtype, device=device)
        self.fallback = fallback

    @property
    def device(self):
        return not len(self.qn)  # no pair yet: the first-order step, formed on the device

    def form(self, *args) -> None:
        self.fallback.form(*args)

    def decrease(self, *args):
        return self.fallback.decrease(*args)

    def solve(self, core, radius, g_inf, g_2sq, g_1):
        if not len(self.qn):
            return self.fallback.solve(core, radius, g_inf, g_2sq, g_1)
        g, s, qn, inf = core.grad, core.step, self.qn, self.config.norm == "inf"
        g_norm = boundary_norm(self.config.norm, g_inf, g_2sq)
        step, _ = qn.solve(g, radius * math.sqrt(g.numel()) if inf else radius)
        clipped = inf and float(torch.linalg.vector_norm(step, math.inf)) > radius
        s.copy_(step.clamp_(-radius, radius) if inf else step)
        pred = qn.model_decrease(g, s)
        gBg = qn.curvature(g)
        t = radius / g_norm if not gBg > 0 else min(radius / g_norm, g_2sq / gBg)
        cauchy = t * g_2sq - 0.5 * t * t * gBg
        if pred >= CAUCHY_FRACTION * cauchy:
            return pred, float(torch.linalg.vector_norm(s, math.inf if inf else 2))
        torch.mul(g, -t, out=s)
        core.counters.fallbacks += 1
        if not clipped:
            qn.reset()
            core.counters.memory_resets += 1
        return cauchy, t * g_norm

    def state_dict(self) -> dict:
        return {"qn": self.qn.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.qn.load_state_dict(state["qn"])
