"""The evaluator: f and its gradient over a communicator, on the minibatch's fixed cuts.

The minibatch is cut once per iteration into P shares (P = world size; in serial emulation P =
subdomains, the cuts of the N-rank run), each share into ``micro_batch`` pieces; every evaluation
of the iteration (local phases, FOC term, trial, global pass) sums over exactly these pieces, so
batch-norm statistics are the same in f(theta_k), the trial and the global pass, and the serial
emulation evaluates what the N-rank run does (docs/method.md, "The iteration's parts").

Settings (one each, set by :func:`apts_mpi.apts.build_parts`):

* ``local_share``: what a local phase evaluates -- ``1`` (all of the minibatch; replica j its block
  of shares), ``"shard"`` (its shard: the data space, or ``local_batch: shard``) or a fraction q
  (ceil(q * pieces) drawn by a generator seeded with (seed, iteration, subdomain));
* ``start``: what the iteration evaluates before its local phases -- ``None``, ``"gradient"``
  (grad f(theta_k), for the FOC term) or ``"exact"`` (f(theta_k) and its gradient: no local phase
  sees the whole minibatch);
* ``reuse_start``: a local phase on exactly one share takes f_d(0) and its gradient from the start
  evaluation's sums of its share instead of evaluating its share again;
* ``autocast``: a dtype (bfloat16) for the local phases' forward passes; f(theta_k) in rho is then
  one more loss-only shared evaluation in the parameters' precision (without an exact start);
* ``freeze_others`` and ``cache_prefix``: no weight gradients outside the subdomain; an
  ``nn.Sequential`` prefix holding none of its parameters evaluated once per local phase.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..comm import BufferSync, Comm
from ..decomposition import Subdomain
from ..objective import batch_size, chunks, share
from ..optimizer import Optimizer


@dataclass
class LocalObjective:
    """What a local phase evaluates: ``f(grad_out) -> loss`` on its part of the minibatch
    (``size`` samples over its replicas) and ``start(grad0) -> f_d(0)`` (its gradient into grad0)."""

    f: Callable
    size: int
    start: Callable


class Evaluator:
    """Shared evaluations of a model every rank holds whole (see the module docstring)."""

    # the model is whole on every rank: the interface's defaults
    params_held = None
    model_state, load_model_state, evaluation = (
        Optimizer.model_state, Optimizer.load_model_state, Optimizer.evaluation)

    def __init__(self, model, objective, whole: Subdomain, comm: Comm, group: Comm, counter, *,
                 n_shares, micro_batch, local_share, seed, start, reuse_start, autocast, owned,
                 start_out):
        self.model, self.objective, self.whole = model, objective, whole
        self.comm, self.group, self.counter = comm, group, counter
        self.n_shares, self.micro_batch, self.local_share, self.seed = n_shares, micro_batch, local_share, seed
        self.start_mode, self.reuse_start, self.autocast = start, reuse_start, autocast
        self.start_out = start_out  # where the start evaluation writes grad f(theta_k)
        kw = dict(dtype=whole.dtype, device=whole.device)
        n = whole.numel
        self.reduce_buffer = torch.empty(n + 1, **kw)  # [gradient | loss] of a shared evaluation
        self.start_sums = {d: torch.empty(n + 1, **kw) for d in owned} if reuse_start else None
        self.sync = BufferSync(model, comm)  # batch-norm statistics, from rank 0
        self.freeze_others = self.cache_prefix = True

    # -- the cuts ---------------------------------------------------------------------------------
    def begin(self, batch, theta, iteration) -> None:
        """The iteration's minibatch: its size and this rank's pieces of a shared evaluation."""
        self.batch, self.B, self.iteration = batch, batch_size(batch), iteration
        self.pieces = self._pieces(batch, [self.comm.rank] if self.comm.size > 1 else range(self.n_shares))

    def _pieces(self, batch, shares) -> list:
        """The micro-batches of ``shares`` (indices among the ``n_shares`` shares of ``batch``)."""
        return [piece for p in shares
                for piece in chunks(share(batch, p, self.n_shares), self.micro_batch)]

    def _local_pieces(self, d) -> tuple[list, int]:
        """The pieces this rank evaluates in subdomain d's local phase, and the number of samples of
        that phase's part of the minibatch (over its replicas): all of it (replica j its block of
        shares), its shard (shares d*r .. d*r+r-1, replica j share d*r+j), or ceil(q * pieces) of
        the iteration's pieces drawn without replacement (seed, iteration, d), at least one per
        replica, replica j a contiguous block of them in their order."""
        batch, r, j = self.batch, self.group.size, self.group.rank
        if self.local_share == 1:
            per_replica = self.n_shares // r
            return self._pieces(batch, range(j * per_replica, (j + 1) * per_replica)), self.B
        if self.local_share == "shard":
            mine = range(d * r, (d + 1) * r)
            return self._pieces(batch, [d * r + j]), sum(batch_size(share(batch, p, self.n_shares))
                                                         for p in mine)
        every = self._pieces(batch, range(self.n_shares))
        k = min(max(math.ceil(self.local_share * len(every)), r), len(every))
        rng = np.random.default_rng([self.seed, self.iteration, d])
        drawn = [every[i] for i in sorted(rng.choice(len(every), size=k, replace=False).tolist())]
        return drawn[j * k // r:(j + 1) * k // r], sum(batch_size(piece) for piece in drawn)

    # -- sums -------------------------------------------------------------------------------------
    def shared(self, pieces, B, comm: Comm, subdomain: Subdomain, grad_out=None, net=None,
               autocast=None):
        """f (and its gradient on ``subdomain`` into ``grad_out``) of a minibatch of ``B`` samples,
        of which this rank evaluates ``pieces``, summed over ``comm``'s ranks.  ``net`` replaces the
        model (the part after a cached prefix); ``grad_out=None``: the loss only."""
        if grad_out is None:  # left on the device (correctly rounded as the host's double / B)
            loss = self._sums(pieces, None, None, net, autocast)
            # the ranks' sums added in the parameters' dtype, as the gradient's (and the serial
            # emulation's, one share after another)
            return (loss if comm.size == 1 else comm.allreduce_(loss.reshape(1))[0]) / B
        m = subdomain.numel
        buf = self._sums(pieces, subdomain, self.reduce_buffer[:m + 1], net, autocast)
        comm.allreduce_(buf)
        torch.div(buf[:m], B, out=grad_out)
        return buf[m] / B

    def _sums(self, pieces, subdomain: Subdomain | None, out, net=None, autocast=None):
        """This rank's sum over ``pieces``: the loss (``out=None``), or [the gradient on
        ``subdomain`` | the loss] written into ``out`` (returned).  ``autocast``: each piece's
        forward pass under ``torch.autocast`` to it, its loss cast back before backward and sum."""
        grad = out is not None
        if grad:
            self.model.zero_grad(set_to_none=False)
        loss = torch.zeros((), dtype=self.whole.dtype, device=self.whole.device)
        for piece in pieces:  # gradients accumulate over the pieces
            with torch.set_grad_enabled(grad):
                if autocast is None:
                    term = self.objective(net or self.model, piece)
                else:
                    with torch.autocast(self.whole.device.type, dtype=autocast):
                        term = self.objective(net or self.model, piece)
                    term = term.to(self.whole.dtype)
                if grad:
                    term.backward()
            loss += term.detach()
        if not grad:
            return loss
        subdomain.gather(out[:-1], grad=True)
        out[-1] = loss
        return out

    # -- the evaluations of an iteration ----------------------------------------------------------
    def start(self):
        """Before the local phases: f(theta_k) and its gradient (``exact``), or the gradient alone
        (``gradient``), into ``start_out``, a counted shared evaluation; returns f(theta_k) or None.
        With ``reuse_start`` this rank's sums are formed share by share and kept (``start_sums``)."""
        if self.start_mode is None:
            return None
        self.counter.count_evaluation(loss=1, grad=1)
        if self.start_mode == "gradient":
            self.shared(self.pieces, self.B, self.comm, self.whole, self.start_out)
            return None
        if not self.reuse_start:
            return float(self.shared(self.pieces, self.B, self.comm, self.whole, self.start_out))
        n, total = self.whole.numel, self.reduce_buffer
        shares = [self.comm.rank] if self.comm.size > 1 else range(self.n_shares)
        for i, p in enumerate(shares):
            part = self._sums(self._pieces(self.batch, [p]), self.whole, self.start_sums[p])
            total.copy_(part) if i == 0 else total.add_(part)
        self.comm.allreduce_(total)
        torch.div(total[:n], self.B, out=self.start_out)
        return float(total[n] / self.B)

    def reference(self):
        """f(theta_k) in the parameters' precision where the local phases' f_d(0) is not (autocast
        without an exact start): a counted loss-only shared evaluation; else None."""
        if self.autocast is None or self.start_mode == "exact":
            return None
        self.counter.count_evaluation(loss=1, grad=0)
        return float(self.shared(self.pieces, self.B, self.comm, self.whole))

    def trial(self, grad_out=None) -> float:
        """f(theta_k + s) (its gradient into ``grad_out`` when given), a counted shared evaluation."""
        self.counter.count_evaluation(loss=1, grad=int(grad_out is not None))
        return float(self.shared(self.pieces, self.B, self.comm, self.whole, grad_out))

    def global_objective(self):
        """The global pass's ``evaluate(grad_out)``: f on the iteration's cuts, over the world."""
        return lambda out=None: self.shared(self.pieces, self.B, self.comm, self.whole, out)

    @contextmanager
    def local(self, d, core, a, b):
        """Subdomain d's :class:`LocalObjective` (coordinates [a, b) of every n-vector): its pieces,
        the other parameters frozen and a frozen ``nn.Sequential`` prefix evaluated once."""
        sub = core.subdomain
        mine = {id(sub.params[q.index]) for q in sub.pieces}
        frozen = [p for p in self.whole.params if id(p) not in mine] if self.freeze_others else []
        for p in frozen:
            p.requires_grad_(False)  # no weight gradients for frozen tensors
        try:
            pieces, B = self._local_pieces(d)
            k = self._frozen_prefix(mine) if self.cache_prefix else 0
            net = self.model[k:] if k else self.model
            if k:  # under no_grad (step): constant for this phase; piece by piece, as without it
                pieces = [(self.model[:k](piece[0]), *piece[1:]) for piece in pieces]

            def f_d(grad_out=None):
                return self.shared(pieces, B, self.group, sub, grad_out, net=net, autocast=self.autocast)

            def start(grad0):
                if self.reuse_start:  # the start evaluation's sums of share d
                    torch.div(self.start_sums[d][a:b], B, out=grad0)
                    return self.start_sums[d][-1] / B
                core.count_evaluation(loss=1, grad=1)
                return f_d(grad0)
            yield LocalObjective(f_d, B, start)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _frozen_prefix(self, mine) -> int:
        """Leading layers of an ``nn.Sequential`` model that hold none of the parameters ``mine``:
        their output is constant during a local phase, so it is computed once, not per evaluation."""
        if not (self.objective.sequential_inputs and isinstance(self.model, torch.nn.Sequential)):
            return 0
        for i, layer in enumerate(self.model):
            if any(id(p) in mine for p in layer.parameters()):
                return i
        return len(self.model)
