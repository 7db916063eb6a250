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
        self.offsets = np.cumsum([0] + [p.numel for p in self.pieces]).tolist()

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

    @torch.no_grad()
    def gather(self, out: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """out <- R_d theta (or R_d of the gradient); returns ``out``."""
        for (a, b), v in zip(self._spans(), self._views(grad)):
            out[a:b].copy_(v)
        return out

    @torch.no_grad()
    def scatter(self, vec: torch.Tensor, grad: bool = False) -> None:
        """theta[I_d] <- vec (or its gradient), exactly (bitwise)."""
        for (a, b), v in zip(self._spans(), self._views(grad)):
            v.copy_(vec[a:b])

    @torch.no_grad()
    def add_(self, vec: torch.Tensor, alpha: float = 1.0) -> None:
        """theta[I_d] += alpha * vec."""
        for (a, b), v in zip(self._spans(), self._views(False)):
            v.add_(vec[a:b], alpha=alpha)

    def _spans(self):
        return zip(self.offsets[:-1], self.offsets[1:])


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


def _min_max_partition(sizes, n_parts):
    """Cut ``sizes`` into ``n_parts`` contiguous non-empty runs minimising the largest run sum.

    Exact dynamic programme over prefix sums; returns the cut points (len n_parts + 1).
    """
    k = len(sizes)
    prefix = np.concatenate([[0], np.cumsum(sizes)])
    inf = float("inf")
    best = np.full((n_parts + 1, k + 1), inf)
    cut = np.zeros((n_parts + 1, k + 1), dtype=int)
    best[0, 0] = 0.0
    for p in range(1, n_parts + 1):
        for j in range(p, k - (n_parts - p) + 1):
            for i in range(p - 1, j):
                cost = max(best[p - 1, i], prefix[j] - prefix[i])
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
              seed: int = 0) -> list[Subdomain]:
    """Split the trainable parameters of ``model`` into ``n_subdomains`` disjoint subdomains.

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
        cuts = _min_max_partition(sizes, n_subdomains)
        groups = [sorted(i for u in units[a:b] for i in u) for a, b in zip(cuts[:-1], cuts[1:])]
    return [Subdomain(params, [Piece(i, 0, params[i].numel()) for i in grp]) for grp in groups]
