"""The objective an optimiser minimises on one minibatch, and how it is cut into parts.

A minibatch is a tuple of tensors that share their first (sample) dimension, e.g. ``(x, y)`` for
classification.  An :class:`Objective` maps a model and a *part* of a minibatch (the same tuple,
sliced along the samples) to the **sum** of the per-sample terms of that part, so that for a
minibatch of B samples cut into parts in any way

    f(theta) = (1 / B) * sum over the parts of objective(model, part)

(docs/method.md, section 1).  Every optimiser evaluates f this way: each rank takes a share of the
samples, a share may be cut into micro-batches, and the partial sums are added, then divided by B.
A term that is not a plain mean over samples (a PINN's two means over interior and boundary
points) puts its weights into the batch, so that the contract holds for every cut.

``sequential_inputs`` says that the model enters the objective only through ``model(part[0])``:
an optimiser may then replace ``model`` by the tail of an ``nn.Sequential`` and ``part[0]`` by the
output of its head, computed once (APTS does so for the layers a local phase keeps frozen).
An objective that differentiates the model with respect to its inputs (a PINN) sets it to False.
"""
from __future__ import annotations

import torch


class Objective:
    """``objective(model, part) -> 0-dim tensor``: the sum of the per-sample terms of ``part``.

    Called with gradients enabled (the result is then differentiated with respect to the model's
    parameters) or under ``torch.no_grad()`` (a loss-only evaluation); an objective that needs
    derivatives with respect to its inputs enables them itself.
    """

    sequential_inputs = False

    def __call__(self, model: torch.nn.Module, part: tuple) -> torch.Tensor:
        raise NotImplementedError


class SampleLoss(Objective):
    """The mean of ``loss_fn(model(x), y)`` over samples, as a sum: ``loss_fn(model(x), y) * len(y)``.

    ``loss_fn`` is a mean over samples such as ``torch.nn.functional.cross_entropy``; a model output
    of shape (samples, tokens, classes) with targets (samples, tokens) (a language model) is
    flattened first: a sample's term is then the mean loss over its tokens (all samples have the
    same number of tokens).
    """

    sequential_inputs = True

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn

    def __call__(self, model, part):
        x, y = part[0], part[1]
        out = model(x)
        if y.dim() > 1 and out.dim() == y.dim() + 1:  # (samples, tokens) class targets: every token
            return self.loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1)) * len(y)
        return self.loss_fn(out, y) * len(y)


def as_objective(objective_or_loss_fn) -> Objective:
    """An :class:`Objective` as it is, or a mean loss ``loss_fn(output, target)`` wrapped in SampleLoss."""
    if isinstance(objective_or_loss_fn, Objective):
        return objective_or_loss_fn
    if not callable(objective_or_loss_fn):
        raise TypeError(f"expected an Objective or a loss function, got {objective_or_loss_fn!r}")
    return SampleLoss(objective_or_loss_fn)


def batch_size(batch: tuple) -> int:
    """The number of samples B of a minibatch (the length of its first tensor)."""
    return len(batch[0])


def share(batch: tuple, rank: int, size: int) -> tuple:
    """The contiguous share of the samples of ``batch`` that rank ``rank`` of ``size`` evaluates."""
    n = batch_size(batch)
    cut = slice(n * rank // size, n * (rank + 1) // size)
    return tuple(t[cut] for t in batch)


def chunks(part: tuple, size: int | None):
    """``part`` cut into consecutive micro-batches of at most ``size`` samples (all of it if None)."""
    n = batch_size(part)
    step = size or max(n, 1)
    for start in range(0, n, step):
        yield tuple(t[start:start + step] for t in part)
