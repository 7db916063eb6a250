"""A physics-informed network for the Poisson problem on the unit square.

    -Laplace(u) = 2 pi^2 sin(pi x) sin(pi y)  on (0, 1)^2,    u = 0 on the boundary,

whose exact solution is ``u(x, y) = sin(pi x) sin(pi y)``.  The network ``u_theta`` is fitted at
collocation points (no data files): ``data.interior_points`` points drawn uniformly in (0, 1)^2
once, from ``torch.Generator().manual_seed(seed)``, and ``data.boundary_points`` points equally
spaced along the perimeter from the corner (0, 0), each corner at most once (the authors' 80 are
20 per side).  The interior points come first (indices ``0 .. N_i - 1``), then the boundary points.

Loss of a set of points with ``N_i`` interior and ``N_b`` boundary points (each mean left out
when its set is empty):

    f = (1 / N_i) sum_interior (-Laplace u_theta - rhs)^2 + (1 / N_b) sum_boundary u_theta^2.

The :class:`~apts_mpi.objective.Objective` contract needs f as ``(1 / B) * sum of per-point
terms`` for every cut of a minibatch of B points, so a minibatch is ``(points, weights,
is_boundary)`` with weight ``B / N_i`` on its interior and ``B / N_b`` on its boundary points
(counts of that minibatch); a point's term is its weight times its squared residual.  The Laplacian
is taken with autograd (``create_graph=True``), so the objective differentiates with respect to its
inputs: ``sequential_inputs = False``.

Metrics after every epoch: ``l2_error``, the relative L2 error ``||u_theta - u||_2 / ||u||_2`` over
the 101 x 101 grid of [0, 1]^2 (step 0.01); ``pde_loss`` and ``boundary_loss``, the two means of f
over all collocation points.  ``pinn-mlp`` is the authors' network: 2 inputs, 8 hidden layers of
20 with tanh, 1 output (3,021 parameters).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..objective import Objective
from ..options import Option, at_least
from .base import Problem

GRID = 101
N_INTERIOR, N_BOUNDARY = 1000, 80  # the authors' numbers of collocation points
MLP_HIDDEN = {"pinn-mlp": (20,) * 8}


def exact_solution(points: torch.Tensor) -> torch.Tensor:
    """``sin(pi x) sin(pi y)`` at ``points`` of shape (n, 2)."""
    return torch.sin(math.pi * points[:, 0]) * torch.sin(math.pi * points[:, 1])


def forcing(points: torch.Tensor) -> torch.Tensor:
    """The right-hand side ``2 pi^2 sin(pi x) sin(pi y)``."""
    return 2 * math.pi ** 2 * exact_solution(points)


def laplacian(model: nn.Module, points: torch.Tensor, create_graph: bool):
    """``(u, Laplace u)`` of the scalar network ``model`` at ``points`` (n, 2), by autograd.

    Each output depends on its own point only, so the derivatives of the summed output give every
    point's derivatives at once.  ``create_graph`` keeps the graph for a later backward pass with
    respect to the parameters.  Runs with gradients enabled whatever the caller's mode.
    """
    with torch.enable_grad():
        x = points.detach().requires_grad_(True)
        u = model(x).reshape(-1)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        lap = 0
        for i in range(x.shape[1]):
            (d2,) = torch.autograd.grad(du[:, i].sum(), x, create_graph=create_graph,
                                        retain_graph=True)
            lap = lap + d2[:, i]
    return u, lap


class PoissonObjective(Objective):
    """Sum over the points of a part ``(points, weights, is_boundary)`` of ``weight * residual^2``:
    ``-Laplace u - rhs`` inside, ``u`` on the boundary (module docstring)."""

    sequential_inputs = False

    def __call__(self, model, part):
        points, weights, is_boundary = part[0], part[1], part[2]
        grad = torch.is_grad_enabled()
        u, lap = laplacian(model, points, create_graph=grad)
        residual = torch.where(is_boundary, u, -lap - forcing(points))
        total = (weights * residual ** 2).sum()
        return total if grad else total.detach()


def boundary_points(n: int) -> torch.Tensor:
    """``n`` points equally spaced along the perimeter of [0, 1]^2, from (0, 0) counter-clockwise."""
    s = torch.arange(n, dtype=torch.float64) * 4 / n  # arc length along the perimeter
    side, t = torch.div(s, 1, rounding_mode="floor"), s - torch.floor(s)
    x = torch.where(side == 0, t, torch.where(side == 1, 1.0, torch.where(side == 2, 1 - t, 0.0)))
    y = torch.where(side == 0, 0.0, torch.where(side == 1, t, torch.where(side == 2, 1.0, 1 - t)))
    return torch.stack([x, y], dim=1)


def pinn_mlp(hidden=(20,) * 8) -> nn.Sequential:
    """``Linear(2, h1), Tanh, ..., Linear(h_last, 1)``."""
    layers, width = [], 2
    for h in hidden:
        layers += [nn.Linear(width, h), nn.Tanh()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 1))


class PoissonProblem(Problem):
    """The 2-D Poisson PINN (module docstring)."""

    datasets = ("poisson2d",)
    data_keys = {o.name: o for o in (Option("interior_points", N_INTERIOR, int, **at_least(1)),
                                     Option("boundary_points", N_BOUNDARY, int, **at_least(4)))}
    models = tuple(MLP_HIDDEN)
    metrics = ("l2_error", "pde_loss", "boundary_loss")
    target = ("l2_error", "min")

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        n_i = cfg["data"].get("interior_points", N_INTERIOR)
        n_b = cfg["data"].get("boundary_points", N_BOUNDARY)
        generator = torch.Generator().manual_seed(cfg["seed"])
        interior = torch.rand(n_i, 2, generator=generator, dtype=torch.float64)
        self.points = torch.cat([interior, boundary_points(n_b)]).to(device, dtype)
        self.is_boundary = torch.arange(n_i + n_b, device=device) >= n_i
        self.n_interior, self.n_boundary = n_i, n_b
        self.n_train = n_i + n_b
        self.objective = PoissonObjective()
        axis = torch.linspace(0, 1, GRID, dtype=torch.float64)
        self.grid = torch.cartesian_prod(axis, axis).to(device, dtype)

    def build_model(self):
        return pinn_mlp(MLP_HIDDEN[self.cfg["model"]["name"]]).to(self.device, self.dtype)

    def batch(self, indices):
        indices = indices.to(self.device, torch.int64)
        is_boundary = self.is_boundary[indices]
        n_b = int(is_boundary.sum())
        n_i = len(indices) - n_b
        B = len(indices)
        weights = torch.full((B,), B / max(n_i, 1), dtype=self.dtype, device=self.device)
        weights[is_boundary] = B / max(n_b, 1)
        return self.points[indices], weights, is_boundary

    def evaluate(self, model, comm):
        was_training = model.training
        model.eval()

        def mine(n):
            return slice(n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size)

        grid = self.grid[mine(len(self.grid))]
        interior = self.points[:self.n_interior][mine(self.n_interior)]
        boundary = self.points[self.n_interior:][mine(self.n_boundary)]
        _, lap = laplacian(model, interior, create_graph=False)
        with torch.no_grad():
            exact = exact_solution(grid)
            sums = [float(((model(grid).reshape(-1) - exact) ** 2).sum()), float((exact ** 2).sum()),
                    float(((-lap - forcing(interior)) ** 2).sum()),
                    float((model(boundary).reshape(-1) ** 2).sum())]
        model.train(was_training)
        err2, ref2, pde, bnd = comm.sum_scalars(sums)
        return {"l2_error": math.sqrt(err2 / ref2), "pde_loss": pde / self.n_interior,
                "boundary_loss": bnd / self.n_boundary}
