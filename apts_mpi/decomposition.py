"""Parameter decomposition: subdomains as lists of (tensor, slice) pieces of a model.

A :class:`Subdomain` is R_d of docs/method.md section 2, never formed as a matrix: it gathers the
coordinates it owns from the parameters (or their gradients) into a flat vector and writes a flat
vector back.  :func:`decompose` implements the three strategies:

``random-tensors``
    every parameter tensor is one unit; one seeded random permutation of the tensors is cut into N
    runs of nearly equal tensor count (the authors' code).
``balanced`` (default)
    whole tensors in model order cut into N contiguous runs whose largest parameter count is as small
    as possible (an exact min-max linear partition).  Where N does not exceed the number of modules
    that own parameters, a module's tensors (a layer's weight and bias) form one unit and stay
    together; otherwise every tensor is a unit.
``flat``
    the flattened parameter vector cut into N contiguous chunks of sizes differing by at most one,
    splitting tensors where needed; any N <= n.
``stages``
    an ``nn.Sequential`` cut between top-level children into N blocks (pipeline stages; one
    activation tensor crosses each cut), balanced by parameter count (an exact min-max partition);
    a child without parameters joins the next child that has some (trailing ones the last block).
    :func:`stage_bounds` gives the children of each block; model-parallel APTS places block d on
    rank d.
``cost``
    the units of ``balanced`` cut into N contiguous runs whose largest *local-evaluation cost*
    (:func:`evaluation_costs`) is as small as possible (the same exact min-max partition): the
    critical path of the local phases, not the parameter count, is balanced.

Every strategy is deterministic given the seed and identical on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .options import DECOMPOSITIONS

STRATEGIES = DECOMPOSITIONS


@dataclass(frozen=True)
class Piece:
    """Coordinates ``start:stop`` of the flattened parameter ``index``."""

    index: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class Subdomain:
    """The coordinates I_d of a list of parameters, as ordered pieces; flat vector of length ``numel``."""

    def __init__(self, params, pieces):
        self.params = list(params)
        self.pieces = list(pieces)
        if not self.pieces:
            raise ValueError("a subdomain needs at least one piece")
        self.numel = sum(p.numel for p in self.pieces)
        first = self.params[self.pieces[0].index]
        self.dtype, self.device = first.dtype, first.device
        for p in self.pieces:
            t = self.params[p.index]
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError("all parameters of a subdomain must share one dtype and device; "
                                 f"found {self.dtype}/{self.device} and {t.dtype}/{t.device}")
        self.sizes = [p.numel for p in self.pieces]  # the split of a flat vector into pieces

    @classmethod
    def whole(cls, params):
        params = list(params)
        return cls(params, [Piece(i, 0, t.numel()) for i, t in enumerate(params)])

    def _views(self, grad: bool):
        for p in self.pieces:
            t = self.params[p.index]
            if grad:
                if t.grad is None:
                    t.grad = torch.zeros_like(t)
                t = t.grad
            yield t.view(-1)[p.start:p.stop]

    # One fused operation over all pieces (torch.cat, the _foreach kernels torch.optim uses), not
    # one per piece: the same element-wise copies and sums, bitwise, in one or a few kernel
    # launches on a GPU (a ResNet-18 subdomain has dozens of tensors).
    @torch.no_grad()
    def gather(self, out: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """out <- R_d theta (or R_d of the gradient); returns ``out``."""
        torch.cat(list(self._views(grad)), out=out[:self.numel])
        return out

    @torch.no_grad()
    def scatter(self, vec: torch.Tensor, grad: bool = False) -> None:
        """theta[I_d] <- vec (or its gradient), exactly (bitwise)."""
        torch._foreach_copy_(list(self._views(grad)), self._split(vec))

    @torch.no_grad()
    def add_(self, vec: torch.Tensor, alpha: float = 1.0) -> None:
        """theta[I_d] += alpha * vec."""
        torch._foreach_add_(list(self._views(False)), self._split(vec), alpha=alpha)

    def _split(self, vec):
        return list(torch.split(vec[:self.numel], self.sizes))


def _units(model: torch.nn.Module, params, by_module: bool):
    """Lists of parameter indices that must stay together."""
    if not by_module:
        return [[i] for i in range(len(params))]
    ids = {id(p): i for i, p in enumerate(params)}
    units = []
    for m in model.modules():
        own = [ids[id(p)] for p in m.parameters(recurse=False) if id(p) in ids]
        if own:
            units.append(sorted(own))
    return sorted(units)


def _min_max_partition(sizes, n_parts, run_cost=None):
    """Cut ``sizes`` into ``n_parts`` contiguous non-empty runs minimising the largest run sum
    (or the largest ``run_cost(i, j)`` of the run of units i..j-1, when given).

    Exact dynamic programme; returns the cut points (len n_parts + 1).
    """
    k = len(sizes)
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    if run_cost is None:
        def run_cost(i, j):
            return prefix[j] - prefix[i]
    inf = float("inf")
    best = np.full((n_parts + 1, k + 1), inf)
    cut = np.zeros((n_parts + 1, k + 1), dtype=int)
    best[0, 0] = 0.0
    for p in range(1, n_parts + 1):
        for j in range(p, k - (n_parts - p) + 1):
            for i in range(p - 1, j):
                cost = max(best[p - 1, i], run_cost(i, j))
                if cost < best[p, j]:
                    best[p, j], cut[p, j] = cost, i
    cuts, j = [k], k
    for p in range(n_parts, 0, -1):
        j = cut[p, j]
        cuts.append(j)
    return cuts[::-1]


def stage_bounds(model: torch.nn.Module, n_stages: int) -> list[int]:
    """Child indices 0 = c_0 < c_1 < ... < c_N = len(model): block d is ``model[c_d:c_{d+1}]``.

    Raises InputError when ``model`` is not an ``nn.Sequential`` or has fewer than ``n_stages``
    top-level children with trainable parameters.
    """
    if not isinstance(model, torch.nn.Sequential):
        raise InputError(f"decomposition 'stages' cuts an nn.Sequential between its top-level "
                         f"children; got a {type(model).__name__}")
    sizes = [sum(p.numel() for p in child.parameters() if p.requires_grad) for child in model]
    holders = [i for i, n in enumerate(sizes) if n]
    if len(holders) < n_stages:
        raise InputError(f"decomposition 'stages' needs at least {n_stages} top-level children with "
                         f"parameters for {n_stages} blocks; this nn.Sequential has {len(holders)}")
    # unit u: the children after the previous holder up to and including holder u
    ends = [i + 1 for i in holders]
    ends[-1] = len(model)
    cuts = _min_max_partition([sizes[i] for i in holders], n_stages)
    return [0] + [ends[c - 1] for c in cuts[1:]]


def decompose(model: torch.nn.Module, n_subdomains: int, strategy: str = "balanced",
              seed: int = 0, example=None, prefix_cached: bool = True) -> list[Subdomain]:
    """Split the trainable parameters of ``model`` into ``n_subdomains`` disjoint subdomains.

    ``example`` and ``prefix_cached`` are the ``cost`` strategy's (see :func:`evaluation_costs`).
    Raises InputError (a ValueError) for an unknown strategy or more subdomains than the strategy
    has units.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if strategy not in STRATEGIES:
        raise InputError(f"decomposition must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if not isinstance(n_subdomains, int) or n_subdomains < 1:
        raise InputError(f"subdomains must be a positive integer; got {n_subdomains!r}")
    if strategy == "stages":
        bounds, index = stage_bounds(model, n_subdomains), {id(p): i for i, p in enumerate(params)}
        return [Subdomain(params, [Piece(index[id(p)], 0, p.numel()) for child in model[a:b]
                                   for p in child.parameters() if p.requires_grad])
                for a, b in zip(bounds[:-1], bounds[1:])]
    n = sum(p.numel() for p in params)
    limit = n if strategy == "flat" else len(params)
    if n_subdomains > limit:
        unit = "parameters" if strategy == "flat" else "parameter tensors"
        raise InputError(f"subdomains={n_subdomains} exceeds the {limit} {unit} that decomposition "
                         f"{strategy!r} can split this model into")
    if strategy == "flat":
        bounds = [round(d * n / n_subdomains) for d in range(n_subdomains + 1)]
        starts = np.cumsum([0] + [p.numel() for p in params]).tolist()
        subdomains = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            pieces = [Piece(i, max(a, s) - s, min(b, e) - s)
                      for i, (s, e) in enumerate(zip(starts[:-1], starts[1:])) if max(a, s) < min(b, e)]
            subdomains.append(Subdomain(params, pieces))
        return subdomains
    if strategy == "random-tensors":
        g = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(len(params), generator=g).tolist()
        groups = [sorted(run.tolist()) for run in np.array_split(np.array(order), n_subdomains)]
    else:
        modules = _units(model, params, by_module=True)
        units = modules if n_subdomains <= len(modules) else _units(model, params, by_module=False)
        sizes = [sum(params[i].numel() for i in u) for u in units]
        run_cost = None
        if strategy == "cost":
            flops = _unit_flops(model, params, units, example)
            run_cost = _CostModel(flops, prefix_cached).run
        cuts = _min_max_partition(sizes, n_subdomains, run_cost)
        groups = [sorted(i for u in units[a:b] for i in u) for a, b in zip(cuts[:-1], cuts[1:])]
    return [Subdomain(params, [Piece(i, 0, params[i].numel()) for i in grp]) for grp in groups]


# -- the cost of a local evaluation (the ``cost`` strategy) -----------------------------------------
def _unit_flops(model, params, units, example=None) -> list[float]:
    """Forward floating-point operations of each unit (a list of parameter indices, in model order).

    With ``example`` (a model input, e.g. a few samples): counted by
    ``torch.utils.flop_counter.FlopCounterMode`` during one forward pass in eval mode (running
    statistics untouched), per module that owns the
    unit's parameters (its own operations, not those of parameter-owning modules inside it).
    Without: the unit's parameter count in tensors of two or more dimensions, the multiply-adds per
    row of a linear layer (exact in proportion for fully connected and transformer networks, whose
    layers see the same number of rows; a convolution's spatial factor and an embedding's lookup are
    not seen: pass ``example`` for those).  Deterministic, so identical on every rank.
    """
    if example is None:
        return [float(sum(params[i].numel() for i in u if params[i].dim() >= 2)) for u in units]
    from torch.utils.flop_counter import FlopCounterMode
    ids = {id(p): i for i, p in enumerate(params)}
    owner = {}  # module -> the unit its own parameters belong to
    unit_of = {i: k for k, u in enumerate(units) for i in u}
    for m in model.modules():
        own = [ids[id(p)] for p in m.parameters(recurse=False) if id(p) in ids]
        if own:
            owner[m] = unit_of[own[0]]
    flops, stack, hooks = [0.0] * len(units), [], []
    with FlopCounterMode(display=False) as counter:
        def enter(module, args):
            stack.append([counter.get_total_flops(), 0])

        def leave(module, args, out):
            start, inner = stack.pop()
            inclusive = counter.get_total_flops() - start
            flops[owner[module]] += inclusive - inner
            if stack:
                stack[-1][1] += inclusive
        for m in owner:
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # the same products; batch-norm running statistics left untouched
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in hooks:
                h.remove()
            for m, training in modes:
                m.training = training
    return flops


class _CostModel:
    """Cost of one gradient evaluation of a local phase whose subdomain holds units i..j-1.

    With the other parameters frozen (``requires_grad=False``) a local evaluation computes
      forward:            every unit from the subdomain's first one on (``prefix_cached``: the
                          frozen prefix is computed once per phase, not per evaluation), else all;
      input gradients:    every unit after the subdomain's first one (back-propagation reaches it);
      weight gradients:   the subdomain's units only;
    each backward product costing as much as the forward one (a matrix product or convolution).
    In units of forward FLOPs; the constant cost of the loss and element-wise layers is left out.
    """

    def __init__(self, flops, prefix_cached=True):
        self.flops, self.prefix_cached = list(flops), prefix_cached
        self.suffix = np.concatenate([np.cumsum(self.flops[::-1])[::-1], [0.0]])  # sum from u on
        self.total = self.suffix[0] if len(self.flops) else 0.0

    def run(self, i, j):
        forward = self.suffix[i] if self.prefix_cached else self.total
        return forward + self.suffix[i + 1] + (self.suffix[i] - self.suffix[j])


def evaluation_costs(model: torch.nn.Module, subdomains, example=None,
                     prefix_cached: bool = True) -> list[float]:
    """Predicted cost (forward FLOPs of ``example``, or parameter units without it; see
    ``_unit_flops``) of one gradient evaluation of each subdomain's local phase, by the model of
    ``_CostModel``, for subdomains of any strategy: a subdomain counts from the first module it
    touches, and pays the weight-gradient product of every module of which it holds a tensor of two
    or more dimensions (whole: autograd differentiates a tensor whole, even where ``flat`` holds
    part of it; a bias alone costs nothing here).  Relative numbers: a local phase makes about
    ``local_iters + 1`` such evaluations.  Not modelled: the work proportional to the subdomain's
    parameter count (the trust-region vector operations, the bias and normalisation gradients),
    which dominates when the minibatch is small.
    """
    params = subdomains[0].params
    units = _units(model, params, by_module=True)
    unit_of = {i: k for k, u in enumerate(units) for i in u}
    costs = _CostModel(_unit_flops(model, params, units, example), prefix_cached)
    result = []
    for sd in subdomains:
        touched = sorted({unit_of[p.index] for p in sd.pieces})
        first = touched[0]
        forward = costs.suffix[first] if prefix_cached else costs.total
        weights = {unit_of[p.index] for p in sd.pieces if params[p.index].dim() >= 2}
        result.append(float(forward + costs.suffix[first + 1] + sum(costs.flops[u] for u in weights)))
    return result
