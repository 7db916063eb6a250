"""TrustRegion: radius rule, steps against hand formulas, exact restore, classic test functions
against SciPy, digits accuracy, state round trip."""
import math

import numpy as np
import pytest
import scipy.optimize as so
import torch

from apts_mpi import TrustRegion, update_radius
from apts_mpi.trust_region import TrustRegionConfig

RULE = dict(eta1=0.25, eta2=0.75, decrease=0.5, increase=2.0, min_radius=1e-4, max_radius=0.1)


@pytest.mark.parametrize("radius, rho, expected", [
    (0.01, -1.0, 0.005),          # rho < eta1: shrink
    (0.01, 0.2499, 0.005),
    (0.01, math.nan, 0.005),      # NaN counts as a failure
    (0.01, -math.inf, 0.005),
    (1.5e-4, 0.0, 1e-4),          # shrink clipped at min_radius
    (0.01, 0.25, 0.01),           # eta1 <= rho <= eta2: keep
    (0.01, 0.75, 0.01),
    (0.01, 0.7501, 0.02),         # rho > eta2: grow
    (0.08, 5.0, 0.1),             # growth clipped at max_radius
])
def test_update_radius_every_branch(radius, rho, expected):
    assert update_radius(radius, rho, **RULE) == pytest.approx(expected, rel=0, abs=1e-15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eta1=0.8, eta2=0.5), "0 < eta1 < eta2 < 1"),
    (dict(radius=1.0), "radius (1.0) must lie in"),
    (dict(min_radius=0.0), "min_radius must be > 0"),
    (dict(min_radius=0.2), "must not exceed max_radius"),
    (dict(decrease=1.5), "decrease must lie in (0, 1)"),
    (dict(increase=0.5), "increase must be >= 1"),
    (dict(model="newton"), "model must be one of"),
    (dict(norm="1"), "norm must be one of"),
    (dict(memory=0), "memory must be a positive integer"),
    (dict(radius=float("nan")), "radius must be a finite number"),
    (dict(step="sign", norm="2"), "step='sign'"),
])
def test_invalid_constants_one_message_each(kwargs, message):
    with pytest.raises(ValueError, match=None) as err:
        TrustRegion([torch.zeros(2, requires_grad=True)], **kwargs)
    assert message in str(err.value)


def quadratic_closure(x, A, b):
    """f(x) = 1/2 x^T A x - b^T x."""
    def closure():
        if x.grad is not None:
            x.grad.zero_()
        f = 0.5 * x @ (A @ x) - b @ x
        f.backward()
        return f
    return closure


@pytest.mark.parametrize("norm, step", [("inf", "cauchy"), ("2", "cauchy"), ("inf", "sign")])
def test_first_order_step_and_prediction_match_hand_formulas(norm, step):
    torch.manual_seed(0)
    n = 7
    A = torch.diag(torch.linspace(1, 3, n, dtype=torch.float64))
    b = torch.randn(n, dtype=torch.float64)
    x0 = torch.randn(n, dtype=torch.float64)
    x = x0.clone().requires_grad_(True)
    opt = TrustRegion([x], radius=0.05, max_radius=0.1, norm=norm, step=step, eta1=1e-6, eta2=0.999)
    opt.step(quadratic_closure(x, A, b))
    g = (A @ x0 - b).numpy()
    r = 0.05
    if step == "sign":
        s, pred = -r * np.sign(g), r * np.abs(g).sum()
    elif norm == "inf":
        s, pred = -r * g / np.abs(g).max(), r * (g @ g) / np.abs(g).max()
    else:
        s, pred = -r * g / np.linalg.norm(g), r * np.linalg.norm(g)
    np.testing.assert_allclose(x.detach().numpy() - x0.numpy(), s, rtol=1e-12, atol=1e-15)
    f = lambda v: 0.5 * v @ A.numpy() @ v - b.numpy() @ v
    actual = f(x0.numpy()) - f(x0.numpy() + s)
    assert opt.counters.rho == pytest.approx(actual / pred, rel=1e-10)
    assert opt.counters.accepted == 1 and opt.counters.loss_evals == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_trial_is_rejected_and_parameters_restored_bitwise(bad):
    torch.manual_seed(1)
    x = torch.randn(5, requires_grad=True)
    before = x.detach().clone()
    calls = []

    def closure():
        calls.append(1)
        if x.grad is not None:
            x.grad.zero_()
        f = (x ** 2).sum()
        f.backward()
        return f * bad if len(calls) == 2 else f

    opt = TrustRegion([x])
    opt.step(closure)
    assert torch.equal(x.detach(), before)
    assert opt.counters.rejected == 1 and opt.counters.accepted == 0
    assert opt.radius == pytest.approx(0.005)


def test_rejected_step_restores_bitwise():
    """A step that increases the loss is rejected and x comes back bit for bit."""
    x = torch.tensor([0.1, -0.3, 0.7], dtype=torch.float32, requires_grad=True)
    before = x.detach().clone()

    def closure():  # a narrow valley: a step of 0.01 overshoots
        if x.grad is not None:
            x.grad.zero_()
        f = 1e4 * ((x - before) ** 2).sum() + x.sum()
        f.backward()
        return f

    opt = TrustRegion([x], radius=0.01)
    opt.step(closure)
    assert opt.counters.rejected == 1
    assert torch.equal(x.detach(), before)


