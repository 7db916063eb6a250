"""Poisson PINN: collocation points, the objective contract for every cut of a minibatch, the
autograd Laplacian against finite differences and hand-computed Laplacians, the metrics."""
import math

import numpy as np
import pytest
import torch

from apts_mpi.config import resolve
from apts_mpi.errors import ConfigError
from apts_mpi.problems.pinn import PoissonProblem
from conftest import PartComm


def make_problem(n_i=40, n_b=12, seed=0, dtype=torch.float64, name="pinn-mlp"):
    cfg = {"seed": seed, "model": {"name": name, "dtype": "float64"},
           "data": {"dataset": "poisson2d", "root": None, "batch_size": 10**5,
                    "test_batch_size": 10**4, "interior_points": n_i, "boundary_points": n_b}}
    return PoissonProblem(cfg, torch.device("cpu"), dtype)


class Exact(torch.nn.Module):
    """u = scale * sin(pi x) sin(pi y): the exact solution at scale = 1."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, p):
        return (self.scale * torch.sin(math.pi * p[:, 0]) * torch.sin(math.pi * p[:, 1]))[:, None]


class Polynomial(torch.nn.Module):
    """u = a x^2 y + b y^3 + c: Laplace u = 2 a y + 6 b y."""

    def __init__(self, a, b, c):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Parameter(torch.tensor(v, dtype=torch.float64))
                                  for v in (a, b, c))

    def forward(self, p):
        x, y = p[:, 0], p[:, 1]
        return (self.a * x ** 2 * y + self.b * y ** 3 + self.c)[:, None]


def rhs(p):
    return 2 * math.pi ** 2 * torch.sin(math.pi * p[:, 0]) * torch.sin(math.pi * p[:, 1])


def test_collocation_points():
    p = make_problem(n_i=30, n_b=10, seed=4)
    inside, edge = p.points[:30], p.points[30:]
    assert p.n_train == 40 and p.is_boundary.tolist() == [False] * 30 + [True] * 10
    assert ((inside > 0) & (inside < 1)).all()
    on_edge = (edge == 0) | (edge == 1)
    assert on_edge.any(dim=1).all() and ((edge >= 0) & (edge <= 1)).all()
    assert len(torch.unique(edge, dim=0)) == 10
    # perimeter of 4 with 10 points: arc length 0.4 apart, from (0, 0) counter-clockwise
    expected = [[0, 0], [0.4, 0], [0.8, 0], [1, 0.2], [1, 0.6], [1, 1], [0.6, 1], [0.2, 1],
                [0, 0.8], [0, 0.4]]
    torch.testing.assert_close(edge, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(make_problem(30, 10, seed=4).points, p.points, rtol=0, atol=0)
    assert not torch.equal(make_problem(30, 10, seed=5).points, p.points)
    with pytest.raises(ConfigError, match="model.name must be one of pinn-"):
        resolve({"data": {"dataset": "poisson2d"}, "model": {"name": "gpt-small"}})
    with pytest.raises(ConfigError, match="data.boundary_points must be an integer >= 4; got 3"):
        resolve({"data": {"dataset": "poisson2d", "boundary_points": 3}, "model": {"name": "pinn-mlp"}})


def test_parameter_count():
    torch.manual_seed(0)
    model = make_problem().build_model()
    assert isinstance(model, torch.nn.Sequential)
    hand = (2 * 20 + 20) + 7 * (20 * 20 + 20) + (20 + 1)
    assert sum(q.numel() for q in model.parameters()) == hand == 3021


def reference_loss(model, points, is_boundary):
    """Mean squared residual inside + mean squared u on the boundary, Laplacian by central finite
    differences (float64, h = 1e-4): independent of autograd."""
    h = 1e-4
    with torch.no_grad():
        u = model(points)[:, 0]
        lap = sum((model(points + h * e)[:, 0] - 2 * u + model(points - h * e)[:, 0]) / h ** 2
                  for e in torch.eye(2, dtype=points.dtype))
        inside = (-lap - rhs(points))[~is_boundary] ** 2
        edge = u[is_boundary] ** 2
    return (inside.mean() if len(inside) else 0) + (edge.mean() if len(edge) else 0)


@pytest.mark.parametrize("indices", [None, [3, 41, 7, 50, 0, 45, 12], [1, 2, 5]])
def test_objective_contract_against_finite_differences(indices):
    p = make_problem(n_i=40, n_b=12)
    torch.manual_seed(0)
    model = p.build_model()
    idx = torch.arange(p.n_train) if indices is None else torch.tensor(indices)
    batch = p.batch(idx)
    B = len(idx)
    reference = float(reference_loss(model, batch[0], batch[2]))
    g = torch.Generator().manual_seed(1)
    for n_parts in (1, 2, 3, B):
        cuts = torch.sort(torch.randperm(B - 1, generator=g)[:n_parts - 1] + 1).values.tolist()
        bounds = [0, *cuts, B]
        with torch.no_grad():
            total = sum(p.objective(model, tuple(t[a:b] for t in batch))
                        for a, b in zip(bounds[:-1], bounds[1:])) / B
        assert float(total) == pytest.approx(reference, rel=1e-6)


def test_exact_solution_and_polynomial():
    p = make_problem(n_i=50, n_b=16)
    batch = p.batch(torch.arange(p.n_train))
    exact = Exact()
    assert float(p.objective(exact, batch).detach()) < 1e-20
    metrics = p.evaluate(exact, PartComm(0, 1))
    assert metrics["l2_error"] < 1e-14 and metrics["pde_loss"] < 1e-22
    assert metrics["boundary_loss"] < 1e-30
    poly = Polynomial(1.5, -0.7, 0.2)
    pts, inside = p.points, ~p.is_boundary
    x, y = pts[:, 0], pts[:, 1]
    u = 1.5 * x ** 2 * y - 0.7 * y ** 3 + 0.2
    lap = 2 * 1.5 * y + 6 * -0.7 * y
    hand = ((-lap - rhs(pts))[inside] ** 2).mean() + (u[~inside] ** 2).mean()
    got = p.objective(poly, batch) / p.n_train
    torch.testing.assert_close(got, hand, rtol=1e-13, atol=0)
    # relative L2 error on the 101 x 101 grid, by numpy
    gx, gy = np.meshgrid(np.linspace(0, 1, 101), np.linspace(0, 1, 101))
    ref = np.sin(np.pi * gx) * np.sin(np.pi * gy)
    err = 1.5 * gx ** 2 * gy - 0.7 * gy ** 3 + 0.2 - ref
    metrics = p.evaluate(poly, PartComm(0, 1))
    assert metrics["l2_error"] == pytest.approx(np.linalg.norm(err) / np.linalg.norm(ref), rel=1e-12)
    assert metrics["pde_loss"] == pytest.approx(float(((-lap - rhs(pts))[inside] ** 2).mean()), rel=1e-12)
    assert metrics["boundary_loss"] == pytest.approx(float((u[~inside] ** 2).mean()), rel=1e-12)


def test_no_grad_frozen_parameters_and_gradient():
    p = make_problem(n_i=20, n_b=8)
    torch.manual_seed(0)
    model = p.build_model()
    batch = p.batch(torch.arange(p.n_train))
    loss = p.objective(model, batch)
    full = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        assert float(p.objective(model, batch)) == float(loss)
    # gradient of the first weight against a central difference of the loss
    w, i, h = model[0].weight, (3, 1), 1e-6
    with torch.no_grad():
        w[i] += h
        up = float(p.objective(model, batch))
        w[i] -= 2 * h
        down = float(p.objective(model, batch))
        w[i] += h
    assert float(full[0][i]) == pytest.approx((up - down) / (2 * h), rel=1e-6)
    # APTS freezes the tensors outside a subdomain: the others get the same gradients
    params = list(model.parameters())
    for q in params[:10]:
        q.requires_grad_(False)
    p.objective(model, batch).backward()
    assert all(q.grad is None for q in params[:10])
    for q, g in zip(params[10:], full[10:]):
        torch.testing.assert_close(q.grad, g, rtol=1e-12, atol=1e-15)


def test_evaluate_split_over_ranks():
    p = make_problem(n_i=25, n_b=8)
    torch.manual_seed(0)
    model = p.build_model()
    serial = PartComm(0, 1)
    p.evaluate(model, serial)
    for size in (3, 30):  # 30 ranks: some hold no boundary points
        comms = [PartComm(r, size) for r in range(size)]
        for c in comms:
            p.evaluate(model, c)
        summed = [sum(c.values[i] for c in comms) for i in range(4)]
        assert summed == pytest.approx(serial.values, rel=1e-12)
    assert model.training


def test_adam_lowers_the_loss():
    p = make_problem(n_i=60, n_b=16, dtype=torch.float32)
    torch.manual_seed(0)
    model = p.build_model()
    batch = p.batch(torch.arange(p.n_train))
    before = p.evaluate(model, PartComm(0, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        (p.objective(model, batch) / p.n_train).backward()
        opt.step()
    after = p.evaluate(model, PartComm(0, 1))
    assert after["pde_loss"] + after["boundary_loss"] < 0.5 * (before["pde_loss"] + before["boundary_loss"])
    assert math.isfinite(after["l2_error"])  # early on the fit may still move away from u
