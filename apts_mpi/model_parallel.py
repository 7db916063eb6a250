"""Model-parallel APTS: rank d holds only block d of an ``nn.Sequential`` (docs/method.md,
"Model-parallel APTS").

The same iteration as :class:`~apts_mpi.apts.APTS` with ``decomposition="stages"``, built from
this module's parts: a :class:`PipeEvaluator`, a :class:`PipeCombiner` and a :class:`BlockCore`
for the global pass (:func:`build_parts`; ``APTS(..., model_parallel=True)``).  Subdomain d is subdomain d is
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
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from .comm import Comm
from .decomposition import Subdomain, decompose, stage_bounds
from .errors import InputError
from .iteration.coordinator import Coordinator
from .iteration.evaluator import LocalObjective
from .iteration.local_phase import LocalPhase
from .objective import batch_size, chunks, share
from .pipeline import GRAD, LOSS, Pipe
from .trust_region import TrustRegionCore, engine_configs


class BlockCore(TrustRegionCore):
    """The trust-region engine on a vector split into blocks, one per rank: the norms of the step
    rule are reduced over the ranks (max; sums in rank order, identical on every rank)."""

    def __init__(self, subdomain, config, comm: Comm):
        super().__init__(subdomain, config)
        self.comm = comm

    partial_gradient = True

    def _reduce_norms(self, values):
        parts = self.comm.allgather_object(tuple(values))
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


def build_parts(model, objective, comm: Comm, o: dict, seed=None, example=None) -> SimpleNamespace:
    """The parts of model-parallel APTS on this rank (block ``comm.rank``); the other blocks'
    parameters of ``model`` are released (emptied) here.  ``seed`` and ``example``: no use (the
    stages are cut without drawing or counting)."""
    world, rank = comm.size, comm.rank
    check(model, objective, o, world)
    config, local_config = engine_configs(o)
    bounds = stage_bounds(model, world)
    a, b = bounds[rank], bounds[rank + 1]
    part = decompose(model, world, "stages")[rank]
    sub = Subdomain(part.params, part.pieces)  # this rank's coordinates of every n-vector
    with torch.no_grad():  # release the other blocks
        for i, child in enumerate(model):
            if not a <= i < b:
                for t in list(child.parameters()) + list(child.buffers()):
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    block = model[a:b]
    frozen = copy.deepcopy(block).requires_grad_(False)  # the theta_k copy
    pipe = Pipe(comm, block, frozen, objective)
    glob = BlockCore(sub, config, comm)
    evaluator = PipeEvaluator(model, pipe, sub, Subdomain.whole(list(frozen.parameters())), comm,
                              glob, bounds, micro_batch=o["micro_batch"], local_iters=o["local_iters"])
    return SimpleNamespace(
        config=config, whole=sub, theta=torch.empty(sub.numel, dtype=sub.dtype, device=sub.device),
        subdomains=[sub], offsets=None, slices={rank: (0, sub.numel)},
        local={rank: TrustRegionCore(sub, local_config)}, global_core=glob, group=Comm(None),
        n_subdomains=world, n_shares=world, replicas=1, subdomain_id=rank, gradient_k=None,
        evaluator=evaluator, local_phase=LocalPhase(o["local_iters"], o["local_fraction"]),
        combiner=PipeCombiner(comm),
        coordinator=Coordinator(comm, config, o["acceptance"], o["window"], sub.dtype),
        sub=sub, pipe=pipe, block=block, bounds=bounds)


class PipeEvaluator:
    """f and this block's gradient through the pipe.  Round 0 of a local phase (its ``start``) is
    one pipelined forward and backward at theta_k, which caches the block inputs; each trial of
    the local phase is one probe round (:meth:`Pipe.probe_round`), and a rank whose phase stopped
    keeps serving until ``local_iters`` rounds are done.  ``params_held``: the network's parameter
    scalars materialised on this rank."""

    def __init__(self, model, pipe: Pipe, sub, frozen_sub, comm: Comm, counter, bounds, *,
                 micro_batch, local_iters):
        self.model, self.pipe, self.sub, self.frozen_sub = model, pipe, sub, frozen_sub
        self.comm, self.counter, self.bounds = comm, counter, bounds
        self.micro_batch, self.local_iters = micro_batch, local_iters
        self.params_held = sub.numel
        self.bytes_per_link = (0, 0)

    def begin(self, batch, theta, iteration) -> None:
        """The N shares of the serial emulation, each in micro-batches; theta_k into the copy."""
        n = self.comm.size
        self.B = batch_size(batch)
        self.pieces = [piece for p in range(n) for piece in chunks(share(batch, p, n), self.micro_batch)]
        self.frozen_sub.scatter(theta)
        self.bytes0 = (self.pipe.bytes_down, self.pipe.bytes_up)

    def _full(self, grad_out=None, inputs=None):
        """f over the pieces at the current parameters (the value the serial emulation's shared
        evaluation returns, same type and bits); with ``grad_out`` this block's gradient / B."""
        loss = self.pipe.full_pass(self.pieces, grad_out is not None, inputs)
        if grad_out is None:
            return float(loss) / self.B
        self.sub.gather(grad_out, grad=True)
        grad_out.div_(self.B)
        return loss / self.B

    def start(self):
        return None  # f(theta_k) is every local phase's round 0

    def reference(self):
        return None

    def trial(self, grad_out=None) -> float:
        self.counter.count_evaluation(loss=1, grad=int(grad_out is not None))
        return float(self._full(grad_out))

    @contextmanager
    def local(self, d, core, a, b):
        """This block's local objective: probe rounds; round 0 is ``start``."""
        inputs, rounds = [], [0]

        def start(grad0):
            core.count_evaluation(loss=1, grad=1)
            return float(self._full(grad0, inputs))

        def f_d(grad_out=None):
            rounds[0] += 1
            loss = self.pipe.probe_round(inputs, self.pieces, GRAD if grad_out is not None else LOSS)
            if grad_out is None:
                return float(loss) / self.B
            self.sub.gather(grad_out, grad=True)
            grad_out.div_(self.B)
            return loss / self.B
        yield LocalObjective(f_d, self.B, start)
        for _ in range(self.local_iters - rounds[0]):  # serve the ranks still iterating
            self.pipe.probe_round(inputs, self.pieces, 0)

    def global_objective(self):
        """The global pass's evaluation: NaN where any block's gradient is not finite (the serial
        engine's finiteness test sees the whole gradient; here rank 0's sees its block only)."""
        def evaluate(grad_out=None):
            loss = self._full(grad_out)
            bad = grad_out is not None and not bool(torch.isfinite(grad_out).all())
            if self.comm.sum_scalars([float(bad)])[0]:
                return torch.as_tensor(math.nan, dtype=self.sub.dtype)
            return loss
        return evaluate

    def sync(self) -> None:
        """End of the iteration: running statistics stay per block; the bytes sent per link."""
        self.bytes_per_link = (self.pipe.bytes_down - self.bytes0[0], self.pipe.bytes_up - self.bytes0[1])

    # -- the model outside the iteration ----------------------------------------------------------
    def model_state(self, model, comm):
        """The whole model's state dict on rank 0 (None elsewhere), gathered block by block;
        collective.  Keys and values are those of the model before it was split."""
        a, b = self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]
        mine = {f"{i}.{k}": v for i in range(a, b) for k, v in self.model[i].state_dict().items()}
        parts = self.comm.gather_object(mine, root=0)
        if parts is None:
            return None
        merged = {k: v for part in parts for k, v in part.items()}
        return {k: merged[k] for k in self.model.state_dict()}

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
        return PipelineModule(self.pipe, self.comm), Comm(None)


