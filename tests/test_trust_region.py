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


# -- radius rule with the step length (N&W Alg. 4.1 / 6.2) ------------------------------------
@pytest.mark.parametrize("radius, rho, step_norm, expected", [
    (0.01, 0.9, None, 0.02),          # boundary by construction (first-order): grow
    (0.01, 0.9, 0.008, 0.02),         # ||s|| >= 0.8 radius counts as the boundary: grow
    (0.01, 0.9, 0.0079, 0.01),        # interior step, very successful: keep
    (0.01, 0.5, 0.001, 0.01),         # interior, successful: keep
    (0.01, 0.1, 0.004, 0.002),        # interior, failed: shrink relative to ||s||
    (0.01, 0.1, 0.02, 0.005),         # ||s|| > radius (rounding): shrink relative to the radius
    (0.01, math.nan, 1e-5, 1e-4),     # failed, clipped at min_radius
    (0.08, 5.0, 0.079, 0.1),          # boundary growth clipped at max_radius
])
def test_update_radius_with_step_norm_every_branch(radius, rho, step_norm, expected):
    assert update_radius(radius, rho, **RULE, step_norm=step_norm) == pytest.approx(expected, rel=0, abs=1e-15)


# -- the engine's iteration ---------------------------------------------------------------------
def core_on(x, **config):
    from apts_mpi.decomposition import Subdomain
    from apts_mpi.trust_region import TrustRegionCore
    return TrustRegionCore(Subdomain.whole([x]), TrustRegionConfig(**config))


def evaluator(x, fun, calls=None):
    """evaluate(grad_out) for the core; records whether a gradient was asked for."""
    def evaluate(grad_out):
        if calls is not None:
            calls.append(grad_out is not None)
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            f = fun(xx)
            if grad_out is None:
                return f.detach()
            (g,) = torch.autograd.grad(f, xx)
        grad_out.copy_(g)
        return f.detach()
    return evaluate


def test_quasi_newton_step_without_decrease_falls_back_to_the_cauchy_point():
    """A solver step with no model decrease used to stop the run for good; now the Cauchy point
    s = -t g, t = min(radius / ||g||, g^T g / g^T B g) (N&W eq. 4.12) is taken and the memory is
    cleared."""
    A = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    fun = lambda v: 0.5 * v @ (A @ v)
    x = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    core = core_on(x, model="lbfgs", norm="2", radius=0.5, max_radius=10.0)
    evaluate = evaluator(x, fun)
    core.run(evaluate, 2)                            # one first-order step, one pair stored
    assert len(core.qn) >= 1
    g = (A @ x).clone()
    B = torch.stack([core.qn.matvec(e) for e in torch.eye(3, dtype=torch.float64)], 1)
    core.qn.solve = lambda grad, radius: (-grad * 0.0, True)      # a step without decrease
    x0, r = x.clone(), core.radius
    core.run(evaluate, 1, loss=float(fun(x)))
    gBg = float(g @ B @ g)
    t = min(r / float(g.norm()), float(g @ g) / gBg)
    assert core.counters.fallbacks == 1 and core.counters.memory_resets == 1 and len(core.qn) == 1
    assert core.counters.loss_evals == 4              # the fallback step was tried
    if core.counters.accepted == 3:
        torch.testing.assert_close(x - x0, -t * g, rtol=1e-10, atol=1e-14)
    assert core.counters.rho == pytest.approx(
        float(fun(x0) - fun(x0 - t * g)) / (t * float(g @ g) - 0.5 * t * t * gBg), rel=1e-8)


def test_rejection_at_the_radius_floor_ends_the_run():
    """Every trial increases f; at min_radius a rejected step would be retried identically."""
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    fun = lambda v: ((v - torch.tensor([0.3, -0.2], dtype=torch.float64)) ** 2).sum() * 1e9 + v.sum()
    core = core_on(x, radius=1e-4, min_radius=1e-4, max_radius=0.1)
    core.run(evaluator(x, fun), 5)
    assert core.counters.rejected == 1 and core.counters.loss_evals == 2
    assert core.radius == 1e-4


@pytest.mark.parametrize("model, iters, expected", [
    ("first-order", 3, [True, True, True, False]),   # the last trial's gradient is never used
    ("lbfgs", 3, [True, True, True, True]),          # the quasi-Newton pair uses it
])
def test_loss_only_evaluation_where_the_gradient_cannot_be_used(model, iters, expected):
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    calls = []
    core = core_on(x, model=model, norm="2", radius=0.1, max_radius=1.0)
    core.run(evaluator(x, lambda v: (v ** 2).sum(), calls), iters, loss_only=True)
    assert calls == expected
    assert core.counters.loss_evals == len(calls) and core.counters.grad_evals == sum(calls)
    assert core.grad_current == expected[-1]


