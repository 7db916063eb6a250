"""Model-parallel APTS: rank d holds only block d of an ``nn.Sequential`` (docs/method.md,
"Model-parallel APTS").

The same method as :class:`~apts_mpi.apts.APTS` with ``decomposition="stages"``: subdomain d is
block d, and its local problem stays f_d(u) = f(theta_k + R_d^T u), the blocks before d at theta_k
(their output, d's block input, computed once), block d at theta_d^k + u, the blocks after d at
theta_k.  One iteration on a minibatch:

1. round 0: one pipelined forward and backward at theta_k (:meth:`Pipe.full_pass`) gives every
   rank f(theta_k) = f_d(0), its block's gradient R_d grad f(theta_k) and its cached block inputs;
2. rounds 1..local_iters (:meth:`Pipe.probe_round`): each rank's trust-region engine runs its
   local phase; every trial evaluation is one round in which the trial activation travels down the
   pipe through the other blocks' theta_k copies; a rank whose phase stopped keeps serving until
   the round count is reached, so every rank takes part in every round;
3. pred = sum of the decreases in rank order (gathered on the coordinator); the trial
   f(theta_k + s) and the global pass are pipelined full passes; rank 0 decides and broadcasts,
   as in APTS.  The global pass's engine reduces its norms over the blocks (:class:`BlockCore`).

The minibatch is cut as the serial emulation with N subdomains cuts it: N shares, each into
``micro_batch`` pieces, and every evaluation (full pass or probe) sends all pieces through the
pipe in that order.  Losses and gradients are summed in the same order as on one process, so the
local phases, f(theta_k) and the trial are bitwise those of the serial emulation (float64, CPU);
the global pass's ||g||_2^2 and ||g||_1 are sums of per-block sums (a different summation order),
so its predicted decrease, hence rho, differs at rounding level.  With ``micro_batch`` the pieces are
pipelined: rank d computes piece m + 1 while rank d + 1 computes piece m (a blocking send returns
once the message is buffered, or once rank d + 1 posts its receive), which shortens the drain of
each pass.  Running batch-norm statistics
are per block, updated by the block's own evaluations (the theta_k copy's are discarded).

Not supported (InputError): a model that is not an ``nn.Sequential``, a decomposition other than
``stages``, ``replicas`` > 1, ``foc`` (its term is zero with whole-batch local phases), a
quasi-Newton ``global_model`` (its products span all blocks) and objectives that differentiate with
respect to the inputs (``sequential_inputs`` False, the PINN).
"""
from __future__ import annotations

import copy
import math
import time
from collections import deque

import torch
from mpi4py import MPI

from . import options
from .apts import APTS, IterationReport
from .comm import Comm
from .decomposition import Subdomain, decompose, stage_bounds
from .errors import InputError
from .objective import as_objective, batch_size
from .launch import join
from .optimizers import as_batch
from .pipeline import GRAD, LOSS, Pipe
from .trust_region import TrustRegionConfig, TrustRegionCore


class BlockCore(TrustRegionCore):
    """The trust-region engine on a vector split into blocks, one per rank: the norms of the step
    rule are reduced over the ranks (max; sums in rank order, identical on every rank)."""

    def __init__(self, subdomain, config, comm):
        super().__init__(subdomain, config)
        self.comm = comm

    partial_gradient = True

    def _reduce_norms(self, values):
        parts = self.comm.allgather(tuple(values))
        total_2sq = total_1 = 0.0
        for _, a, b in parts:
            total_2sq += a
            total_1 += b
        return [max(p[0] for p in parts), total_2sq, total_1]


