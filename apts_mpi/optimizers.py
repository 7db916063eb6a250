"""The optimisers the training loop drives, behind the interface of :mod:`apts_mpi.optimizer`.

APTS is :mod:`apts_mpi.apts`; the baselines (``sgd``, ``adam``, ``adamw``, ``schedulefree``, ``lbfgs``, ``adam-lbfgs``, ``tr``) are :class:`DataParallel`: each rank evaluates
its share of the minibatch and one Allreduce of a flat [gradient | loss] buffer sums them, so
every method uses the same ranks.  ``adam-apts`` (:class:`AdamThenAPTS`) is the PINN schedule with
APTS in place of L-BFGS.  :func:`build_optimizer` makes the one a config names.
"""
from __future__ import annotations

import math

import torch

from . import options
from .apts import APTS
from .comm import BufferSync, Comm
from .decomposition import Subdomain
from .launch import join
from .objective import as_objective, batch_size, share
from .optimizer import RECORD_DEFAULTS, RECORD_FIELDS, Optimizer, as_batch, dumps, loads  # noqa: F401
from .trust_region import TrustRegion


class DataParallel(Optimizer):
    """A torch optimiser stepped on the ranks' shares of a minibatch, gradients summed by Allreduce.

    ``shares``: on one process, evaluate the minibatch in this many shares, summed in rank order, as
    a run on that many ranks sums them (the serial emulation of an N-rank run, as APTS's)."""

    state_per_rank = False

    def __init__(self, model, objective, optimizer, comm: Comm, shares: int = 1):
        self.model, self.objective, self.optimizer, self.comm = model, as_objective(objective), optimizer, comm
        self.shares = list(range(shares)) if comm.size == 1 else [comm.rank]
        self.n_shares = shares if comm.size == 1 else comm.size
        join(model, comm)  # launch check; rank 0's parameters and buffers on every rank (as DDP)
        self.sync_buffers = BufferSync(model, comm)  # batch-norm statistics
        self.whole = Subdomain.whole([p for p in model.parameters() if p.requires_grad])
        self.buffer = torch.empty(self.whole.numel + 1, dtype=self.whole.dtype, device=self.whole.device)
        self.evals = 0
        self.last = {}
        counters = getattr(optimizer, "counters", None)
        self.radius = counters.radius if counters is not None else math.nan

    def closure(self, *batch):
        batch = as_batch(batch)
        B = batch_size(batch)
        parts = [share(batch, p, self.n_shares) for p in self.shares]

        def closure():
            self.optimizer.zero_grad(set_to_none=False)
            loss = 0
            for part in parts:  # gradients accumulate over the shares
                term = self.objective(self.model, part)
                term.backward()
                loss = loss + term.detach()
            n = self.whole.numel
            self.whole.gather(self.buffer[:n], grad=True)
            self.buffer[n] = loss
            self.comm.allreduce_(self.buffer)
            self.buffer.div_(B)
            self.whole.scatter(self.buffer[:n], grad=True)
            self.evals += 1
            return self.buffer[n].clone()
        return closure

    def step(self, *batch):
        before = self.evals
        counters = getattr(self.optimizer, "counters", None)
        accepted, nonfinite = (counters.accepted, counters.nonfinite) if counters else (0, 0)
        loss = float(self.optimizer.step(self.closure(*as_batch(batch))))
        _restart_stalled_lbfgs(self.optimizer)
        self.sync_buffers()
        evals = self.evals - before
        self.last = dict(RECORD_DEFAULTS, loss=loss, final_loss=loss, loss_evals=evals, grad_evals=evals)
        if counters:  # the trust-region baseline
            c = self.optimizer.counters
            self.radius = c.radius
            self.last.update(radius=c.radius, rho=c.rho, accepted=int(c.accepted > accepted),
                             nonfinite=c.nonfinite - nonfinite)
        return loss

    def record(self):
        return dict(self.last)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state)

    def eval_mode(self):
        getattr(self.optimizer, "eval", lambda: None)()

    def train_mode(self):
        getattr(self.optimizer, "train", lambda: None)()


def _restart_stalled_lbfgs(optimizer):
    """torch's L-BFGS keeps its curvature pairs across minibatches; when the strong-Wolfe search
    finds no step (t = 0) no pair is added, the stale direction stays an ascent direction for every
    later batch and the run stalls for good: restart the memory."""
    if isinstance(optimizer, AdamThenLBFGS):
        optimizer = optimizer.current
    if isinstance(optimizer, torch.optim.LBFGS):
        state = optimizer.state[optimizer._params[0]]
        if float(state.get("t", 1.0)) == 0.0:
            state.clear()


