"""Issue 22: the scaled trust region (scaling: adam), the combined step's radius control
(radius_control: combined), the damped combination (damping) and the data space's pred from the
local decreases (data_pred: local), against hand computations in float64 (NumPy)."""

import numpy as np
import pytest
import torch

from apts_mpi import APTS
from apts_mpi.comm import Comm
from apts_mpi.iteration.coordinator import Coordinator
from apts_mpi.options import OptionError
from apts_mpi.trust_region import TrustRegionConfig
from conftest import core_at, solve


def weights(gradients, b2=0.999, eps=1e-8):
    """W = sqrt(d / mean(d)), d = sqrt(v_hat) + eps, by hand."""
    v = np.zeros_like(gradients[0])
    for g in gradients:
        v = b2 * v + (1 - b2) * g * g
    d = np.sqrt(v / (1 - b2 ** len(gradients))) + eps
    return np.sqrt(d / d.mean())


G1, G2 = np.array([3.0, -0.5, 1e-3, 0.0, 40.0]), np.array([1.0, 2.0, -4.0, 0.5, -30.0])


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_scaled_cauchy_step_is_the_cauchy_step_in_the_scaled_norm(norm):
    order = np.inf if norm == "inf" else 2
    core = core_at(G1, scaling="adam", norm=norm)
    solve(core, 0.3)
    core.set_gradient(torch.tensor(G2))  # a new gradient: the moment advances once
    pred, step_norm = solve(core, 0.3)
    w = weights([G1, G2])
    ghat = G2 / w
    s = -0.3 * (ghat / np.linalg.norm(ghat, order)) / w
    np.testing.assert_allclose(core.step.numpy(), s, rtol=1e-13, atol=1e-16)
    assert pred == pytest.approx(-G2 @ s, rel=1e-13)
    assert np.linalg.norm(w * s, order) == pytest.approx(0.3, rel=1e-13) and step_norm is None
    # a rejection solves again with the same gradient: W stays, the step halves exactly
    first = core.step.clone()
    solve(core, 0.15)
    assert torch.equal(core.step, first / 2) and core.solver.scaling.t == 2


def test_scaled_sign_step_and_equal_magnitudes_give_the_unscaled_step():
    core = core_at(G1, scaling="adam", step="sign")
    pred, _ = solve(core, 0.2)
    w = weights([G1])
    np.testing.assert_allclose(core.step.numpy(), -0.2 * np.sign(G1) / w, rtol=1e-14)
    assert pred == pytest.approx(0.2 * np.abs(G1 / w).sum(), rel=1e-13)
    g = np.array([2.0, -2.0, 2.0])  # equal magnitudes: W = 1, the Cauchy step of the plain norm
    core, plain = core_at(g, scaling="adam"), core_at(g)
    solve(core, 0.2), solve(plain, 0.2)
    np.testing.assert_allclose(core.step.numpy(), plain.step.numpy(), rtol=1e-15)


def test_scaled_quasi_newton_step_solves_the_model_in_the_scaled_variables():
    """After one stored pair the step is the exact minimiser of the scaled model in the 2-ball:
    its decrease in s equals the model's in z = W s, and ||W s|| <= radius."""
    core = core_at(G1, scaling="adam", model="lbfgs", norm="2")
    solve(core, 0.1)
    core.qn.update(core.step.clone(), torch.tensor(G2 - G1))  # the pair, mapped into z
    w = torch.tensor(weights([G1]))
    assert len(core.qn) == 1
    pred, step_norm = solve(core, 0.1)
    s = core.step
    assert float(torch.linalg.vector_norm(w * s)) <= 0.1 * (1 + 1e-12)
    assert pred == pytest.approx(core.qn.inner.model_decrease(core.grad / w, s * w), rel=1e-12)
    assert pred == pytest.approx(core.qn.model_decrease(core.grad, s), rel=1e-12) and pred > 0


def problem(seed=0, samples=120):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(samples, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (samples,), generator=g)
    return model, x, y


def flat(model):
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def trial_repeats(**kwargs):
    """Local trials that re-propose the point just tried by the same local phase, and the local
    rejections, over 15 iterations of a small problem."""
    torch.manual_seed(0)  # the network and data of tests/mpi/cases.py
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(240, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (240,), generator=g)
    opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=2, seed=3, radius=0.05,
               max_radius=1.0, local_iters=10, global_iters=0, **kwargs)
    trials = []
    for core in opt.local.values():
        def counted(evaluate, grad_out, core=core, plain=core.counted_evaluation):
            point = torch.empty(core.subdomain.numel, dtype=torch.float64)
            trials.append((id(core), core.subdomain.gather(point)))
            return plain(evaluate, grad_out)
        core.counted_evaluation = counted
    repeats = 0
    for _ in range(15):
        start = len(trials)
        opt.step(x, y)
        new = trials[start:]
        repeats += sum(c1 == c2 and torch.equal(p1, p2) for (c1, p1), (c2, p2) in zip(new, new[1:]))
    return repeats, sum(c.counters.rejected for c in opt.local.values())