def check(model, objective, o: dict, world: int) -> None:
    """InputError for a combination model-parallel APTS cannot run, naming it."""
    if o["decomposition"] != "stages":
        raise InputError(f"model_parallel needs decomposition 'stages'; got {o['decomposition']!r}")
    for key, bad, why in (("replicas", o["replicas"] > 1, "one rank per block"),
                          ("foc", o["foc"], "its term is zero: a local phase sees the whole batch"),
                          ("global_model", o["global_model"] != "first-order",
                           "a quasi-Newton global model spans all blocks"),
                          ("autocast", o["autocast"] != "none", "not built for the pipe"),
                          ("local_batch", o["local_batch"] != 1, "not built for the pipe"),
                          ("space", o["space"] != "parameters", "the blocks are the subdomains"),
                          ("local_decisions", o["local_decisions"] != "host",
                           "every probe round is a pipelined exchange")):
        if bad:
            raise InputError(f"model_parallel does not support {key}={o[key]!r} ({why})")
    if not isinstance(model, torch.nn.Sequential):
        raise InputError(f"model_parallel needs an nn.Sequential; got a {type(model).__name__}")
    if not objective.sequential_inputs:
        raise InputError("model_parallel needs an objective that sees the model only through "
                         "model(inputs) (sequential_inputs); this one differentiates with respect "
                         "to its inputs")
    if o["subdomains"] is not None and o["subdomains"] != world:
        raise InputError(f"model_parallel places one block per rank: subdomains={o['subdomains']} "
                         f"needs {o['subdomains']} ranks; the world has {world}")


