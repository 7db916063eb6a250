"""Adam's direction as a local solver: the step along Adam's update, scaled to the trust-region
radius, the rho test deciding (issue 22, item 2; Kingma & Ba, "Adam", ICLR 2015, Algorithm 1)."""
from __future__ import annotations

import math

import torch

from .base import Solver

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # Adam's defaults


class AdamStep(Solver):
    """s = -radius d / ||d||, d = m_hat / (sqrt(v_hat) + eps), pred = -g^T s.

    The moments advance once per gradient the engine steps from, i.e. when g differs from the last
    gradient seen (a rejection solves again with the same gradient and a smaller radius: the
    moments stay, and the step shrinks with the radius):

        t <- t + 1,  m <- beta1 m + (1 - beta1) g,  v <- beta2 v + (1 - beta2) g * g,
        m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t).

    The step lies on the boundary (||.|| the trust-region norm) and its predicted decrease is the
    first-order model's, so rho compares f's actual decrease with -g^T s.  Where d is no descent
    direction (-g^T s <= 0) the moments restart from g alone (t = 1: d = g / (|g| + eps), a
    descent direction for g != 0).  The moments, t and
    the last gradient are the solver's state (checkpointed with the engine's).
    """

    def __init__(self, config, numel, dtype, device):
        super().__init__(config, numel, dtype, device)
        kw = dict(dtype=dtype, device=device)
        self.t = 0
        self.m, self.v = torch.zeros(numel, **kw), torch.zeros(numel, **kw)
        self.last = torch.zeros(numel, **kw)

    def solve(self, core, radius, g_inf, g_2sq, g_1):
        g, s = core.grad, core.step
        if self.t == 0 or not torch.equal(g, self.last):
            self._advance(g)
        pred = self._step(g, s, radius)
        if not pred > 0:  # d is no descent direction: restart the moments from g alone
            self.t = 0
            self.m.zero_()
            self.v.zero_()
            self._advance(g)
            pred = self._step(g, s, radius)
        return pred, None

    def _advance(self, g) -> None:
        self.t += 1
        self.m.mul_(BETA1).add_(g, alpha=1 - BETA1)
        self.v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        self.last.copy_(g)

    def _step(self, g, s, radius) -> float:
        """s = -radius d / ||d|| from the moments; returns -g^T s (0 for d = 0)."""
        denominator = torch.div(self.v, 1 - BETA2 ** self.t).sqrt_().add_(EPS)
        torch.div(self.m, 1 - BETA1 ** self.t, out=s).div_(denominator)
        d_norm = float(torch.linalg.vector_norm(s, math.inf if self.config.norm == "inf" else 2))
        if not d_norm > 0:
            return 0.0
        s.mul_(-radius / d_norm)
        return -float(g.dot(s))

    def state_dict(self) -> dict:
        return {"adam": {"t": self.t, "m": self.m.clone(), "v": self.v.clone(), "last": self.last.clone()}}

    def load_state_dict(self, state: dict) -> None:
        adam = state["adam"]
        self.t = int(adam["t"])
        for name in ("m", "v", "last"):
            getattr(self, name).copy_(adam[name])