# -- classic unconstrained test functions against SciPy ---------------------------------------
def rosenbrock(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def beale(x):
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b ** 2) ** 2 + (2.625 - a + a * b ** 3) ** 2


def powell_singular(x):
    return ((x[0] + 10 * x[1]) ** 2 + 5 * (x[2] - x[3]) ** 2 + (x[1] - 2 * x[2]) ** 4
            + 10 * (x[0] - x[3]) ** 4)


def extended_start(n):
    x = np.ones(n)
    x[::2] = -1.2
    return x


PROBLEMS = {
    "rosenbrock-2": (rosenbrock, np.array([-1.2, 1.0])),
    "rosenbrock-100": (rosenbrock, extended_start(100)),
    "beale": (beale, np.array([1.0, 1.0])),
    "powell-singular": (powell_singular, np.array([3.0, -1.0, 0.0, 1.0])),
}
EVALUATIONS = {}


def solve(fun, x0, model):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = TrustRegion([x], radius=1.0, max_radius=100.0, min_radius=1e-12, model=model, norm="2",
                      memory=10, max_iters=20000, tolerance_grad=1e-5)

    def closure():
        if x.grad is not None:
            x.grad.zero_()
        f = fun(x)
        f.backward()
        return f

    opt.step(closure)
    closure()
    return x.detach().numpy(), float(x.grad.abs().max()), opt.counters


def scipy_evals(fun, x0):
    def f_and_g(v):
        x = torch.tensor(v, requires_grad=True)
        f = fun(x)
        f.backward()
        return f.item(), x.grad.numpy().copy()

    lbfgsb = so.minimize(f_and_g, x0, jac=True, method="L-BFGS-B", options=dict(gtol=1e-5, maxiter=20000))

    def hessp(v, p):
        x = torch.tensor(v, requires_grad=True)
        (g,) = torch.autograd.grad(fun(x), x, create_graph=True)
        (hp,) = torch.autograd.grad(g @ torch.tensor(p), x)
        return hp.numpy()

    ncg = so.minimize(lambda v: f_and_g(v)[0], x0, jac=lambda v: f_and_g(v)[1], hessp=hessp,
                      method="trust-ncg", options=dict(gtol=1e-5, maxiter=20000))
    return lbfgsb.nfev, ncg.nfev


@pytest.mark.parametrize("model", ["lsr1", "lbfgs"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_classic_functions_to_gradient_tolerance(name, model):
    fun, x0 = PROBLEMS[name]
    x, g_inf, counters = solve(fun, x0, model)
    assert g_inf <= 1e-5, f"{name}/{model}: ||g||_inf = {g_inf:.2e} after {counters.loss_evals} evaluations"
    if name.startswith("rosenbrock"):
        np.testing.assert_allclose(x, np.ones_like(x), atol=1e-4)
    n_lbfgsb, n_ncg = scipy_evals(fun, x0)
    EVALUATIONS[(name, model)] = (counters.loss_evals, n_lbfgsb, n_ncg)
    print(f"\n{name:16s} {model:6s} TrustRegion evaluations {counters.loss_evals:5d}   "
          f"SciPy L-BFGS-B {n_lbfgsb:5d}   trust-ncg {n_ncg:5d}")


# -- a real network ----------------------------------------------------------------------------
def test_digits_mlp_reaches_90_percent_at_default_constants():
    from apts_mpi.data import load_dataset
    from apts_mpi.models import build_model
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("mlp-digits", data.input_shape, data.classes)
    opt = TrustRegion(model.parameters())  # defaults only: no learning rate anywhere

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.train_x), data.train_y)
        loss.backward()
        return loss

    for _ in range(300):
        opt.step(closure)
    with torch.no_grad():
        accuracy = (model(data.test_x).argmax(1) == data.test_y).float().mean().item()
    print(f"\ndigits test accuracy {100 * accuracy:.2f}% after 300 TrustRegion steps")
    assert accuracy >= 0.90


@pytest.mark.parametrize("model", ["first-order", "lsr1", "lbfgs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_resume_continues_identical_trajectory(model, dtype):
    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)
        return net, TrustRegion(net.parameters(), model=model, radius=0.05)

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 6, generator=g, dtype=dtype), torch.randint(0, 3, (40,), generator=g)

    def run(net, opt, k):
        for _ in range(k):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(x), y)
                loss.backward()
                return loss
            opt.step(closure)

    net, opt = make()
    run(net, opt, 6)
    saved_params = {k: v.clone() for k, v in net.state_dict().items()}
    saved_state = opt.state_dict()
    run(net, opt, 6)
    reference = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()

    net2, opt2 = make()
    net2.load_state_dict(saved_params)
    opt2.load_state_dict(saved_state)
    assert opt2.radius == saved_state["state"][0]["trust_region"]["radius"]
    run(net2, opt2, 6)
    resumed = torch.nn.utils.parameters_to_vector(net2.parameters()).detach()
    assert torch.equal(resumed, reference)
    assert opt2.counters == opt.counters


def test_float32_and_float64_parameters_take_the_same_first_step():
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([1.0, -2.0, 0.5], dtype=dtype, requires_grad=True)
        opt = TrustRegion([x], radius=0.01)
        opt.step(quadratic_closure(x, torch.eye(3, dtype=dtype), torch.zeros(3, dtype=dtype)))
        expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) * (1 - 0.01 / 2.0)
        assert x.dtype == dtype
        torch.testing.assert_close(x.detach().double(), expected, rtol=1e-6, atol=1e-7)