class ModelParallelAPTS(APTS):
    """APTS with block d of the model on rank d only; ``APTS(..., decomposition="stages",
    model_parallel=True)`` makes one.  ``params_held``: the network's parameter scalars materialised
    on this rank (its block; the theta_k copy and the engine's vectors are of the block's size too).

    The other blocks' parameters of the ``model`` passed in are released (emptied) on this rank;
    :meth:`model_state` gathers the whole state dict on rank 0 and :meth:`evaluation` gives a
    module whose forward runs the pipe (every rank calls it with the same inputs).
    """

    def __init__(self, model, objective, comm=None, *, seed=0, example=None, **keywords):
        o = options.resolve("apts", keywords)  # seed and example: no use here (stages, no drawing)
        join(model, comm)  # launch check; rank 0's whole model on every rank, before blocks are cut
        self.model, self.objective = model, as_objective(objective)
        self.comm = Comm(comm)
        world, rank = self.comm.size, self.comm.rank
        check(model, self.objective, o, world)
        self.replicas, self.n_subdomains = 1, world
        self.local_iters, self.global_iters, self.window = o["local_iters"], o["global_iters"], o["window"]
        self.local_fraction, self.acceptance, self.foc = o["local_fraction"], o["acceptance"], False
        self.micro_batch = o["micro_batch"]
        base = {k: o[k] for k in options.options("trust-region") if k != "model"}
        self.config = TrustRegionConfig(model=o["global_model"], **base)
        local_config = TrustRegionConfig(model=o["local_model"], **base)
        self.radius = self.config.radius

        self.bounds = stage_bounds(model, world)
        a, b = self.bounds[rank], self.bounds[rank + 1]
        self.block = model[a:b]
        part = decompose(model, world, "stages")[rank]
        self.sub = Subdomain(part.params, part.pieces)
        self.whole = self.sub  # this rank's coordinates of every n-vector
        self.params_held = self.sub.numel
        with torch.no_grad():  # release the other blocks
            for i, child in enumerate(model):
                if not a <= i < b:
                    for t in list(child.parameters()) + list(child.buffers()):
                        t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        self.frozen = copy.deepcopy(self.block).requires_grad_(False)  # the theta_k copy
        self.frozen_sub = Subdomain.whole([p for p in self.frozen.parameters()])
        self.pipe = Pipe(self.comm.comm, self.block, self.frozen, self.objective)

        self.subdomain_id = rank
        self.local = {rank: TrustRegionCore(self.sub, local_config)}
        self.global_core = BlockCore(self.sub, self.config, self.comm.comm)
        self.n_shares = world
        kw = dict(dtype=self.sub.dtype, device=self.sub.device)
        m = self.sub.numel
        self.theta = torch.empty(m, **kw)
        self.correction = torch.zeros(m, **kw)
        self.trial_grad = torch.empty(m, **kw) if self.global_iters else None
        self.grad0 = torch.zeros(m, **kw)
        self.history = deque(maxlen=self.window)
        self.report = IterationReport()
        self.iteration = 0

    # -- evaluations ------------------------------------------------------------------------------
    def _full(self, pieces, B, grad_out=None, inputs=None):
        """f over the pieces at the current parameters (the value the serial emulation's shared
        evaluation returns, same type and bits); with ``grad_out`` this block's gradient / B."""
        loss = self.pipe.full_pass(pieces, grad_out is not None, inputs)
        if grad_out is None:
            return float(loss) / B
        self.sub.gather(grad_out, grad=True)
        grad_out.div_(B)
        return loss / B

    def _checked(self, pieces, B):
        """The global pass's evaluation: NaN where any block's gradient is not finite (the serial
        engine's finiteness test sees the whole gradient; here rank 0's sees its block only)."""
        def evaluate(grad_out=None):
            loss = self._full(pieces, B, grad_out)
            bad = grad_out is not None and not bool(torch.isfinite(grad_out).all())
            if self.comm.sum_scalars([float(bad)])[0]:
                return torch.as_tensor(math.nan, dtype=self.sub.dtype)
            return loss
        return evaluate

    def _local_phase(self, core, inputs, pieces, B, loss0):
        """Rounds 1..local_iters: this rank's local solve; returns delta_d."""
        rounds = 0

        def f_d(grad_out=None):
            nonlocal rounds
            rounds += 1
            loss = self.pipe.probe_round(inputs, pieces, GRAD if grad_out is not None else LOSS)
            if grad_out is None:
                return float(loss) / B
            self.sub.gather(grad_out, grad=True)
            grad_out.div_(B)
            return loss / B

        core.set_gradient(self.grad0)
        core.set_radius(self.local_fraction * self.radius)
        loss = core.run(f_d, self.local_iters, loss=loss0, box=self.local_fraction * self.radius,
                        loss_only=True)
        for _ in range(self.local_iters - rounds):  # serve the ranks still iterating
            self.pipe.probe_round(inputs, pieces, 0)
        self.correction.copy_(core.offset)
        self.sub.scatter(self.theta)
        return max(loss0 - loss, 0.0)

    # -- the iteration ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, *batch) -> float:
        """One APTS iteration on the minibatch (the same on every rank); returns the new loss."""
        batch = as_batch(batch)
        t_start = time.perf_counter()
        comm, core, glob = self.comm, self.local[self.comm.rank], self.global_core
        r = IterationReport()
        bytes0 = (self.pipe.bytes_down, self.pipe.bytes_up)
        before = (core.counters.loss_evals, core.counters.grad_evals)
        global_before = self._global_counts()
        B, pieces = batch_size(batch), self._pieces(batch, range(self.n_shares))
        self.sub.gather(self.theta)
        self.frozen_sub.scatter(self.theta)

        # 1. round 0: f(theta_k), R_d grad f(theta_k) and the cached block inputs
        t0 = time.perf_counter()
        inputs = []
        loss0 = float(self._full(pieces, B, self.grad0, inputs))
        core.count_evaluation(loss=1, grad=1)
        broken = not math.isfinite(loss0)  # the same on every rank (broadcast)
        delta = 0.0 if broken else self._local_phase(core, inputs, pieces, B, loss0)
        del inputs
        r.local_loss_evals = core.counters.loss_evals - before[0]
        r.local_grad_evals = core.counters.grad_evals - before[1]
        r.seconds_local = r.seconds_local_max = time.perf_counter() - t0

        # 2. combination: pred summed in rank order on the coordinator
        deltas = comm.comm.gather(delta, root=0)
        pred = 0.0
        for v in deltas or []:
            pred += v
        local_loss_evals, local_grad_evals = comm.sum_scalars([r.local_loss_evals, r.local_grad_evals])
        r.local_loss_evals_total, r.local_grad_evals_total = int(local_loss_evals), int(local_grad_evals)
        r.step_inf = comm.comm.allreduce(float(torch.linalg.vector_norm(self.correction, math.inf)),
                                         op=MPI.MAX)

        # 3. acceptance and global pass
        t0 = time.perf_counter()
        need_grad = self.global_iters > 0
        if broken:
            loss0 = trial = loss = rho = math.nan
            accept = False
        else:
            self.sub.add_(self.correction)
            trial = float(self._full(pieces, B, self.trial_grad if need_grad else None))
            glob.count_evaluation(loss=1, grad=int(need_grad))
            accept, rho, loss0, trial, pred, loss, gradient = self._settle(loss0, trial, pred,
                                                                           self.grad0)
        if self.global_iters and not broken:
            glob.set_gradient(gradient)
            glob.set_radius(self.radius)
            loss = glob.run(self._checked(pieces, B), self.global_iters, loss=loss, agree=comm.bcast,
                            loss_only=True)
            self.radius = glob.radius
        r.seconds_global = time.perf_counter() - t0

        self._report_outcome(r, global_before, loss0, trial, loss, pred, rho, accept)
        r.seconds = time.perf_counter() - t_start
        self.bytes_per_link = (self.pipe.bytes_down - bytes0[0], self.pipe.bytes_up - bytes0[1])
        self.report = r
        self.iteration += 1
        return loss

    def record(self) -> dict:
        return dict(super().record(), params_held=self.params_held)

    # -- the model outside the iteration ----------------------------------------------------------
    def model_state(self, model, comm):
        """The whole model's state dict on rank 0 (None elsewhere), gathered block by block;
        collective.  Keys and values are those of the model before it was split."""
        a, b = self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]
        mine = {f"{i}.{k}": v for i in range(a, b) for k, v in self.model[i].state_dict().items()}
        parts = self.comm.comm.gather(mine, root=0)
        if parts is None:
            return None
        keys = list(self.model.state_dict())
        merged = {k: v for part in parts for k, v in part.items()}
        return {k: merged[k] for k in keys}

    def load_model_state(self, model, state: dict) -> None:
        """This rank's block from a whole model's state dict (as :meth:`model_state` returns)."""
        a, b = self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]
        for i in range(a, b):
            prefix = f"{i}."
            self.model[i].load_state_dict({k[len(prefix):]: v for k, v in state.items()
                                           if k.startswith(prefix)})

    def evaluation(self, model, comm):
        """A module whose forward runs the pipe, with a one-rank Comm: every rank evaluates every
        sample (the same inputs on every rank) and gets the last block's output (broadcast)."""
        return PipelineModule(self), Comm(None)


class PipelineModule(torch.nn.Module):
    """``forward(x)``: rank 0 applies block 0 to x, each rank passes its output on, the last
    rank's output is broadcast; the same on every rank.  Collective."""

    def __init__(self, optimizer: ModelParallelAPTS):
        super().__init__()
        self.block = optimizer.block
        self.pipe = optimizer.pipe
        self.comm = optimizer.comm.comm

    @torch.no_grad()
    def forward(self, x):
        pipe = self.pipe
        if not pipe.first:
            _, (x,) = pipe._recv(pipe.rank - 1, lambda h: [h])
        y = self.block(x)
        if not pipe.last:
            pipe._send(pipe.rank + 1, pipe._spec(y), [y])
        spec = self.comm.bcast(pipe._spec(y) if pipe.last else None, root=pipe.size - 1)
        out = y.detach().cpu().contiguous() if pipe.last else \
            torch.empty(spec[0], dtype=getattr(torch, spec[1]))
        self.comm.Bcast(out.numpy(), root=pipe.size - 1)
        return out.to(y.device)
