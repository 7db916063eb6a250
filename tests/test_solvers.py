"""Local solvers (apts_mpi/solvers): the interface, and the Adam-direction solver added as one
file and one registry line, against hand computations in float64 (NumPy)."""
import math

import numpy as np
import pytest
import torch

from apts_mpi import APTS
from apts_mpi.solvers import SOLVERS, STEPS, make_solver
from apts_mpi.trust_region import TrustRegion, TrustRegionConfig
from conftest import core_at, solve


def adam_reference(gradients, b1=0.9, b2=0.999, eps=1e-8):
    """Adam's direction after the gradients seen, by hand."""
    m = v = np.zeros_like(gradients[0])
    for t, g in enumerate(gradients, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    return (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)


def test_every_registered_solver_is_made_from_its_name():
    assert set(STEPS) == {"cauchy", "sign", "adam"} and set(SOLVERS) == set(STEPS) | {"lbfgs", "lsr1"}
    for step in STEPS:
        solver = make_solver(TrustRegionConfig(step=step, norm="inf"), 3, torch.float64, "cpu")
        assert type(solver).__name__.lower().startswith(step)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_adam_step_is_adams_direction_on_the_boundary(norm):
    g1, g2 = np.array([3.0, -0.5, 1e-3, 0.0]), np.array([1.0, 2.0, -4.0, 0.5])
    core = core_at(g1, step="adam", norm=norm)
    order = np.inf if norm == "inf" else 2
    pred, step_norm = solve(core, 0.2)
    d = adam_reference([g1])  # the first Adam step: sign(g) up to eps
    s = -0.2 * d / np.linalg.norm(d, order)
    assert step_norm is None
    np.testing.assert_allclose(core.step.numpy(), s, rtol=1e-14, atol=1e-17)
    assert pred == pytest.approx(-g1 @ s, rel=1e-14)
    # a rejection solves again with the same gradient: the moments stay, the step halves exactly
    first = core.step.clone()
    solve(core, 0.1)
    assert torch.equal(core.step, first / 2) and core.solver.t == 1
    # a new gradient advances them
    core.set_gradient(torch.tensor(g2))
    pred, _ = solve(core, 0.2)
    d = adam_reference([g1, g2])
    s = -0.2 * d / np.linalg.norm(d, order)
    np.testing.assert_allclose(core.step.numpy(), s, rtol=1e-13, atol=1e-17)
    assert pred == pytest.approx(-g2 @ s, rel=1e-13)


def test_trust_region_with_adam_steps_reaches_the_minimiser():
    """f(x) = 1/2 (x - c)^T A (x - c), A diagonal with condition number 100: minimiser c."""
    a = torch.tensor([1.0, 10.0, 100.0, 3.0], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = TrustRegion([x], step="adam", radius=0.5, max_radius=1.0, min_radius=1e-12, max_iters=1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (a * (x - c) ** 2).sum()
        loss.backward()
        return loss
    for _ in range(400):
        opt.step(closure)
    assert torch.linalg.vector_norm(x.detach() - c, math.inf) < 1e-7
    assert opt.counters.accepted > 0 and opt.counters.rejected > 0  # the rho test decides


def test_adam_solver_state_resumes_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    ce = torch.nn.functional.cross_entropy
    keywords = dict(subdomains=2, step="adam", radius=0.05, local_iters=3, global_iters=2)
    with torch.no_grad():
        initial = float(ce(model(x), y))
    first = APTS(model, ce, **keywords)
    losses = [first.step(x, y) for _ in range(3)]
    assert losses[-1] < initial
    state = first.state_dict()
    assert state["local"]["0"]["adam"]["t"] >= 1
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    twin.load_state_dict(model.state_dict())
    second = APTS(twin, ce, **keywords)
    second.load_state_dict(state)
    for _ in range(3):
        assert first.step(x, y) == second.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_device_decisions_refuse_a_host_solver():
    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="local_decisions='device'"):
        APTS(model, torch.nn.functional.cross_entropy, subdomains=1, step="adam", local_decisions="device")
