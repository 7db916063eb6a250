"""APTS: one parameter subdomain per rank (docs/method.md sections 2, 3 and 6), one iteration made
of parts (:mod:`apts_mpi.iteration`): an evaluator, a local phase, a combiner and a coordinator.

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
* ``local_decisions="device"``: each local phase runs :meth:`TrustRegionCore.run_on_device`
  (branch-free decisions, bitwise the host run's iterates) and reads its final loss and f_d(0) in
  one transfer; a one-rank loss-only evaluation stays a device tensor.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import model_parallel, options
from .comm import Comm
from .decomposition import Subdomain, decompose
from .errors import InputError
from .iteration.combiner import AverageCombiner, SumCombiner
from .iteration.coordinator import Coordinator
from .iteration.evaluator import Evaluator
from .iteration.local_phase import FirstOrderConsistency, LocalPhase
from .launch import join
from .objective import as_objective
from .optimizer import Optimizer, as_batch
from .trust_region import TrustRegionCore, engine_configs


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
    damped: int = -1                  # 1: the half step s/2 was taken (damping), 0: not, -1: no damping
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


def _subdomain_count(o: dict, world: int) -> int:
    """The number of parameter subdomains; InputError for a world that does not fit."""
    replicas, subdomains = o["replicas"], o["subdomains"]
    if world % replicas:
        raise InputError(f"world size {world} is not divisible by replicas={replicas}")
    if world > 1:
        expected = world // replicas
        if subdomains is not None and subdomains != expected:
            raise InputError(f"subdomains={subdomains} needs {subdomains * replicas} ranks "
                             f"with replicas={replicas}; the world has {world}")
        subdomains = expected
    return 1 if subdomains is None else subdomains


def _layout(model, objective, o: dict, n_subdomains: int, seed, example):
    """(subdomains, the subdomain of each local phase, the whole as one Subdomain, offsets).

    The global flat layout is the subdomains' pieces in subdomain order: subdomain d occupies the
    contiguous slice [offset_d, offset_d + numel_d) of every n-vector.  In the data space every
    local phase works on all of theta."""
    data_space = o["space"] == "data"
    # a cached prefix makes the local phases of later subdomains cheaper: the cost split knows it
    prefix_cached = objective.sequential_inputs and isinstance(model, torch.nn.Sequential)
    subdomains = decompose(model, 1 if data_space else n_subdomains, o["decomposition"], seed,
                           example=example, prefix_cached=prefix_cached)
    parts = subdomains * n_subdomains if data_space else subdomains
    whole = parts[0] if data_space else Subdomain(parts[0].params, [p for sd in parts for p in sd.pieces])
    sizes = [sd.numel for sd in parts]
    return subdomains, parts, whole, [sum(sizes[:d]) for d in range(len(sizes) + 1)]


def _sum_combiner(comm: Comm, offsets, replicas: int) -> SumCombiner:
    """Allgatherv layout: the replicas of subdomain d each send one chunk of its slice."""
    counts, displs = [], []
    for d in range(len(offsets) - 1) if comm.size > 1 else []:
        a, b = offsets[d], offsets[d + 1]
        cuts = [a + (b - a) * j // replicas for j in range(replicas + 1)]
        counts += [cuts[j + 1] - cuts[j] for j in range(replicas)]
        displs += cuts[:-1]
    return SumCombiner(comm, counts, displs, reports=comm.rank % replicas == 0)


def build_parts(model, objective, comm: Comm, o: dict, seed, example) -> SimpleNamespace:
    """The parts of APTS with the whole model on every rank, picked by the keywords ``o``: the
    decomposition, the engines, an :class:`Evaluator`, a :class:`LocalPhase`, a
    :class:`SumCombiner` (parameter space) or :class:`AverageCombiner` (data space) and a
    :class:`Coordinator`.  Each keyword sets one part or one part's setting."""
    world, rank, replicas = comm.size, comm.rank, o["replicas"]
    n_subdomains, data_space = _subdomain_count(o, world), o["space"] == "data"
    config, local_config = engine_configs(o)
    subdomains, parts, whole, offsets = _layout(model, objective, o, n_subdomains, seed, example)
    subdomain_id = rank // replicas if world > 1 else None
    owned = range(len(parts)) if world == 1 else [subdomain_id]
    group = comm.split(subdomain_id, rank) if replicas > 1 else Comm(None)
    n, kw = whole.numel, dict(dtype=whole.dtype, device=whole.device)
    # stochastic local phases and the data space evaluate f(theta_k) and its gradient on the
    # whole minibatch first: no local phase sees all of it
    exact = data_space or o["local_batch"] != 1
    gradient_k = torch.empty(n, **kw) if exact else None  # grad f(theta_k)
    theta = torch.empty(n, **kw)
    foc = FirstOrderConsistency(n, theta, gradient_k, **kw) if o["foc"] or data_space else None
    glob = TrustRegionCore(whole, config)
    autocast = torch.bfloat16 if o["autocast"] == "bf16" else None
    evaluator = Evaluator(
        model, objective, whole, comm, group, glob, n_shares=world if world > 1 else n_subdomains,
        micro_batch=o["micro_batch"], local_share="shard" if data_space else o["local_batch"],
        seed=seed, start="exact" if exact else "gradient" if foc else None, autocast=autocast,
        reuse_start=(data_space or o["local_batch"] == "shard") and replicas == 1 and autocast is None,
        owned=owned, start_out=gradient_k if exact else foc.term if foc else None)
    local_phase = LocalPhase(o["local_iters"], o["local_fraction"], foc=foc,
                             agree=group.bcast if replicas > 1 else None,  # the group's rank 0 decides
                             on_device=o["local_decisions"] == "device",
                             cap=o["radius_control"] == "combined")
    local = {d: TrustRegionCore(parts[d], local_config) for d in owned}
    if local_phase.on_device and not all(core.solver.device for core in local.values()):
        raise InputError(f"local_decisions='device' needs a step formed on the device; "
                         f"step={o['step']!r} is not")
    return SimpleNamespace(
        config=config, whole=whole, theta=theta, subdomains=subdomains, offsets=offsets,
        slices={d: (0, n) if data_space else (offsets[d], offsets[d + 1]) for d in owned},
        local=local, global_core=glob, group=group, n_subdomains=n_subdomains,
        n_shares=evaluator.n_shares, replicas=replicas, subdomain_id=subdomain_id,
        gradient_k=gradient_k, evaluator=evaluator, local_phase=local_phase,
        combiner=AverageCombiner(comm, gradient_k, local_pred=o["data_pred"] == "local") if data_space
        else _sum_combiner(comm, offsets, replicas),
        coordinator=Coordinator(comm, config, o["acceptance"], o["window"], whole.dtype,
                                budget=o["local_fraction"] if o["radius_control"] == "combined" else None))


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
    ``"shard"``), ``space`` (``"parameters"`` or ``"data"``), ``model_parallel`` (True: rank d
    holds block d only, the parts of :mod:`apts_mpi.model_parallel`: the same iteration with the
    pipe's evaluator and combiner); ``seed`` (for the ``random-tensors`` decomposition and the
    pieces a stochastic local phase draws) and ``example`` (a model input of a few samples, for the
    ``cost`` decomposition's FLOP count; without it the cost is estimated from the parameter
    shapes).  ``report`` holds the :class:`IterationReport` of the last iteration, ``record()`` its
    row of the per-iteration series.

    Raises InputError (a ValueError) for a bad keyword or a world size that does not match
    subdomains * replicas.
    """

    def __init__(self, model, objective, comm=None, *, seed=0, example=None, **keywords):
        o = options.resolve("apts", keywords)
        join(model, comm)  # launch check; rank 0's parameters and buffers on every rank (as DDP)
        self.model, self.objective, self.comm = model, as_objective(objective), Comm(comm)
        build = model_parallel.build_parts if o["model_parallel"] else build_parts  # block d on rank d
        vars(self).update(vars(build(model, self.objective, self.comm, o, seed, example)))
        self.local_iters, self.global_iters = o["local_iters"], o["global_iters"]
        self.radius_control, self.damping = o["radius_control"], o["damping"]
        self.params_held = self.evaluator.params_held
        kw = dict(dtype=self.whole.dtype, device=self.whole.device)
        n = self.whole.numel
        self.correction = torch.zeros(n, **kw)   # s
        # the gradient at the trial point, handed to the global pass after an acceptance
        self.trial_grad = torch.empty(n, **kw) if self.global_iters else None
        self.grad0 = torch.zeros(n, **kw)        # R_d grad f(theta_k), assembled on demand
        self.report = IterationReport()
        self.iteration = 0
        self.damped_tried = self.damped_accepted = 0  # damped combinations tried, accepted

    # the coordinator's radius and window; the evaluator's savings (the benchmark's ablation)
    radius = property(lambda self: self.coordinator.radius,
                      lambda self, value: setattr(self.coordinator, "radius", value))
    history = property(lambda self: self.coordinator.history)
    freeze_others = property(lambda self: self.evaluator.freeze_others,
                             lambda self, value: setattr(self.evaluator, "freeze_others", value))
    cache_prefix = property(lambda self: self.evaluator.cache_prefix,
                            lambda self, value: setattr(self.evaluator, "cache_prefix", value))
    # model parallel: the bytes this rank sent down and up the pipe in the last iteration
    bytes_per_link = property(lambda self: self.evaluator.bytes_per_link)

    # -- the iteration ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, *batch) -> float:
        """One APTS iteration on the minibatch; returns the loss at the new iterate.

        ``step(x, y)`` or ``step((x, y))``: the tensors of the minibatch, sharing dim 0.
        """
        batch = as_batch(batch)
        clock, r = _Clock(self.comm, self.group), IterationReport()
        global_before = self._global_counts()
        self.whole.gather(self.theta)  # theta_k
        self.evaluator.begin(batch, self.theta, self.iteration)
        loss_k = self.evaluator.start()  # f(theta_k) on the whole minibatch, or None
        clock.lap()
        self.combiner.begin(self.correction)
        delta, loss0, broken = self._local_phases(batch, r)
        if loss_k is not None:  # f(theta_k) on the whole minibatch, not a local phase's part of it
            loss0 = loss_k
            broken += not math.isfinite(loss_k)
        r.seconds_local = clock.lap()
        pred, r.local_loss_evals_total, r.local_grad_evals_total, broken, r.step_inf = \
            self.combiner.combine(self.correction, delta, r.local_loss_evals, r.local_grad_evals, broken)
        clock.lap()
        if broken:  # f(theta_k) is not finite on some rank: nothing to decide, the loop stops
            loss0 = trial = loss = rho = math.nan
            accept = False
        else:
            halves = self.damped_accepted
            accept, rho, loss0, trial, pred, loss = self._accept(loss0, pred, r.step_inf)
            r.damped = self.damped_accepted - halves if self.damping else -1
        self.evaluator.sync()
        r.seconds_global = clock.lap()
        self._report_outcome(r, global_before, loss0, trial, loss, pred, rho, accept)
        clock.finish(r)
        self.report = r
        self.iteration += 1
        return loss

    def _local_phases(self, batch, r: IterationReport):
        """Every local phase held here: (sum of the decreases delta_d, the coordinator's f(theta_k),
        the number of subdomains whose f_d(theta_k) is not finite); counts and times into ``r``."""
        before = {d: (c.counters.loss_evals, c.counters.grad_evals) for d, c in self.local.items()}
        delta, loss0, broken = 0.0, math.nan, 0
        for d, core in self.local.items():
            t_d = time.perf_counter()
            delta_d, f0, weight = self._local_phase(d, core, batch, self.theta)
            r.seconds_local_max = max(r.seconds_local_max, time.perf_counter() - t_d)
            # data space, data_pred 'local': pred = sum_d w_d delta_d (the combiner sums them)
            delta += weight * delta_d if getattr(self.combiner, "local_pred", False) else delta_d
            if d == 0:
                loss0 = f0  # the coordinator's f(theta_k)
            broken += not math.isfinite(f0)
        r.local_loss_evals = sum(c.counters.loss_evals - before[d][0] for d, c in self.local.items())
        r.local_grad_evals = sum(c.counters.grad_evals - before[d][1] for d, c in self.local.items())
        return delta, loss0, broken

    def _local_phase(self, d, core, batch, theta):
        """Subdomain d's local phase from theta_k; returns (delta_d, f_d(0), its weight |B_d| / |B|);
        its correction is
        collected into s and the parameters are back at theta_k."""
        a, b = self.slices[d]
        with self.evaluator.local(d, core, a, b) as local:
            loss, loss0 = self.local_phase.run(core, local, self.grad0[a:b], a, b, self.radius)
            weight = local.size / self.evaluator.B
            self.combiner.collect(self.correction, a, b, core.offset, weight)
            core.subdomain.scatter(theta[a:b])  # every rank applies the same theta_k + s
        return max(loss0 - loss, 0.0), loss0, weight

    def _accept(self, loss0, pred, step_inf=math.nan):
        """The trial f(theta_k + s), the coordinator's decision applied on every rank (theta_k + s
        kept, or theta_k restored bitwise) and the global pass.  Returns (accept, rho, f(theta_k),
        trial loss, pred, the loss at the new iterate)."""
        need_grad = self.global_iters > 0
        reference = self.evaluator.reference()  # f(theta_k) in the parameters' precision
        loss0 = loss0 if reference is None else reference
        self.whole.add_(self.correction)
        trial = self.evaluator.trial(self.trial_grad if need_grad else None)
        accept, rho, loss0, trial, pred = self.coordinator.settle(loss0, trial, pred, step_inf)
        if not accept and self.damping and math.isfinite(trial):
            accept, rho, trial, pred = self._damped(loss0, trial, need_grad)
        if accept:
            loss, gradient = trial, self.trial_grad
        else:
            self.whole.scatter(self.theta)
            loss, gradient = loss0, self.gradient_k
            if gradient is None:  # grad f(theta_k) from the local phases' evaluations
                gradient = self.combiner.gradient(self.grad0) if need_grad else self.grad0
        if need_grad:
            glob = self.global_core
            glob.set_gradient(gradient)
            if self.radius_control == "global":  # the papers: the global pass sets Delta
                glob.set_radius(self.radius)
            loss = glob.run(self.evaluator.global_objective(), self.global_iters, loss=loss,
                            agree=self.comm.bcast, loss_only=True)
            if self.radius_control == "global":
                self.radius = glob.radius
        return accept, rho, loss0, trial, pred, loss

    def _damped(self, loss0, trial, need_grad):
        """The damped combination (``damping``): s rejected, try theta_k + s/2 (the radius stays
        as the rejection of s set it).  The slope grad f(theta_k)^T s is accumulated in float64 on
        every rank from the same bits (the coordinator's is used).  Returns (accept, rho, trial
        loss, pred) of the half step; after a rejection theta_k is back and ``trial`` the full
        step's."""
        gradient = self.gradient_k if self.gradient_k is not None else self.combiner.gradient(self.grad0)
        slope = float(gradient.double().dot(self.correction.double()))
        self.correction.mul_(0.5)
        self.whole.scatter(self.theta)
        self.whole.add_(self.correction)
        half = self.evaluator.trial(self.trial_grad if need_grad else None)
        accept, rho, pred, half = self.coordinator.settle_damped(loss0, trial, slope, half)
        self.damped_tried += 1
        self.damped_accepted += accept
        return accept, rho, (half if accept else trial), pred

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
        row = dict(loss=r.loss, final_loss=r.final_loss, radius=r.radius, rho=r.rho,
                   accepted=int(r.accepted), nonfinite=int(not math.isfinite(r.trial_loss)),
                   step_inf=r.step_inf, damped=r.damped,
                   loss_evals=r.local_loss_evals_total + r.global_loss_evals,
                   grad_evals=r.local_grad_evals_total + r.global_grad_evals,
                   seconds_local=r.seconds_local, seconds_local_max=r.seconds_local_max,
                   seconds_comm=r.seconds_comm, seconds_global=r.seconds_global)
        return row if self.params_held is None else dict(row, params_held=self.params_held)

    # -- the model where the ranks hold parts of it (the evaluator knows) -------------------------
    def model_state(self, model, comm):
        return self.evaluator.model_state(model, comm)

    def load_model_state(self, model, state: dict) -> None:
        self.evaluator.load_model_state(model, state)

    def evaluation(self, model, comm):
        return self.evaluator.evaluation(model, comm)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Radius, window, iteration count and every engine's state owned by this rank."""
        return {"radius": self.radius, "iteration": self.iteration, "history": list(self.history),
                "global": self.global_core.state_dict(),
                "local": {str(d): c.state_dict() for d, c in self.local.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.radius = float(state["radius"])
        self.iteration = int(state["iteration"])
        self.history.clear()
        self.history.extend(state["history"])
        self.global_core.load_state_dict(state["global"])
        for d, c in self.local.items():
            c.load_state_dict(state["local"][str(d)])


class _Clock:
    """Wall time of the iteration's stretches, less the time in the collectives of ``comms``."""

    def __init__(self, *comms):
        self.comms, self.start = comms, time.perf_counter()
        self.t, self.in_comm = self.start, self._in_collectives()
        self.wait0, self.comm0 = self._waiting(), self.in_comm

    def _in_collectives(self):
        return sum(c.seconds + c.waiting for c in self.comms)

    def _waiting(self):
        return sum(c.waiting for c in self.comms)

    def lap(self) -> float:
        """Seconds since the last lap, less those in collectives."""
        now, in_comm = time.perf_counter(), self._in_collectives()
        seconds = (now - self.t) - (in_comm - self.in_comm)
        self.t, self.in_comm = now, in_comm
        return seconds

    def finish(self, r: IterationReport) -> None:
        r.seconds_wait = self._waiting() - self.wait0
        r.seconds_comm = self._in_collectives() - self.comm0 - r.seconds_wait
        r.seconds = time.perf_counter() - self.start