def test_trust_region_baseline_one_iteration_reads_one_gradient():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = TrustRegion([x], radius=0.01)
    opt.step(quadratic_closure(x, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)))
    assert opt.counters.loss_evals == 2 and opt.counters.grad_evals == 1
    assert opt.counters.accepted == 1


def test_rho_is_one_when_both_decreases_are_at_rounding_level():
    x = torch.zeros(2, dtype=torch.float64)
    core = core_on(x)
    core.loss = 1.0
    eps = torch.finfo(torch.float64).eps
    accept, rho, _ = core.ratio_decision(1.0 * eps, 5.0 * eps, True)   # 0.2: noise, not failure
    assert accept and rho == 1.0
    accept, rho, _ = core.ratio_decision(1.0 * eps, 50.0 * eps, True)  # pred above the noise
    assert not accept and rho == pytest.approx(0.02)


def test_quasi_newton_inf_norm_step_fills_the_box():
    """norm='inf': solved in the 2-ball of radius sqrt(n) Delta and clipped to ||s||_inf <= Delta,
    not in the 2-ball of radius Delta (sqrt(n) times shorter than the first-order step)."""
    n = 64
    A = torch.diag(torch.linspace(1.0, 2.0, n, dtype=torch.float64))
    fun = lambda v: 0.5 * v @ (A @ v)
    x = torch.ones(n, dtype=torch.float64)
    core = core_on(x, model="lbfgs", norm="inf", radius=0.01, max_radius=0.1, eta2=0.99)
    evaluate = evaluator(x, fun)
    core.run(evaluate, 1)
    assert len(core.qn) == 1
    before, r = x.clone(), core.radius
    core.run(evaluate, 1, loss=float(fun(x)))
    s = x - before
    assert core.counters.accepted == 2 and core.counters.fallbacks == 0
    assert float(s.abs().max()) == pytest.approx(r, rel=1e-12)          # the whole box
    assert float(s.norm()) > 0.9 * r * math.sqrt(n)
    assert core.radius == min(2 * r, 0.1)                               # a boundary step grows it


class FakeAgree:
    """agree() of a rank that receives another rank's values: position -> value to substitute."""

    def __init__(self, substitute):
        self.calls, self.substitute = [], substitute

    def __call__(self, values):
        self.calls.append(list(values))
        return [self.substitute.get((len(self.calls) - 1, i), v) for i, v in enumerate(values)]


def test_agree_decides_the_branch_not_the_local_values():
    fun = lambda v: (v ** 2).sum()
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # the local trial is a clear success; the agreed trial loss (another rank's) is larger than f
    agree = FakeAgree({(1, 0): 10.0})
    core = core_on(x, radius=0.1, max_radius=1.0)
    core.run(evaluator(x, fun), 1, agree=agree)
    assert [len(c) for c in agree.calls] == [2, 2]
    assert agree.calls[0][1] == 0.0 and agree.calls[1][1] == 1.0        # [pred, stop], [trial, finite]
    assert core.counters.rejected == 1 and torch.equal(x, torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert core.counters.rho == pytest.approx((2.0 - 10.0) / agree.calls[0][0])
    # the agreed pred is the one rho uses
    x2 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    agree = FakeAgree({(0, 0): 1e3})
    core = core_on(x2, radius=0.1, max_radius=1.0)
    core.run(evaluator(x2, fun), 1, agree=agree)
    assert core.counters.rho == pytest.approx((2.0 - agree.calls[1][0]) / 1e3)
    assert core.counters.rejected == 1
    # an agreed stop flag ends the run before any trial; an agreed non-finite flag rejects
    x3 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    core = core_on(x3, radius=0.1, max_radius=1.0)
    core.run(evaluator(x3, fun), 3, agree=FakeAgree({(0, 1): 1.0}))
    assert core.counters.loss_evals == 1
    core.run(evaluator(x3, fun), 1, agree=FakeAgree({(1, 1): 0.0}))
    assert core.counters.rejected == 1 and core.counters.nonfinite == 1


def test_trust_region_passes_agree_to_the_engine():
    x = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    agree = FakeAgree({})
    opt = TrustRegion([x], radius=0.01, max_iters=2, agree=agree)
    assert "agree" not in opt.param_groups[0]
    opt.step(quadratic_closure(x, torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)))
    assert len(agree.calls) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_boxed_first_order_step_equals_the_host_formula_bitwise(dtype, norm):
    """The step formed on the device (factor -r/||g|| in float64, rounded to the dtype) and its
    decrease read in the same transfer as the norms: bitwise the step formed from host floats,
    clipped to the box, and -g^T s of that step."""
    from apts_mpi.decomposition import Subdomain
    from apts_mpi.trust_region import TrustRegionConfig, TrustRegionCore
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, generator=g, dtype=dtype)
    core = TrustRegionCore(Subdomain.whole([x]), TrustRegionConfig(norm=norm))
    core.grad.copy_(torch.randn(50, generator=g, dtype=dtype))
    core.offset = torch.randn(50, generator=g, dtype=dtype) * 0.01
    r, box = 0.013, 0.015
    pred, _ = core._propose(r, box=box)
    grad = core.grad
    g_norm = float(grad.abs().max()) if norm == "inf" else math.sqrt(float(grad.dot(grad)))
    s = torch.mul(grad, -r / g_norm)
    s = (s + core.offset).clamp(-box, box) - core.offset
    assert torch.equal(core.step, s)
    assert pred == -float(grad.dot(s))


