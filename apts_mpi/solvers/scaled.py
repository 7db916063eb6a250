"""The scaled trust region: every step of an inner solver taken in the norm ||s||_W = ||W s||,
W a diagonal scaling kept across iterations from the squared gradients (issue 22, item 1).

W comes from the bias-corrected second moment, as Adam keeps it (Kingma & Ba 2015, Algorithm 1):

    t <- t + 1,  v <- beta2 v + (1 - beta2) g * g,  d = sqrt(v / (1 - beta2^t)) + eps,
    W = sqrt(d / mean(d))

updated once per gradient the engine steps from (a rejection solves again with the same gradient:
W stays).  Normalised to mean(W^2) = 1, the radius keeps the units of the parameters, and a constant
d gives W = 1: the unscaled trust region.  The square root makes the steepest-descent direction of
the scaled norm Adam's: the Cauchy step of the model in the variables z = W s, gradient g / W,
is s = -r (g / d) mean(d) / ||g / W|| (d: Adam's denominator).

The inner solver (Cauchy, sign, Adam or quasi-Newton) solves the subproblem in z; its step is
mapped back, s = z / W.  Its predicted decrease is unchanged by the change of variables
((g / W)^T z = g^T s; z^T B_z z = s^T B s) and ||s||_W = ||z|| is the norm the radius rule sees,
so the rho test and the radius rule are the engine's.  A quasi-Newton memory stores its pairs in z,
(W s, y / W), with the W the step was formed with (:class:`ScaledMatrix`).  The moment, t and the
last gradient are checkpointed with the engine's state.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from .base import Solver

BETA2, EPS = 0.999, 1e-8  # Adam's defaults


class Scaling:
    """The diagonal W (module docstring)."""

    def __init__(self, numel, dtype, device):
        kw = dict(dtype=dtype, device=device)
        self.t = 0
        self.v, self.last = torch.zeros(numel, **kw), torch.zeros(numel, **kw)
        self.w = torch.ones(numel, **kw)

    def observe(self, g) -> None:
        """Advance the moment by g unless g is the gradient seen last."""
        if self.t and torch.equal(g, self.last):
            return
        self.t += 1
        self.v.mul_(BETA2).addcmul_(g, g, value=1 - BETA2)
        self.last.copy_(g)
        self._weights()

    def _weights(self) -> None:
        d = torch.div(self.v, 1 - BETA2 ** self.t, out=self.w).sqrt_().add_(EPS)
        mean = float(d.sum(dtype=torch.float64)) / d.numel()  # float64 accumulation
        d.div_(mean).sqrt_()

    def state_dict(self) -> dict:
        return {"t": self.t, "v": self.v.clone(), "last": self.last.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.v.copy_(state["v"])
        self.last.copy_(state["last"])
        if self.t:
            self._weights()
        else:
            self.w.fill_(1.0)


class ScaledMatrix:
    """The inner quasi-Newton matrix seen from the engine's variables s: pairs and model
    decreases mapped into z = W s (the engine calls ``update``, ``model_decrease`` and ``len``)."""

    def __init__(self, qn, scaling: Scaling):
        self.inner, self.scaling = qn, scaling

    def __len__(self):
        return len(self.inner)

    def update(self, s, y) -> bool:
        w = self.scaling.w
        return self.inner.update(s.mul(w), y.div(w))

    def model_decrease(self, g, s) -> float:
        w = self.scaling.w
        return self.inner.model_decrease(g.div(w), s.mul(w))


class ScaledSolver(Solver):
    """``inner`` (any solver of the registry) in the scaled norm (module docstring)."""

    device = False  # the scaling is updated and read on the host's schedule

    def __init__(self, config, numel, dtype, device, inner):
        super().__init__(config, numel, dtype, device)
        self.inner, self.scaling = inner, Scaling(numel, dtype, device)
        self.ghat = torch.empty(numel, dtype=dtype, device=device)
        qn = getattr(inner, "qn", None)
        self.qn = None if qn is None else ScaledMatrix(qn, self.scaling)

    def solve(self, core, radius, g_inf, g_2sq, g_1):
        self.scaling.observe(core.grad)
        w, ghat, norm = self.scaling.w, self.ghat, torch.linalg.vector_norm
        torch.div(core.grad, w, out=ghat)
        norms = torch.stack([norm(ghat, math.inf), ghat.dot(ghat), norm(ghat, 1)]).tolist()
        view = SimpleNamespace(grad=ghat, step=core.step, counters=core.counters)
        pred, step_norm = self.inner.solve(view, radius, *norms)
        core.step.div_(w)
        return pred, step_norm

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), "scaling": self.scaling.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
        self.scaling.load_state_dict(state["scaling"])