def test_no_repeated_local_trial():
    """A local radius grown past the budget shrinks back to the budget after a rejection and used
    to propose the rejected step again; capped at the budget (radius_control: combined), never."""
    repeats, rejected = trial_repeats()
    assert repeats >= 1 and rejected > 50  # the defect, as on main
    repeats, rejected = trial_repeats(radius_control="combined")
    assert repeats == 0 and rejected > 50


def test_identical_shards_give_rho_one():
    """Data space, every shard the same samples: each local phase makes the same correction and
    f(theta_k + s) - f(theta_k) is each shard's own decrease, so pred = sum_d w_d delta_d gives
    rho = 1 to rounding; -grad f^T s (the default) does not."""
    _, x, y = problem(samples=40)
    x4, y4 = x.repeat(4, 1), y.repeat(4)
    rhos = {}
    for data_pred in ("local", "gradient"):
        model, _, _ = problem()
        opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=4, seed=1, space="data",
                   data_pred=data_pred, global_iters=0, radius=0.05, max_radius=1.0)
        rhos[data_pred] = []
        for _ in range(4):
            opt.step(x4, y4)
            rhos[data_pred].append(opt.report.rho)
    np.testing.assert_allclose(rhos["local"], 1.0, rtol=0, atol=1e-10)
    assert max(abs(r - 1) for r in rhos["gradient"]) > 1e-3


def test_combined_step_inside_the_budget_is_no_boundary_step():
    config = TrustRegionConfig(radius=0.1, max_radius=1.0)
    coordinator = Coordinator(Comm(None), config, "ratio", 5, torch.float64, budget=0.5)
    # rho = 1 with ||s||_inf = 0.03 < 0.8 * 0.5 * 0.1: Delta kept; at 0.045 >= 0.04: doubled
    assert coordinator.decide(1.0, 0.9, 0.1, 0.03) == (True, pytest.approx(1.0), 0.1)
    assert coordinator.decide(1.0, 0.9, 0.1, 0.045)[2] == 0.2
    # a failure shrinks to decrease * ||s||_inf / fraction
    assert coordinator.decide(1.0, 1.2, 0.1, 0.02)[2] == pytest.approx(0.5 * 0.04)
    plain = Coordinator(Comm(None), config, "ratio", 5, torch.float64)
    assert plain.decide(1.0, 0.9, 0.1, 0.03)[2] == 0.2  # the default: every step a boundary step


def test_damped_half_step_is_exact_on_a_quadratic():
    """f(theta_k + t s) = 1 - t + c t^2: the quadratic predicts the half step's decrease exactly."""
    coordinator = Coordinator(Comm(None), TrustRegionConfig(), "ratio", 5, torch.float64)
    for c in (0.9, 1.5):
        half = 1 - 0.5 + 0.25 * c
        accept, rho, pred, trial = coordinator.settle_damped(1.0, 1 - 1 + c, -1.0, half)
        assert pred == pytest.approx(0.5 - 0.25 * c) and rho == pytest.approx(1.0)
        assert accept and trial == half
    # no decrease predicted (c >= 2): rejected
    assert not coordinator.settle_damped(1.0, 2.0, -1.0, 0.9)[0]


def test_damping_raises_acceptance_where_the_sum_overshoots():
    """Strict constants make the summed corrections fail often; the halves then pass."""
    counts, halves = {}, {}
    for damping in (False, True):
        model, x, y = problem()
        opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=4, seed=4, radius=0.5,
                   max_radius=1.0, eta1=0.6, eta2=0.9, damping=damping)
        counts[damping], halves[damping] = 0, []
        for _ in range(10):
            opt.step(x, y)
            counts[damping] += opt.report.accepted
            halves[damping].append(opt.record()["damped"])
    assert counts[True] > counts[False]
    assert opt.damped_accepted >= 1 and opt.damped_tried >= opt.damped_accepted
    # the record says which iterations moved by the half step: each of them an accepted one
    assert halves[False] == [-1] * 10 and set(halves[True]) <= {0, 1}
    assert sum(halves[True]) == opt.damped_accepted


@pytest.mark.parametrize("kwargs, key", [
    (dict(scaling="adam", local_decisions="device"), "scaling"),
    (dict(damping=True, acceptance="none"), "damping"),
    (dict(data_pred="local"), "data_pred"),
    (dict(scaling="diag"), "scaling"),
])
def test_bad_combinations_raise_one_clear_message(kwargs, key):
    model, _, _ = problem()
    with pytest.raises(OptionError) as err:
        APTS(model, torch.nn.functional.cross_entropy, subdomains=2, **kwargs)
    assert err.value.key == key