class PipeCombiner:
    """s: this rank's block correction; pred: the blocks' decreases summed in rank order on the
    coordinator (as the serial emulation sums them); ||s||_inf: the largest over the blocks."""

    def __init__(self, comm: Comm):
        self.comm = comm

    def begin(self, correction) -> None:
        """Before the local phase (it writes all of this block's s)."""

    def collect(self, correction, a, b, offset, weight) -> None:
        correction.copy_(offset)

    def combine(self, correction, delta, loss_evals, grad_evals, broken):
        pred = 0.0
        for v in self.comm.gather_object(delta, root=0) or []:
            pred += v
        loss_evals, grad_evals, broken = self.comm.sum_scalars([loss_evals, grad_evals, broken])
        step_inf = max(self.comm.allgather_object(float(torch.linalg.vector_norm(correction, math.inf))))
        return pred, int(loss_evals), int(grad_evals), broken, step_inf

    def gradient(self, grad0):
        return grad0  # this block's R_d grad f(theta_k), from round 0


class PipelineModule(torch.nn.Module):
    """``forward(x)``: rank 0 applies block 0 to x, each rank passes its output on, the last
    rank's output is broadcast; the same on every rank.  Collective."""

    def __init__(self, pipe: Pipe, comm: Comm):
        super().__init__()
        self.block, self.pipe, self.comm = pipe.block, pipe, comm

    @torch.no_grad()
    def forward(self, x):
        pipe = self.pipe
        if not pipe.first:
            _, (x,) = pipe._recv(pipe.rank - 1, lambda h: [h])
        y = self.block(x)
        if not pipe.last:
            pipe._send(pipe.rank + 1, pipe._spec(y), [y])
        spec = self.comm.bcast_object(pipe._spec(y) if pipe.last else None, root=pipe.size - 1)
        out = y.detach().cpu().contiguous() if pipe.last else \
            torch.empty(spec[0], dtype=getattr(torch, spec[1]))
        self.comm.bcast_(out, root=pipe.size - 1)
        return out.to(y.device)