# -- the local run with every decision on the device ----------------------------------------------
def _nan_outside(x):
    return torch.where(x.abs().max() > 1.2, torch.full((), math.nan, dtype=x.dtype), -(x ** 2).sum())


DEVICE_CASES = {  # name: (fun, x0, engine constants, box, iterations)
    "rosenbrock, rejections": (rosenbrock, [-1.2, 1.0, 0.5, -0.3], dict(radius=1.0, max_radius=4.0), None, 9),
    "boxed, 2-norm": (rosenbrock, [-1.2, 1.0, 0.5, -0.3], dict(radius=0.5, max_radius=1.0, norm="2"), 0.3, 7),
    "sign step in a box": (beale, [1.0, 1.0], dict(radius=0.1, step="sign"), 0.05, 6),
    "zero gradient stops": (lambda x: (x * 0).sum() + 1, [0.3, -0.2], dict(radius=0.1), 0.2, 4),
    "full box stops": (lambda x: x.sum() * 3, [0.3, -0.2, 0.1], dict(radius=1.0, max_radius=1.0, step="sign"), 0.01, 5),
    "rejection at the floor stops": (lambda x: 100 * (x ** 4).sum(), [1.0, -1.0],
                                     dict(radius=5.0, min_radius=5.0, max_radius=5.0), None, 4),
    "non-finite trials": (_nan_outside, [1.0, 0.9], dict(radius=0.8, max_radius=1.0), None, 6),
    "rounding level": (lambda x: 1 + 1e-30 * x.sum(), [0.0, 0.0], dict(radius=0.01), None, 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(DEVICE_CASES))
def test_run_on_device_equals_the_host_run_bitwise(case, dtype):
    """Branch-free decisions on the device against the host-branching run: the same iterate, loss,
    radius, rho, accepted/rejected/non-finite counts, accumulated step and gradient, bit for bit,
    including runs that the host stops early (zero gradient, full box, rejection at the floor)."""
    fun, x0, constants, box, iters = DEVICE_CASES[case]
    results = []
    for device_run in (False, True):
        x = torch.tensor(x0, dtype=dtype)
        core = core_on(x, **constants)
        evaluate = evaluator(x, fun)
        loss0 = evaluate(core.grad)
        if device_run:
            loss, = core.run_on_device(evaluate, iters, loss0, box=box)
        else:
            loss = core.run(evaluate, iters, loss=float(loss0), box=box, loss_only=True)
        c = core.counters
        results.append(dict(x=x.clone(), loss=loss, radius=core.radius, rho=c.rho,
                            counts=(c.accepted, c.rejected, c.nonfinite), current=core.grad_current,
                            grad=core.grad.clone() if core.grad_current else None,
                            offset=None if box is None else core.offset.clone(), evals=c.loss_evals))
    host, device = results
    assert torch.equal(device.pop("x"), host.pop("x"))
    for key in ("grad", "offset"):
        a, b = host.pop(key), device.pop(key)
        assert (a is None and b is None) or torch.equal(a, b), key
    assert device.pop("evals") == iters >= host.pop("evals")  # every iteration evaluates
    assert device == host or (math.isnan(host["rho"]) and math.isnan(device["rho"])
                              and {**device, "rho": 0} == {**host, "rho": 0})


def test_run_on_device_needs_the_first_order_model():
    x = torch.zeros(3, dtype=torch.float64)
    core = core_on(x, model="lbfgs")
    with pytest.raises(ValueError, match="first-order"):
        core.run_on_device(evaluator(x, lambda v: (v ** 2).sum()), 2, 0.0)
