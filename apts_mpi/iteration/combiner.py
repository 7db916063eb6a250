"""The combiner: the local corrections into one step s and one predicted decrease (docs/method.md
sections 3 and 6).

* :class:`SumCombiner` -- parameter subdomains: s = sum_d R_d^T u_d, assembled with one
  ``Allgatherv`` into a preallocated flat vector (no arithmetic, so every rank holds the same bits),
  pred = sum_d delta_d with one scalar Allreduce (one replica of each subdomain reports delta_d).
* :class:`AverageCombiner` -- the data space (APTS_D): s = sum_d (|B_d| / |B|) u_d, summed on rank 0
  with one Reduce, then broadcast; pred = -grad f(theta_k)^T s, the first-order model's decrease
  for the averaged step (accumulated in float64), or with ``data_pred: local`` the weighted mean of
  the shards' local decreases, sum_d w_d delta_d: equal to -grad f(theta_k)^T s to first order and
  exact when the shards agree (identical shards give rho = 1).
* model parallel: :class:`apts_mpi.model_parallel.PipeCombiner`.

Every combiner's :meth:`combine` also sums the ranks' local evaluation counts and the number of
ranks whose f_d(theta_k) is not finite (a data fault may hit one rank's copy of the minibatch
only), in the same scalar Allreduce, and returns ||s||_inf.
"""
from __future__ import annotations

import math

import torch

from ..comm import Comm


class SumCombiner:
    """s: the subdomains' corrections side by side; pred: the sum of their decreases."""

    def __init__(self, comm: Comm, counts, displs, reports: bool):
        self.comm, self.counts, self.displs, self.reports = comm, counts, displs, reports

    def begin(self, correction) -> None:
        """Before the local phases (every coordinate of s is written by one of them)."""

    def collect(self, correction, a, b, offset, weight) -> None:
        """Subdomain correction u (``offset``) into coordinates [a, b) of s."""
        correction[a:b].copy_(offset)

    def combine(self, correction, delta, loss_evals, grad_evals, broken):
        """(pred, local loss and gradient evaluations of all ranks, broken ranks, ||s||_inf)."""
        self.comm.allgatherv_(correction, self.counts, self.displs)
        pred, loss_evals, grad_evals, broken = self.comm.sum_scalars(
            [delta if self.reports else 0.0, loss_evals, grad_evals, broken])
        return pred, int(loss_evals), int(grad_evals), broken, _inf_norm(correction)

    def gradient(self, grad0):
        """grad f(theta_k) from the local phases' first evaluations (one Allgatherv)."""
        return self.comm.allgatherv_(grad0, self.counts, self.displs)


class AverageCombiner:
    """s: the shards' corrections averaged with weights |B_d| / |B|; pred = -grad f(theta_k)^T s."""

    def __init__(self, comm: Comm, gradient, local_pred: bool = False):
        self.comm, self.gradient_k = comm, gradient  # grad f(theta_k), the start evaluation's
        self.local_pred = local_pred  # pred = sum_d w_d delta_d (the caller weighs delta_d)

    def begin(self, correction) -> None:
        correction.zero_()

    def collect(self, correction, a, b, offset, weight) -> None:
        correction.add_(offset, alpha=weight)

    def combine(self, correction, delta, loss_evals, grad_evals, broken):
        self.comm.bcast_(self.comm.reduce_(correction))  # formed on rank 0, its bits everywhere
        weighted, loss_evals, grad_evals, broken = self.comm.sum_scalars(
            [delta, loss_evals, grad_evals, broken])
        # the coordinator's is used; float32 products accumulated in float64
        pred = weighted if self.local_pred else -float(self.gradient_k.double().dot(correction.double()))
        return pred, int(loss_evals), int(grad_evals), broken, _inf_norm(correction)

    def gradient(self, grad0):
        return self.gradient_k


def _inf_norm(vector) -> float:
    return float(torch.linalg.vector_norm(vector, math.inf))
