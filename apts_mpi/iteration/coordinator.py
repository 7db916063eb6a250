"""The coordinator: the acceptance test on the combined step, and the radius (docs/method.md
section 3, steps 4-5).

Rank 0 decides on its own values: rho by the engine's rule (:func:`apts_mpi.trust_region.ratio`,
with its rounding-level guard) and the radius by :func:`apts_mpi.trust_region.update_radius`;
the decision, rho, the new radius and the values they were taken on (f(theta_k), f(theta_k + s),
pred) reach every rank in one ``Bcast`` (MPI does not promise bitwise identical Allreduce results
on every rank).

``acceptance``: ``ratio`` (accept iff the trial is finite, pred > 0 and rho >= eta1), ``none``
(s is always applied, except a non-finite trial; the radius is kept) or ``nonmonotone`` (the
numerator uses the largest of f(theta_k) and the losses of the last ``window`` accepted iterates).

``budget`` (``radius_control: combined``, the local fraction f): the radius rule sees the step's
norm relative to the local budget, ||s||_inf / f against Delta, so a combined step inside the budget
(||s||_inf < 0.8 f Delta) is no boundary step and does not grow Delta, and a failure shrinks Delta
to decrease x min(Delta, ||s||_inf / f).  None (the default): every combined step counts as a
boundary step.  :meth:`settle_damped` decides on the shorter step of a damped combination.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from ..comm import Comm
from ..trust_region import TrustRegionConfig, ratio, update_radius


class Coordinator:
    """The acceptance test and the radius Delta_k of the APTS iteration."""

    def __init__(self, comm: Comm, config: TrustRegionConfig, acceptance: str, window: int, dtype,
                 budget: float | None = None):
        self.comm, self.config, self.acceptance, self.budget = comm, config, acceptance, budget
        self.eps = torch.finfo(dtype).eps
        self.radius = config.radius
        self.history = deque(maxlen=window)  # losses of the last accepted iterates (nonmonotone)

    def decide(self, loss0, trial, pred, step_inf=math.nan):
        """(accept, rho, new radius) for the combined step, from this rank's values."""
        finite = math.isfinite(trial)
        reference = max([loss0, *self.history]) if self.acceptance == "nonmonotone" else loss0
        rho = ratio(reference - trial, pred, finite and pred > 0, loss0, self.eps)
        if self.acceptance == "none":
            return finite, rho, self.radius
        accept = finite and pred > 0 and rho >= self.config.eta1
        step_norm = None if self.budget is None else step_inf / self.budget
        return accept, rho, update_radius(self.radius, rho, **self.config.radius_rule(),
                                          step_norm=step_norm)

    def settle(self, loss0, trial, pred, step_inf=math.nan):
        """Rank 0's decision and the values it was taken on, on every rank (one Bcast); the radius
        and the window updated.  Returns (accept, rho, f(theta_k), trial loss, pred)."""
        values = [*self.decide(loss0, trial, pred, step_inf), loss0, trial, pred] \
            if self.comm.rank == 0 else [0.0] * 6
        accept, rho, self.radius, loss0, trial, pred = self.comm.bcast(values)
        if accept and self.acceptance == "nonmonotone":
            self.history.append(trial)
        return bool(accept), rho, loss0, trial, pred

    def settle_damped(self, loss0, trial, slope, half_trial):
        """The damped combination's decision on theta_k + s/2 after s was rejected (the radius
        already shrunk by :meth:`settle`): (accept, rho, pred, f(theta_k + s/2)) of the half step,
        rank 0's values on every rank (one Bcast).

        pred is the decrease of q(t) = f0 + t slope + t^2 c at t = 1/2, the quadratic along s that
        matches f(theta_k) = f0, the slope grad f(theta_k)^T s and f(theta_k + s) = f0 + slope + c:
        pred = -(slope / 2 + c / 4), sound for the half step (first-order consistent, exact where f
        is quadratic along s).  No decrease predicted (pred <= 0) or a non-finite value: rejected
        without deciding on the trial."""
        if self.comm.rank == 0:
            c = trial - loss0 - slope
            pred = -(0.5 * slope + 0.25 * c)
            reference = max([loss0, *self.history]) if self.acceptance == "nonmonotone" else loss0
            finite = math.isfinite(half_trial) and math.isfinite(pred) and pred > 0
            rho = ratio(reference - half_trial, pred, finite, loss0, self.eps)
            values = [finite and rho >= self.config.eta1, rho, pred, half_trial]
        else:
            values = [0.0] * 4
        accept, rho, pred, half_trial = self.comm.bcast(values)
        if accept and self.acceptance == "nonmonotone":
            self.history.append(half_trial)
        return bool(accept), rho, pred, half_trial
