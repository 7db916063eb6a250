"""The interface every optimiser the training loop drives implements (:class:`Optimizer`).

An :class:`Optimizer` takes one minibatch per ``step(batch) -> loss`` (a tuple of tensors, see
:mod:`apts_mpi.objective`), describes the iteration it just made in :meth:`Optimizer.record` with
the field names of :data:`RECORD_FIELDS` (NaN or -1 where a method has no such quantity), and
saves and restores its state for checkpoints.  APTS implements it in :mod:`apts_mpi.apts`, the
baselines in :mod:`apts_mpi.optimizers`.  This module imports no other module of the package.
"""
from __future__ import annotations

import io
import math

import torch

# the per-iteration series every optimiser reports (the loop adds "epoch" and "seconds")
RECORD_FIELDS = ("loss", "final_loss", "radius", "rho", "accepted", "nonfinite", "step_inf",
                 "loss_evals", "grad_evals", "seconds_local", "seconds_local_max", "seconds_comm",
                 "seconds_global", "damped")
# damped: 1 where the iterate moved by the damped half step s/2 (APTS ``damping``), 0 where not,
# -1 where the method has no damped combination
RECORD_DEFAULTS = dict(radius=math.nan, rho=math.nan, accepted=-1, nonfinite=0, step_inf=math.nan,
                       damped=-1,
                       seconds_local=math.nan, seconds_local_max=math.nan, seconds_comm=math.nan,
                       seconds_global=math.nan)


def dumps(state) -> bytes:
    """An optimiser state (nested dicts, lists, tensors) as bytes, bit for bit."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def loads(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Optimizer:
    """The interface: ``step``, ``record``, ``state_dict``/``load_state_dict`` and the two
    checkpoint hooks below.  ``radius`` is the trust-region radius (NaN without one);
    ``n_subdomains`` the number of parameter subdomains (None without a decomposition)."""

    n_subdomains = None
    radius = math.nan
    state_per_rank = True  # False: every rank holds the same state; rank 0's is saved

    def step(self, *batch) -> float:
        raise NotImplementedError

    def record(self) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def eval_mode(self) -> None:
        """Before the per-epoch evaluation: put the parameters to evaluate in place (Schedule-Free
        keeps an average apart from the point where it evaluates gradients)."""

    def train_mode(self) -> None:
        """After the evaluation: back to the training parameters."""

    # where the ranks hold parts of the model (model-parallel APTS) these three are overridden
    params_held = None  # parameter scalars materialised on this rank (None: the whole model)

    def model_state(self, model, comm):
        """The model's state dict that rank 0 saves (None on the other ranks); collective."""
        return model.state_dict() if comm.Get_rank() == 0 else None

    def load_model_state(self, model, state: dict) -> None:
        """The model (this rank's part of it) from a saved whole-model state dict."""
        model.load_state_dict(state)

    def evaluation(self, model, comm):
        """(module, Comm) a problem's ``evaluate`` runs on: the model and the ranks' Comm."""
        return model, comm

    def checkpoint_state(self, comm):
        """What rank 0 stores in a checkpoint (None on the other ranks); collective."""
        if not self.state_per_rank:
            return dumps(self.state_dict()) if comm.Get_rank() == 0 else None
        states = comm.gather(self.state_dict(), root=0)
        return None if states is None else {str(r): dumps(s) for r, s in enumerate(states)}

    def load_checkpoint_state(self, saved, rank: int) -> None:
        self.load_state_dict(loads(saved[str(rank)] if self.state_per_rank else saved))


def as_batch(batch: tuple) -> tuple:
    """``step(x, y)`` and ``step((x, y))`` alike: the minibatch as a tuple.  A closure (torch's
    ``step(closure)`` convention) is refused with a TypeError that says how to call ``step``."""
    if len(batch) == 1 and callable(batch[0]) and not isinstance(batch[0], torch.Tensor):
        raise TypeError("step() takes the minibatch, not a closure: call opt.step(x, y) with the "
                        "same minibatch on every rank; the loss is the objective given to the "
                        "constructor, e.g. APTS(model, torch.nn.functional.cross_entropy, comm)")
    return tuple(batch[0]) if len(batch) == 1 and isinstance(batch[0], (tuple, list)) else tuple(batch)
