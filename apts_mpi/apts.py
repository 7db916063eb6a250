"""APTS: one parameter subdomain per rank (docs/method.md sections 2, 3 and 6).

One iteration on a minibatch B (the same on every rank; kept fixed for the whole iteration):

1. every rank holds theta_k and Delta_k; theta_k is saved (in APTS's own buffer) so a rejection
   restores it bitwise;
2. local phase: the ranks of subdomain d run at most ``local_iters`` trust-region iterations on
   f_d(u) = f(theta_k + R_d^T u), other coordinates frozen, from u = 0 with the local radius
   started at ``local_fraction * Delta_k``;
3. the corrections u_d are assembled with one ``Allgatherv`` into a preallocated flat vector s (no
   arithmetic, so every rank holds the same bits), pred = sum_d delta_d with one scalar Allreduce;
4. f(theta_k + s) is evaluated on each rank's share of B and summed; rank 0, the coordinator,
   computes rho and decides; decision, rho, new radius and the values they were taken on
   (f(theta_k), f(theta_k + s), pred) reach every rank in one ``Bcast``;
5. optional global pass: ``global_iters`` trust-region iterations on all of theta, with loss and
   gradient summed over the ranks' shares of B; every decision of the engine (stop, trial loss,
   finiteness) is taken on rank 0's values, broadcast (the engine's ``agree`` hook).

Decisions this module takes where the method page leaves room (docs/method.md sections 3-6):

* Local budget.  Every local step radius is min(local radius, b) with b = local_fraction * Delta_k,
  and the accumulated correction u is clipped to the box ||u||_inf <= b; the predicted decrease of a
  local step is that of the clipped step.  So ||s||_inf <= b at every local iterate, and local
  iterations past the first still make progress along the faces of the box.
* The assembled s is applied as theta_k + s on every rank (the owner of a subdomain does not keep its
  own local iterate), so all ranks hold bitwise identical parameters.
* The acceptance evaluation also computes the gradient when a global pass follows: the pass starts
  from an accepted point without evaluating it again; after a rejection it starts from theta_k with
  the gradient assembled from the local phases' first evaluations (one Allgatherv, no computation).
* f(theta_k) in rho is the coordinator's own f_0(0).
* One function per iteration.  The minibatch is cut once into P shares (P = world size; in serial
  emulation P = subdomains, the cuts of the N-rank run), each share into ``micro_batch`` pieces;
  every evaluation of the iteration (local phases, FOC term, trial, global pass) sums over exactly
  these pieces (a local phase over all of them, or its replica's contiguous block of them; a
  frozen prefix is applied piece by piece).  So batch-norm statistics are the same in f(theta_k),
  the trial and the global pass, and the serial emulation evaluates what the N-rank run does.
  Running statistics are the coordinator's (broadcast after each iteration): a serial emulation's
  differ, its parameters do not.
* Decisions are never taken on values each rank reduced itself (MPI does not promise bitwise
  identical Allreduce results on every rank): the coordinator's values are broadcast, and replicas
  take their group's rank-0 f_d(0), stop, trial loss and finiteness (one ``Bcast`` each).
* A non-finite f_d(theta_k) on any rank (a data fault may hit one rank's copy of B only) is summed
  into the combination's Allreduce: every rank then reports f(theta_k) = NaN, rejects the step
  without a trial and skips the global pass, so the training loop stops on every rank.
* Every evaluation is counted, the FOC term's gradient at theta_k included (a global evaluation).
* ``acceptance="none"``: s is always applied, except a non-finite trial loss, which is rejected in
  every mode (applying it would end the run).  ``nonmonotone``: the numerator uses the largest of
  f(theta_k) and the losses of the last ``window`` accepted iterates.
* Local quasi-Newton pairs live on the rank that owns the subdomain, sized by the subdomain.
* Hybrid grid: world = N * replicas ranks; rank = d * replicas + j.  The replicas of subdomain d
  split the minibatch in their local phase and sum loss and gradient within their communicator.
* Serial emulation: on one rank with ``subdomains=N`` the N local phases run one after another;
  the result equals the N-rank run up to the rounding of the shared evaluations.
* ``autocast="bf16"``: the local phases' evaluations (the frozen prefix excepted) run their forward
  pass under ``torch.autocast`` to bfloat16 on the parameters' device type; each piece's loss is
  cast back to the parameters' dtype before it is summed, and gradients land in the parameters'
  dtype; the trial, the global pass, rho and every sum stay as without it.  f(theta_k) in rho is then one
  more loss-only shared evaluation without autocast (counted as a global evaluation), so that rho
  compares two evaluations of the same precision; the decreases delta_d (pred) and, after a
  rejection, the gradient handed to the global pass come from the local phases' autocast
  evaluations.  The iterates differ from the default's by bfloat16 rounding only.
* Stochastic local phases (``local_batch``): a local phase evaluates whole pieces of the
  iteration's cuts (its shard, or ceil(q * pieces) drawn by a generator seeded with (seed,
  iteration, subdomain)), so the serial emulation draws what the N-rank run does and a resume is
  bitwise.  The iteration then starts with a shared evaluation of f(theta_k) and its gradient: the
  reference of rho, the FOC term's gradient and the global pass's gradient after a rejection.
  A local phase on one share (``shard`` or the data space, one rank per subdomain, no autocast)
  takes f_d(0) and its gradient from that evaluation's sums of its share.
* ``local_decisions="device"``: each local phase runs :meth:`TrustRegionCore.run_on_device`
  (branch-free decisions, bitwise the host run's iterates) and reads its final loss and f_d(0) in
  one transfer; a one-rank loss-only evaluation stays a device tensor.
* Data space (``space="data"``, APTS_D): subdomain d is share d of the minibatch and its local
  phase works on all of theta with the FOC term (always on); s = sum_d (|B_d|/|B|) u_d, summed
  on rank 0 with one Reduce, then broadcast; pred = -grad f(theta_k)^T s, the first-order
  model's decrease for the averaged step (docs/method.md section 6).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from . import options
from .comm import BufferSync, Comm
from .decomposition import Subdomain, decompose
from .errors import InputError
from .launch import join
from .objective import as_objective, batch_size, chunks, share
from .optimizers import Optimizer, as_batch
from .trust_region import TrustRegionConfig, TrustRegionCore, update_radius


@dataclass
class IterationReport:
    """What one APTS iteration did (docs/method.md section 3, step 6)."""

    loss: float = math.nan            # f(theta_k)
    trial_loss: float = math.nan      # f(theta_k + s)
    final_loss: float = math.nan      # loss after the global pass (the next iterate's, on this batch)
    pred: float = math.nan
    rho: float = math.nan
    accepted: bool = False
    radius: float = math.nan          # Delta_{k+1}
    step_inf: float = math.nan        # ||s||_inf
    local_loss_evals: int = 0         # this rank
    local_grad_evals: int = 0
    local_loss_evals_total: int = 0   # all ranks
    local_grad_evals_total: int = 0
    global_loss_evals: int = 0        # shared evaluations of the whole objective
    global_grad_evals: int = 0
    global_accepted: int = 0
    global_rejected: int = 0
    seconds_local: float = 0.0        # local phase, less the collectives in it
    seconds_local_max: float = 0.0    # the longest local phase of one subdomain held here (serial
                                      # emulation: the critical path an N-rank run would have)
    seconds_comm: float = 0.0         # in collectives (transfer)
    seconds_wait: float = 0.0         # waiting for the slowest rank (only with Comm.measure_wait)
    seconds_global: float = 0.0       # acceptance and global pass, less the collectives in them
    seconds: float = 0.0


class APTS(Optimizer):
    """Additively Preconditioned Trust-region Strategy across the ranks of ``comm``.

    ``APTS(model, objective, comm, **keywords)``; ``step(*batch) -> loss`` runs one iteration on the
    minibatch (the same on every rank; ``step(x, y)`` or ``step((x, y))``, any number of tensors
    sharing dim 0) and returns the loss at the new iterate.  ``objective`` is an
    :class:`~apts_mpi.objective.Objective` or a mean loss ``loss_fn(output, target)`` (like
    ``cross_entropy``, wrapped in ``SampleLoss``).  ``comm`` is an mpi4py communicator
    (default ``COMM_SELF``: serial emulation).

    Keywords: those of the ``apts`` table in :mod:`apts_mpi.options` (defaults, types, allowed
    values and checks are written there once): the trust-region constants ``radius``,
    ``max_radius``, ``min_radius``, ``eta1``, ``eta2``, ``decrease``, ``increase``, ``norm``,
    ``step``, ``memory``; ``subdomains`` (default: world size / replicas), ``decomposition``,
    ``local_iters``, ``local_fraction``, ``local_model``, ``acceptance``, ``window``,
    ``global_iters`` (0: no global pass), ``global_model``, ``foc``, ``replicas``,
    ``micro_batch``, ``autocast``, ``local_batch`` (1, a fraction of the minibatch's pieces, or
    ``"shard"``), ``space`` (``"parameters"`` or ``"data"``), ``model_parallel`` (True: a
    :class:`~apts_mpi.model_parallel.ModelParallelAPTS`, rank d holding block d only); ``seed``
    (for the ``random-tensors`` decomposition and the pieces a stochastic local phase draws) and
    ``example`` (a model input of a few samples, for the ``cost`` decomposition's FLOP count;
    without it the cost is estimated from the parameter shapes).  ``report`` holds the
    :class:`IterationReport` of the last iteration, ``record()`` its row of the per-iteration series.

    Raises InputError (a ValueError) for a bad keyword or a world size that does not match
    subdomains * replicas.
    """

    def __new__(cls, *args, model_parallel=False, **keywords):
        if model_parallel is True and cls is APTS:  # block d on rank d only: apts_mpi/model_parallel.py
            from .model_parallel import ModelParallelAPTS
            cls = ModelParallelAPTS
        return super().__new__(cls)

    def __init__(self, model, objective, comm=None, *, seed=0, example=None, **keywords):
        o = options.resolve("apts", keywords)
        join(model, comm)  # launch check; rank 0's parameters and buffers on every rank (as DDP)
        self.model, self.objective = model, as_objective(objective)
        self.comm = Comm(comm)
        world = self.comm.size
        self.replicas, subdomains = o["replicas"], o["subdomains"]
        if world % self.replicas:
            raise InputError(f"world size {world} is not divisible by replicas={self.replicas}")
        if world > 1:
            expected = world // self.replicas
            if subdomains is not None and subdomains != expected:
                raise InputError(f"subdomains={subdomains} needs {subdomains * self.replicas} ranks "
                                 f"with replicas={self.replicas}; the world has {world}")
            subdomains = expected
        self.n_subdomains = 1 if subdomains is None else subdomains
        self.local_iters, self.global_iters, self.window = o["local_iters"], o["global_iters"], o["window"]
        self.local_fraction, self.acceptance, self.foc = o["local_fraction"], o["acceptance"], o["foc"]
        self.micro_batch = o["micro_batch"]
        self.autocast = torch.bfloat16 if o["autocast"] == "bf16" else None
        self.local_batch, self.data_space, self.seed = o["local_batch"], o["space"] == "data", seed
        self.on_device = o["local_decisions"] == "device"  # TrustRegionCore.run_on_device
        # stochastic local phases and the data space evaluate f(theta_k) and its gradient on the
        # whole minibatch first (a shared evaluation): no local phase sees all of it
        self.exact_start = self.data_space or self.local_batch != 1
        local_model, global_model, decomposition = o["local_model"], o["global_model"], o["decomposition"]

        base = {k: o[k] for k in options.options("trust-region") if k != "model"}
        self.config = TrustRegionConfig(model=global_model, **base)
        local_config = TrustRegionConfig(model=local_model, **base)
        self.radius = self.config.radius

        # a cached prefix (below) makes the local phases of later subdomains cheaper: the cost split
        # knows it.  The same value as _frozen_prefix's test (cache_prefix is on at construction).
        prefix_cached = self.objective.sequential_inputs and isinstance(model, torch.nn.Sequential)
        parts = decompose(model, 1 if self.data_space else self.n_subdomains, decomposition, seed,
                          example=example, prefix_cached=prefix_cached)
        self.subdomains = parts
        params = parts[0].params
        if self.data_space:  # every shard's local phase works on all parameters
            parts = parts * self.n_subdomains
        # the global flat layout is the subdomains' pieces in subdomain order: subdomain d occupies
        # the contiguous slice [offset_d, offset_d + numel_d) of every n-vector.
        self.whole = parts[0] if self.data_space else \
            Subdomain(params, [p for sd in parts for p in sd.pieces])
        sizes = [sd.numel for sd in parts]
        self.offsets = [sum(sizes[:d]) for d in range(len(parts) + 1)]
        rank = self.comm.rank
        self.subdomain_id = rank // self.replicas if world > 1 else None
        owned = range(len(parts)) if world == 1 else [self.subdomain_id]
        self.local = {d: TrustRegionCore(parts[d], local_config) for d in owned}
        self.global_core = TrustRegionCore(self.whole, self.config)
        self.group = Comm(comm.Split(self.subdomain_id, rank)) if self.replicas > 1 else Comm(None)
        # The fixed cuts of every minibatch: P shares (one per rank; in serial emulation one per
        # subdomain, as its N-rank run has), each cut into micro-batches.  Every evaluation of an
        # iteration sums over exactly these pieces, so that batch-norm statistics are the same in
        # f(theta_k), the trial and the global pass, and equal to an N-rank run's.
        self.n_shares = world if world > 1 else self.n_subdomains
        # decisions inside a replica group come from its rank 0 (one Bcast), never from values each
        # replica reduced on its own: MPI does not promise bitwise identical Allreduce results
        self.local_agree = self.group.bcast if self.replicas > 1 else None

        # Allgatherv layout: the replicas of subdomain d each send one contiguous chunk of its slice.
        self.counts, self.displs = [], []
        for d in range(len(parts)) if world > 1 and not self.data_space else []:
            a, b = self.offsets[d], self.offsets[d + 1]
            cuts = [a + (b - a) * j // self.replicas for j in range(self.replicas + 1)]
            self.counts += [cuts[j + 1] - cuts[j] for j in range(self.replicas)]
            self.displs += cuts[:-1]

        kw = dict(dtype=self.whole.dtype, device=self.whole.device)
        n = self.whole.numel
        self.theta = torch.empty(n, **kw)        # theta_k, restored bitwise after a rejection
        self.correction = torch.zeros(n, **kw)   # s
        # the gradient at the trial point, handed to the global pass after an acceptance
        self.trial_grad = torch.empty(n, **kw) if self.global_iters else None
        self.grad0 = torch.zeros(n, **kw)        # R_d grad f(theta_k), assembled on demand
        self.reduce_buffer = torch.empty(n + 1, **kw)  # [gradient | loss] of a shared evaluation
        foc = self.foc or self.data_space
        self.foc_term = torch.zeros(n, **kw) if foc else None
        self.foc_work = torch.empty(n, **kw) if foc else None
        self.global_grad = torch.empty(n, **kw) if self.exact_start else None  # grad f(theta_k)
        # a local phase on one share takes f_d(0) from the start evaluation (_start_evaluation)
        self.reuse_start = (self.data_space or self.local_batch == "shard") and self.replicas == 1 \
            and self.autocast is None
        self.start_sums = {d: torch.empty(n + 1, **kw) for d in owned} if self.reuse_start else None
        self.sync_buffers = BufferSync(model, self.comm)  # batch-norm statistics
        self.history = deque(maxlen=self.window)  # losses of the last accepted iterates (NAPTS)
        self.report = IterationReport()
        self.iteration = 0
        # savings in the local phase, switchable for the benchmark's ablation (leave them on):
        # no weight gradients for tensors outside the subdomain; a frozen Sequential prefix run once
        self.freeze_others = self.cache_prefix = True

    # -- evaluations ------------------------------------------------------------------------------
    def _pieces(self, batch, shares) -> list:
        """The micro-batches of ``shares`` (indices among the ``n_shares`` shares of ``batch``)."""
        return [piece for p in shares
                for piece in chunks(share(batch, p, self.n_shares), self.micro_batch)]

    def _local_pieces(self, batch, d) -> tuple[list, int]:
        """The pieces this rank evaluates in subdomain d's local phase, and the number of samples of
        that phase's part of the minibatch (over its replicas).

        All of the minibatch (``local_batch`` 1; replica j takes its block of shares); its shard
        (``local_batch: shard`` or ``space: data``: the shares d*r .. d*r+r-1 of the P, replica j
        share d*r+j); or a fraction q: ceil(q * pieces) of the iteration's pieces (at least one per
        replica), drawn without replacement by a generator seeded with (seed, iteration, d), each
        replica a contiguous block of the drawn pieces in their order.
        """
        r, j = self.group.size, self.group.rank
        if self.local_batch == 1 and not self.data_space:
            per_replica = self.n_shares // r  # this replica's shares of the P
            return self._pieces(batch, range(j * per_replica, (j + 1) * per_replica)), batch_size(batch)
        if self.data_space or self.local_batch == "shard":
            mine = range(d * r, (d + 1) * r)
            return self._pieces(batch, [d * r + j]), sum(batch_size(share(batch, p, self.n_shares))
                                                         for p in mine)
        every = self._pieces(batch, range(self.n_shares))
        k = min(max(math.ceil(self.local_batch * len(every)), r), len(every))
        rng = np.random.default_rng([self.seed, self.iteration, d])
        drawn = [every[i] for i in sorted(rng.choice(len(every), size=k, replace=False).tolist())]
        return drawn[j * k // r:(j + 1) * k // r], sum(batch_size(piece) for piece in drawn)

    def _world_pieces(self, batch) -> list:
        """The pieces this rank evaluates in a shared evaluation over the world (all in serial)."""
        return self._pieces(batch, [self.comm.rank] if self.comm.size > 1 else range(self.n_shares))

    def _shared_evaluate(self, pieces, B, comm: Comm, subdomain: Subdomain, grad_out=None, net=None,
                         autocast=None):
        """f (and its gradient on ``subdomain`` into ``grad_out``) of a minibatch of ``B`` samples,
        of which this rank evaluates ``pieces``, summed over ``comm``'s ranks.

        ``net`` replaces the model (the part after a cached prefix).  ``grad_out=None``: the loss only.
        ``autocast`` (a dtype): each piece's forward pass under ``torch.autocast`` to it, its loss cast
        back to the parameters' dtype before backward and sum.
        """
        if grad_out is None:  # one rank: left on the device (correctly rounded as the host's double / B)
            loss = self._sums(pieces, None, None, net, autocast)
            return loss / B if comm.size == 1 else comm.sum_scalars([float(loss)])[0] / B
        m = subdomain.numel
        buf = self._sums(pieces, subdomain, self.reduce_buffer[:m + 1], net, autocast)
        comm.allreduce_(buf)
        torch.div(buf[:m], B, out=grad_out)
        return buf[m] / B

    def _sums(self, pieces, subdomain: Subdomain | None, out, net=None, autocast=None):
        """This rank's sum over ``pieces``: the loss (``out=None``), or [the gradient on
        ``subdomain`` | the loss] written into ``out`` (returned)."""
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

    def _start_evaluation(self, batch, B, pieces) -> float:
        """f(theta_k) and its gradient (into ``global_grad``), a shared evaluation.

        Where a local phase evaluates exactly one share of the minibatch (``local_batch: shard`` or
        the data space, one rank per subdomain, no autocast), this rank's sums are formed share by
        share and kept (``start_sums[d]``): subdomain d's local phase takes f_d(0) and its gradient
        from them instead of evaluating its share again.
        """
        if not self.reuse_start:
            return float(self._shared_evaluate(pieces, B, self.comm, self.whole, self.global_grad))
        n, total = self.whole.numel, self.reduce_buffer
        shares = [self.comm.rank] if self.comm.size > 1 else range(self.n_shares)
        for i, p in enumerate(shares):
            part = self._sums(self._pieces(batch, [p]), self.whole, self.start_sums[p])
            total.copy_(part) if i == 0 else total.add_(part)
        self.comm.allreduce_(total)
        torch.div(total[:n], B, out=self.global_grad)
        return float(total[n] / B)

    def _frozen_prefix(self, mine) -> int:
        """Leading layers of an ``nn.Sequential`` model that hold none of the parameters ``mine``:
        their output is constant during a local phase, so it is computed once, not per evaluation."""
        if not (self.objective.sequential_inputs and isinstance(self.model, torch.nn.Sequential)):
            return 0
        for i, layer in enumerate(self.model):
            if any(id(p) in mine for p in layer.parameters()):
                return i
        return len(self.model)

    # -- the iteration ----------------------------------------------------------------------------
    def _decide(self, loss0, trial, pred):
        """Coordinator's rule for the assembled step: (accept, rho, new radius)."""
        finite = math.isfinite(trial)
        reference = max([loss0, *self.history]) if self.acceptance == "nonmonotone" else loss0
        rho = (reference - trial) / pred if (finite and pred > 0) else -math.inf
        if self.acceptance == "none":
            return finite, rho, self.radius
        accept = finite and pred > 0 and rho >= self.config.eta1
        return accept, rho, update_radius(self.radius, rho, **self.config.radius_rule())

    def _coordinate(self, loss0, trial, pred):
        """The coordinator's decision on the assembled step, with the values it was taken on, on
        every rank (one Bcast): (accept, rho, new radius, f(theta_k), trial loss, pred)."""
        values = [*self._decide(loss0, trial, pred), loss0, trial, pred] if self.comm.rank == 0 \
            else [0.0] * 6
        accept, rho, radius, loss0, trial, pred = self.comm.bcast(values)
        return bool(accept), rho, radius, loss0, trial, pred

    def _settle(self, loss0, trial, pred, grad_k):
        """The coordinator's decision applied on every rank: theta_k + s kept, or theta_k restored
        (bitwise).  Returns (accept, rho, f(theta_k), trial loss, pred, the loss and the gradient
        the global pass starts from: the trial's, or f(theta_k) and ``grad_k``)."""
        accept, rho, self.radius, loss0, trial, pred = self._coordinate(loss0, trial, pred)
        if accept:
            if self.acceptance == "nonmonotone":
                self.history.append(trial)
            return accept, rho, loss0, trial, pred, trial, self.trial_grad
        self.whole.scatter(self.theta)
        return accept, rho, loss0, trial, pred, loss0, grad_k

    def _local_phase(self, d, core, batch, theta):
        """Run subdomain d's local solve from theta_k; returns (delta_d, f_d(0))."""
        sub = core.subdomain
        a, b = (0, sub.numel) if self.data_space else (self.offsets[d], self.offsets[d + 1])
        mine = {id(sub.params[q.index]) for q in sub.pieces}
        frozen = [p for p in self.whole.params if id(p) not in mine] if self.freeze_others else []
        for p in frozen:
            p.requires_grad_(False)  # no weight gradients for frozen tensors
        try:
            k = self._frozen_prefix(mine) if self.cache_prefix else 0
            pieces, B = self._local_pieces(batch, d)
            net = self.model[k:] if k else self.model
            if k:  # under no_grad (step): constant for this phase; piece by piece, as without it
                pieces = [(self.model[:k](piece[0]), *piece[1:]) for piece in pieces]

            def f_d(grad_out=None):
                return self._shared_evaluate(pieces, B, self.group, sub, grad_out, net=net,
                                             autocast=self.autocast)

            def with_foc(grad_out=None):  # f_d(u) + <R_d grad f(theta_k) - grad f_d(0), u>
                loss = f_d(grad_out)
                u = sub.gather(self.foc_work[:b - a]).sub_(theta[a:b])
                if grad_out is not None:
                    grad_out.add_(self.foc_term[a:b])
                return loss + self.foc_term[a:b].dot(u)

            grad0 = self.grad0[a:b]
            if self.reuse_start:  # f_d(0) and its gradient: the start evaluation's sums of share d
                torch.div(self.start_sums[d][a:b], B, out=grad0)
                loss0 = self.start_sums[d][-1] / B
            else:  # f_d(0): the FOC term is 0 there
                loss0 = f_d(grad0)
                core.count_evaluation(loss=1, grad=1)
            if not self.on_device:
                loss0 = float(loss0)
            if self.local_agree is not None:  # the replicas start from their rank 0's f_d(0)
                loss0 = self.local_agree([loss0])[0]
            foc = self.foc or self.data_space
            if foc and self.exact_start:  # grad f_d(0) + FOC term = R_d grad f(theta_k), exactly
                torch.sub(self.global_grad[a:b], grad0, out=self.foc_term[a:b])
                core.set_gradient(self.global_grad[a:b])
            elif foc:
                self.foc_term[a:b].sub_(grad0)
                core.set_gradient(torch.add(grad0, self.foc_term[a:b], out=self.foc_work[:b - a]))
            else:
                core.set_gradient(grad0)
            core.set_radius(self.local_fraction * self.radius)
            box = self.local_fraction * self.radius
            if self.on_device:  # one transfer: the final loss and f_d(0)
                loss, loss0 = core.run_on_device(with_foc if foc else f_d, self.local_iters, loss0,
                                                 box=box, read=[loss0])
            else:
                loss = core.run(with_foc if foc else f_d, self.local_iters, loss=loss0, box=box,
                                agree=self.local_agree, loss_only=True)  # the last trial's gradient is never used
            if self.data_space:  # s = sum_d w_d u_d, w_d = |B_d| / |B|
                self.correction.add_(core.offset, alpha=B / batch_size(batch))
            else:
                self.correction[a:b].copy_(core.offset)
            sub.scatter(theta[a:b])  # back to theta_k: every rank applies the same theta_k + s
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return max(loss0 - loss, 0.0), loss0

    @torch.no_grad()
    def step(self, *batch) -> float:
        """One APTS iteration on the minibatch; returns the loss at the new iterate.

        ``step(x, y)`` or ``step((x, y))``: the tensors of the minibatch, sharing dim 0.
        """
        batch = as_batch(batch)
        t_start = time.perf_counter()
        comm = self.comm

        def in_collectives():
            return comm.seconds + comm.waiting + self.group.seconds + self.group.waiting
        wait0, comm_s0 = comm.waiting + self.group.waiting, in_collectives()
        glob = self.global_core
        theta = self.theta
        self.whole.gather(theta)  # theta_k
        r = IterationReport()
        before = {d: (c.counters.loss_evals, c.counters.grad_evals) for d, c in self.local.items()}
        global_before = self._global_counts()
        B, pieces = batch_size(batch), self._world_pieces(batch)  # this rank's shared evaluations

        if self.exact_start:  # f(theta_k) and its gradient, a shared evaluation
            loss_k = self._start_evaluation(batch, B, pieces)
            glob.count_evaluation(loss=1, grad=1)
        elif self.foc:  # grad f(theta_k), a shared evaluation of the whole objective
            self._shared_evaluate(pieces, B, comm, self.whole, self.foc_term)
            glob.count_evaluation(loss=1, grad=1)
        if self.data_space:
            self.correction.zero_()

        # 2. local phase
        t0 = time.perf_counter()
        delta, loss0, broken = 0.0, math.nan, 0
        for d, core in self.local.items():
            t_d = time.perf_counter()
            delta_d, f0 = self._local_phase(d, core, batch, theta)
            r.seconds_local_max = max(r.seconds_local_max, time.perf_counter() - t_d)
            if self.comm.rank % self.replicas == 0:  # one replica reports delta_d
                delta += delta_d
            if d == 0:
                loss0 = f0  # the coordinator's f(theta_k)
            broken += not math.isfinite(f0)
        if self.exact_start:  # f(theta_k) on the whole minibatch, not a local phase's part of it
            loss0 = loss_k
            broken += not math.isfinite(loss_k)
        r.local_loss_evals = sum(c.counters.loss_evals - before[d][0] for d, c in self.local.items())
        r.local_grad_evals = sum(c.counters.grad_evals - before[d][1] for d, c in self.local.items())
        t_local = time.perf_counter() - t0
        comm_local = in_collectives() - comm_s0

        # 3. additive combination
        if self.data_space:  # s = sum of the ranks' w_d u_d, formed on rank 0, its bits on every rank
            comm.bcast_(comm.reduce_(self.correction))
        else:
            comm.allgatherv_(self.correction, self.counts, self.displs)
        # one scalar Allreduce: the decreases, the evaluation counts and the number of ranks
        # whose f_d(theta_k) is not finite (a data fault may hit one rank only)
        pred, local_loss_evals, local_grad_evals, broken = comm.sum_scalars(
            [delta, r.local_loss_evals, r.local_grad_evals, broken])
        r.local_loss_evals_total, r.local_grad_evals_total = int(local_loss_evals), int(local_grad_evals)
        if self.data_space:  # the first-order model's decrease for s (the coordinator's is used)
            pred = -float(self.global_grad.dot(self.correction))
        r.step_inf = float(torch.linalg.vector_norm(self.correction, math.inf))

        comm_combine = in_collectives() - comm_s0 - comm_local

        # 4. acceptance, on shares of B
        t0 = time.perf_counter()
        need_grad = self.global_iters > 0
        if broken:  # f(theta_k) is not finite on some rank: nothing to decide, the loop stops
            loss0 = trial = loss = rho = math.nan
            accept = False
        else:
            if self.autocast is not None and not self.exact_start:  # f(theta_k) in the parameters'
                # precision, as the trial's (an exact start evaluated it so already)
                loss0 = float(self._shared_evaluate(pieces, B, comm, self.whole))
                glob.count_evaluation(loss=1, grad=0)
            self.whole.add_(self.correction)
            trial = float(self._shared_evaluate(pieces, B, comm, self.whole,
                                                self.trial_grad if need_grad else None))
            glob.count_evaluation(loss=1, grad=int(need_grad))
            accept, rho, loss0, trial, pred, loss, gradient = self._settle(
                loss0, trial, pred, self.global_grad if self.exact_start else self.grad0)
            if not accept and need_grad and not self.exact_start:  # grad f(theta_k) from the
                comm.allgatherv_(self.grad0, self.counts, self.displs)  # local phases' evaluations

        # 5. global pass
        if self.global_iters and not broken:
            glob.set_gradient(gradient)
            glob.set_radius(self.radius)
            evaluate = lambda out=None: self._shared_evaluate(pieces, B, comm, self.whole, out)
            loss = glob.run(evaluate, self.global_iters, loss=loss, agree=comm.bcast, loss_only=True)
            self.radius = glob.radius
        self.sync_buffers()
        t_global = time.perf_counter() - t0

        self._report_outcome(r, global_before, loss0, trial, loss, pred, rho, accept)
        r.seconds_wait = comm.waiting + self.group.waiting - wait0
        r.seconds_comm = in_collectives() - comm_s0 - r.seconds_wait
        comm_global = in_collectives() - comm_s0 - comm_local - comm_combine
        r.seconds_local, r.seconds_global = t_local - comm_local, t_global - comm_global
        r.seconds = time.perf_counter() - t_start
        self.report = r
        self.iteration += 1
        return loss

    def _global_counts(self) -> tuple:
        c = self.global_core.counters
        return c.loss_evals, c.grad_evals, c.accepted, c.rejected

    def _report_outcome(self, r, before, loss0, trial, loss, pred, rho, accept) -> None:
        """The iteration's values, decision, radius and global-pass counts (since ``before``, a
        :meth:`_global_counts` taken at its start) into the report ``r``."""
        r.loss, r.trial_loss, r.final_loss, r.pred, r.rho = loss0, trial, loss, pred, rho
        r.accepted, r.radius = accept, self.radius
        r.global_loss_evals, r.global_grad_evals, r.global_accepted, r.global_rejected = (
            now - then for now, then in zip(self._global_counts(), before))

    def record(self) -> dict:
        """The last iteration's row of the per-iteration series (cumulative counts are the caller's)."""
        r = self.report
        return dict(loss=r.loss, final_loss=r.final_loss, radius=r.radius, rho=r.rho,
                    accepted=int(r.accepted), nonfinite=int(not math.isfinite(r.trial_loss)),
                    step_inf=r.step_inf,
                    loss_evals=r.local_loss_evals_total + r.global_loss_evals,
                    grad_evals=r.local_grad_evals_total + r.global_grad_evals,
                    seconds_local=r.seconds_local, seconds_local_max=r.seconds_local_max,
                    seconds_comm=r.seconds_comm,
                    seconds_global=r.seconds_global)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Radius, window, iteration count and every engine's state owned by this rank."""
        return {"radius": self.radius, "iteration": self.iteration, "history": list(self.history),
                "global": self.global_core.state_dict(),
                "local": {str(d): c.state_dict() for d, c in self.local.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.radius = float(state["radius"])
        self.iteration = int(state["iteration"])
        self.history = deque(state["history"], maxlen=self.window)
        self.global_core.load_state_dict(state["global"])
        for d, c in self.local.items():
            c.load_state_dict(state["local"][str(d)])
