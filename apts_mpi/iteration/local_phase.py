"""The local phase: one subdomain's trust-region iterations from theta_k (docs/method.md sections 3
and 5).

The ranks of subdomain d run at most ``iters`` trust-region iterations on f_d(u) = f(theta_k +
R_d^T u), from u = 0 with the local radius started at b = ``fraction`` * Delta_k, every step radius
min(local radius, b) and the accumulated correction u clipped to the box ||u||_inf <= b.  The step
of each iteration is the engine's local solver's (:mod:`apts_mpi.solvers`: Cauchy, sign,
quasi-Newton, Adam direction); the phase never asks which.

Settings: ``on_device`` (:meth:`TrustRegionCore.run_on_device`: branch-free decisions, one
transfer), ``agree`` (replicas take their group's rank-0 values, one Bcast) and ``foc`` (a
:class:`FirstOrderConsistency`, or None).
"""
from __future__ import annotations

import torch


class FirstOrderConsistency:
    """The first-order-consistency term: f_d(u) + <R_d grad f(theta_k) - grad f_d(0), u>
    (docs/method.md section 5), so that the local model's gradient at u = 0 is R_d grad f(theta_k).

    ``exact``: grad f(theta_k) is the start evaluation's (``gradient``) and is handed to the
    engine as it is; otherwise ``term`` holds grad f(theta_k) on entry (the start evaluation wrote
    it there) and the engine gets grad f_d(0) + term."""

    def __init__(self, n, theta, gradient=None, **kw):
        self.theta, self.gradient, self.exact = theta, gradient, gradient is not None
        self.term, self.work = torch.zeros(n, **kw), torch.empty(n, **kw)

    def start(self, core, grad0, a, b) -> None:
        """The engine's gradient at u = 0 for the coordinates [a, b), and the term for them."""
        term = self.term[a:b]
        if self.exact:  # grad f_d(0) + term = R_d grad f(theta_k), exactly
            torch.sub(self.gradient[a:b], grad0, out=term)
            core.set_gradient(self.gradient[a:b])
        else:
            term.sub_(grad0)
            core.set_gradient(torch.add(grad0, term, out=self.work[:b - a]))

    def wrap(self, f, sub, a, b):
        """f_d with the term added (loss and gradient)."""
        term, theta = self.term[a:b], self.theta[a:b]

        def with_foc(grad_out=None):
            loss = f(grad_out)
            u = sub.gather(self.work[:b - a]).sub_(theta)
            if grad_out is not None:
                grad_out.add_(term)
            return loss + term.dot(u)
        return with_foc


class LocalPhase:
    """Runs one subdomain's local solve (see the module docstring)."""

    def __init__(self, iters: int, fraction: float, *, on_device=False, agree=None, foc=None, cap=False):
        # cap: the local radius never exceeds the budget (radius_control 'combined'), so a
        # rejection never re-proposes the step just rejected
        self.iters, self.fraction, self.cap = iters, fraction, cap
        self.on_device, self.agree, self.foc = on_device, agree, foc

    def run(self, core, local, grad0, a, b, radius) -> tuple[float, float]:
        """The local solve of ``core`` on ``local`` (a :class:`LocalObjective`) from theta_k, the
        gradient of f_d(0) written into ``grad0``; returns (final loss, f_d(0)).  The correction
        u is left in ``core.offset``."""
        loss0 = local.start(grad0)
        if not self.on_device:
            loss0 = float(loss0)
        if self.agree is not None:  # the replicas start from their rank 0's f_d(0)
            loss0 = self.agree([loss0])[0]
        f = local.f
        if self.foc is not None:
            self.foc.start(core, grad0, a, b)
            f = self.foc.wrap(f, core.subdomain, a, b)
        else:
            core.set_gradient(grad0)
        box = self.fraction * radius
        core.set_radius(box)
        if self.on_device:  # one transfer: the final loss and f_d(0)
            return tuple(core.run_on_device(f, self.iters, loss0, box=box, read=[loss0], cap=self.cap))
        # the last trial's gradient is never used
        return core.run(f, self.iters, loss=loss0, box=box, agree=self.agree, loss_only=True,
                        cap=self.cap), loss0
