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
"""
from __future__ import annotations

import math
from collections import deque

import torch

from ..comm import Comm
from ..trust_region import TrustRegionConfig, ratio, update_radius


class Coordinator:
    """The acceptance test and the radius Delta_k of the APTS iteration."""

    def __init__(self, comm: Comm, config: TrustRegionConfig, acceptance: str, window: int, dtype):
        self.comm, self.config, self.acceptance = comm, config, acceptance
        self.eps = torch.finfo(dtype).eps
        self.radius = config.radius
        self.history = deque(maxlen=window)  # losses of the last accepted iterates (nonmonotone)

    def decide(self, loss0, trial, pred):
        """(accept, rho, new radius) for the combined step, from this rank's values."""
        finite = math.isfinite(trial)
        reference = max([loss0, *self.history]) if self.acceptance == "nonmonotone" else loss0
        rho = ratio(reference - trial, pred, finite and pred > 0, loss0, self.eps)
        if self.acceptance == "none":
            return finite, rho, self.radius
        accept = finite and pred > 0 and rho >= self.config.eta1
        return accept, rho, update_radius(self.radius, rho, **self.config.radius_rule())

    def settle(self, loss0, trial, pred):
        """Rank 0's decision and the values it was taken on, on every rank (one Bcast); the radius
        and the window updated.  Returns (accept, rho, f(theta_k), trial loss, pred)."""
        values = [*self.decide(loss0, trial, pred), loss0, trial, pred] if self.comm.rank == 0 \
            else [0.0] * 6
        accept, rho, self.radius, loss0, trial, pred = self.comm.bcast(values)
        if accept and self.acceptance == "nonmonotone":
            self.history.append(trial)
        return bool(accept), rho, loss0, trial, pred