class AdamThenLBFGS:
    """The usual schedule for physics-informed networks: ``adam_steps`` steps of Adam, then L-BFGS
    (strong-Wolfe line search) from where Adam ended.  ``step(closure)``; ``state_dict`` holds the
    step count and both optimisers' states."""

    def __init__(self, params, lr, adam_steps, history_size, max_iter, **tolerances):
        params = list(params)
        self.adam = torch.optim.Adam(params, lr=lr)
        self.lbfgs = _lbfgs(params, history_size=history_size, max_iter=max_iter, **tolerances)
        self.adam_steps, self.steps = adam_steps, 0

    @property
    def current(self):
        return self.adam if self.steps < self.adam_steps else self.lbfgs

    def zero_grad(self, set_to_none=True):
        self.current.zero_grad(set_to_none=set_to_none)

    def step(self, closure):
        optimizer = self.current
        self.steps += 1
        return optimizer.step(closure)

    def state_dict(self):
        return {"steps": self.steps, "adam": self.adam.state_dict(), "lbfgs": self.lbfgs.state_dict()}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.adam.load_state_dict(state["adam"])
        self.lbfgs.load_state_dict(state["lbfgs"])


class AdamThenAPTS(Optimizer):
    """``adam_steps`` data-parallel Adam steps, then APTS from where Adam ended: the usual PINN
    schedule (``adam-lbfgs``) with APTS as its second stage.  APTS reads theta_k from the model at
    every step, so it starts from Adam's last iterate with its own initial radius."""

    state_per_rank = True  # APTS's local engines live on the ranks that own them

    def __init__(self, model, objective, comm, *, lr, adam_steps, seed=0, example=None, **keywords):
        self.apts = APTS(model, objective, comm, seed=seed, example=example, **keywords)
        # on one process the Adam steps sum the shares of the N-rank run too (its serial emulation)
        self.adam = DataParallel(model, objective, torch.optim.Adam(model.parameters(), lr=lr),
                                 Comm(comm), shares=self.apts.n_shares)
        self.n_subdomains = self.apts.n_subdomains
        self.adam_steps, self.steps = adam_steps, 0

    @property
    def stepped(self) -> Optimizer:
        """The stage that took the last step (Adam before any)."""
        return self.adam if self.steps <= self.adam_steps else self.apts

    @property
    def radius(self):
        return self.apts.radius if self.stepped is self.apts else math.nan

    def step(self, *batch):
        self.steps += 1
        return self.stepped.step(*batch)

    def record(self):
        return self.stepped.record()

    def state_dict(self):
        return {"steps": self.steps, "adam": self.adam.state_dict(), "apts": self.apts.state_dict()}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])
        self.adam.load_state_dict(state["adam"])
        self.apts.load_state_dict(state["apts"])


def _lbfgs(params, tolerance_grad=None, tolerance_change=None, **kw):
    """torch's L-BFGS with the strong-Wolfe line search; a tolerance left null keeps torch's."""
    given = {k: v for k, v in (("tolerance_grad", tolerance_grad),
                               ("tolerance_change", tolerance_change)) if v is not None}
    return torch.optim.LBFGS(params, line_search_fn="strong_wolfe", **kw, **given)


def _schedulefree(params, comm, **kw):
    import schedulefree
    optimizer = schedulefree.AdamWScheduleFree(params, **kw)
    optimizer.train()
    return optimizer


def _tr(params, comm, **kw):
    """The trust-region baseline: its decisions are rank 0's (one Bcast), never values each rank
    reduced on its own (MPI does not promise bitwise identical Allreduce results everywhere)."""
    return TrustRegion(params, agree=comm.bcast if comm.size > 1 else None, **kw)


# method -> the torch optimiser a DataParallel wraps, from the parameters and the method's keywords
BASELINES = {
    "tr": _tr,
    "sgd": lambda params, comm, **kw: torch.optim.SGD(params, **kw),
    "adam": lambda params, comm, **kw: torch.optim.Adam(params, **kw),
    "adamw": lambda params, comm, **kw: torch.optim.AdamW(params, **kw),
    "schedulefree": _schedulefree,
    "lbfgs": lambda params, comm, **kw: _lbfgs(params, **kw),
    "adam-lbfgs": lambda params, comm, **kw: AdamThenLBFGS(params, **kw),
}


def build_optimizer(cfg: dict, model, objective, comm, example=None) -> Optimizer:
    """The optimiser of ``cfg['optimizer']`` for ``model``: APTS itself, or a data-parallel baseline.

    ``cfg`` needs ``optimizer`` (``method`` and keywords, checked by :mod:`apts_mpi.options`) and
    ``seed``.  ``example`` (a model input of a few samples) lets APTS's ``cost`` decomposition count
    FLOPs.  Raises ValueError for keywords that cannot run.
    """
    keywords = dict(cfg["optimizer"])
    method = keywords.pop("method")
    if method not in ("apts", "tr"):  # APTS and TrustRegion check their keywords themselves
        keywords = options.resolve(method, keywords)
    if method == "apts":
        return APTS(model, objective, comm, seed=cfg["seed"], example=example, **keywords)
    if method == "adam-apts":
        return AdamThenAPTS(model, objective, comm, seed=cfg["seed"], example=example, **keywords)
    if method not in BASELINES:
        raise ValueError(f"method must be one of {', '.join(options.TRAINABLE)}; got {method!r}")
    world = Comm(comm)
    return DataParallel(model, objective, BASELINES[method](model.parameters(), world, **keywords), world)
