"""APTS on one process: against TrustRegion, cached prefixes, bounds, faults, validation."""
import math

import pytest
import torch

from apts_mpi import APTS, TrustRegion
from apts_mpi.optimizers import RECORD_FIELDS
from apts_mpi.objective import Objective
from conftest import flat, problem


class Wrapped(torch.nn.Module):
    """The same network, not an nn.Sequential: APTS cannot cache a frozen prefix for it."""

    def __init__(self, seq):
        super().__init__()
        self.seq = seq

    def forward(self, x):
        return self.seq(x)


def test_one_subdomain_one_local_iteration_equals_a_trust_region_step():
    """N = 1, one local iteration, no global pass, acceptance none: a TrustRegion step (inf-norm
    Cauchy point of radius Delta), as long as the local step is accepted and the radius stays (it
    starts at its maximum; under acceptance none only a global pass would change it)."""
    model, x, y = problem()
    ref_model, _, _ = problem()
    apts = APTS(model, torch.nn.functional.cross_entropy, subdomains=1, local_iters=1, global_iters=0,
                acceptance="none", radius=0.05, max_radius=0.05)
    tr = TrustRegion(ref_model.parameters(), radius=0.05, max_radius=0.05)
    for _ in range(4):
        apts.step(x, y)

        def closure():
            tr.zero_grad()
            loss = torch.nn.functional.cross_entropy(ref_model(x), y)
            loss.backward()
            return loss
        tr.step(closure)
        torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-12, atol=1e-14)
    assert tr.counters.accepted == 4


@pytest.mark.parametrize("decomposition", ["balanced", "flat", "random-tensors"])
def test_cached_prefix_gives_the_same_iterates(decomposition):
    model, x, y = problem()
    plain, _, _ = problem()
    kw = dict(subdomains=3, decomposition=decomposition, seed=1, radius=0.05)
    a = APTS(model, torch.nn.functional.cross_entropy, **kw)
    b = APTS(Wrapped(plain), torch.nn.functional.cross_entropy, **kw)
    for _ in range(4):
        a.step(x, y)
        b.step(x, y)
        assert a.report.accepted == b.report.accepted
    torch.testing.assert_close(flat(model), flat(plain), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_assembled_step_respects_the_global_radius(fraction):
    model, x, y = problem()
    opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=3, radius=0.05,
               local_fraction=fraction, global_iters=0)
    for _ in range(5):
        radius = opt.radius
        before = flat(model)
        opt.step(x, y)
        r = opt.report
        assert r.step_inf <= fraction * radius * (1 + 1e-12)
        if r.accepted:
            assert (flat(model) - before).abs().max() <= fraction * radius * (1 + 1e-12)
        assert r.local_loss_evals <= 3 * (1 + opt.local_iters)


def test_nonfinite_trial_is_rejected_in_every_mode_and_parameters_restored():
    for acceptance in ("ratio", "none", "nonmonotone"):
        model, x, y = problem()
        calls = {"n": 0}

        def loss_fn(out, target):
            calls["n"] += 1
            loss = torch.nn.functional.cross_entropy(out, target)
            # 2 subdomains x 6 local evaluations x 2 shares (the serial emulation cuts the batch
            # as 2 ranks do), then the trial's first share
            return loss * math.nan if calls["n"] == 25 else loss

        opt = APTS(model, loss_fn, subdomains=2, acceptance=acceptance, global_iters=0)
        before = flat(model)
        opt.step(x, y)
        assert not math.isfinite(opt.report.trial_loss)
        assert not opt.report.accepted
        assert torch.equal(flat(model), before)


def test_nonmonotone_accepts_against_the_window():
    """With the reference max(f_k, window), a step that raises the loss a little can be accepted."""
    model, x, y = problem()
    opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=2, acceptance="nonmonotone",
               window=3, global_iters=0)
    opt.history.extend([10.0])  # an earlier, much larger loss in the window
    f0 = torch.nn.functional.cross_entropy(model(x), y).item()
    opt.step(x, y)
    expected = (10.0 - opt.report.trial_loss) / opt.report.pred
    assert opt.report.rho == pytest.approx(expected)
    assert opt.report.loss == pytest.approx(f0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(subdomains=7), "exceeds the 6 parameter tensors"),
    (dict(replicas=2), "world size 1 is not divisible by replicas=2"),
    (dict(acceptance="sometimes"), "acceptance must be one of"),
    (dict(local_iters=0), "local_iters must be an integer >= 1"),
    (dict(local_fraction=1.5), "local_fraction must lie in (0, 1]"),
    (dict(local_model="newton"), "local_model and global_model"),
    (dict(decomposition="layers"), "decomposition must be one of"),
    (dict(eta1=0.9, eta2=0.5), "0 < eta1 < eta2 < 1"),
])
def test_bad_keywords_raise_one_clear_message(kwargs, message):
    model, _, _ = problem()
    with pytest.raises(ValueError) as err:
        APTS(model, torch.nn.functional.cross_entropy, **kwargs)
    assert message in str(err.value)


SCALED = dict(radius=0.1, max_radius=1.0, eta1=0.5, eta2=0.9)


@pytest.mark.parametrize("kwargs", [
    dict(local_model="lsr1", acceptance="nonmonotone"),
    dict(space="data", local_model="lsr1"),
    dict(local_batch=0.4, micro_batch=9, foc=True),
    dict(SCALED, scaling="adam"),
    dict(SCALED, scaling="adam", local_model="lbfgs", global_model="lsr1", norm="2"),
    dict(SCALED, scaling="adam", step="sign", radius_control="combined", damping=True),
    dict(SCALED, step="adam", radius_control="combined", global_iters=2),
    dict(SCALED, space="data", data_pred="local", scaling="adam", damping=True),
], ids=["lsr1-nonmonotone", "data-space", "stochastic", "scaled", "scaled-qn",
        "scaled-sign-combined-damped", "adam-combined", "data-local"])
def test_state_dict_round_trip_continues_identically(kwargs):
    """Bitwise, also where the local phases draw their pieces from (seed, iteration, subdomain),
    the scaling's moments and the global pass's own radius (radius_control: combined)."""
    def make():
        model, x, y = problem()
        return model, x, y, APTS(model, torch.nn.functional.cross_entropy, subdomains=2, seed=4,
                                 **kwargs)
    model, x, y, opt = make()
    for _ in range(3):
        opt.step(x, y)
    params, state = flat(model), opt.state_dict()
    for _ in range(3):
        opt.step(x, y)
    model2, _, _, opt2 = make()
    torch.nn.utils.vector_to_parameters(params, model2.parameters())
    opt2.load_state_dict(state)
    for _ in range(3):
        opt2.step(x, y)
    assert torch.equal(flat(model2), flat(model))
    assert opt2.radius == opt.radius and opt2.global_core.radius == opt.global_core.radius


def test_micro_batches_give_the_same_iterates():
    model, x, y = problem()
    chunked, _, _ = problem()
    a = APTS(model, torch.nn.functional.cross_entropy, subdomains=2, radius=0.05)
    b = APTS(chunked, torch.nn.functional.cross_entropy, subdomains=2, radius=0.05, micro_batch=7)
    for _ in range(4):
        a.step(x, y)
        b.step(x, y)
        assert a.report.accepted == b.report.accepted
        assert b.report.loss == pytest.approx(a.report.loss, rel=1e-13)
    torch.testing.assert_close(flat(chunked), flat(model), rtol=1e-12, atol=1e-14)


class WeightedLoss(Objective):
    """Cross-entropy weighted per sample by the batch's third tensor, as a sum over the part; it
    declares no sequential inputs, so APTS must not cache a frozen prefix for it."""

    def __call__(self, model, part):
        x, y, w = part
        return (w * torch.nn.functional.cross_entropy(model(x), y, reduction="none")).sum()


def test_generic_minibatch_with_an_objective_matches_the_loss_function():
    """A three-tensor minibatch with unit weights is the plain cross-entropy problem; the single
    tuple form of step is the two-argument form."""
    model, x, y = problem()
    generic, _, _ = problem()
    a = APTS(model, torch.nn.functional.cross_entropy, subdomains=3, radius=0.05, micro_batch=50)
    b = APTS(generic, WeightedLoss(), subdomains=3, radius=0.05, micro_batch=50)
    w = torch.ones(len(y), dtype=x.dtype)
    for _ in range(4):
        a.step((x, y))
        b.step(x, y, w)
        assert a.report.accepted == b.report.accepted
    torch.testing.assert_close(flat(generic), flat(model), rtol=1e-12, atol=1e-14)


def test_record_holds_the_iteration_values():
    model, x, y = problem()
    opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=2)
    f0 = torch.nn.functional.cross_entropy(model(x), y).item()
    opt.step(x, y)
    row, r = opt.record(), opt.report
    assert set(row) == set(RECORD_FIELDS)
    assert row["loss"] == pytest.approx(f0, rel=1e-12)
    assert row["final_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(model(x), y).item(), rel=1e-12)
    assert row["accepted"] == int(r.accepted) and row["nonfinite"] == 0
    assert row["loss_evals"] == r.local_loss_evals_total + r.global_loss_evals
    assert row["grad_evals"] == r.local_grad_evals_total + r.global_grad_evals


class CountingLoss(Objective):
    """Summed cross-entropy that counts its calls, and those made with gradients enabled."""

    def __init__(self):
        self.calls = self.grad_calls = 0

    def __call__(self, model, part):
        self.calls += 1
        self.grad_calls += torch.is_grad_enabled()
        return torch.nn.functional.cross_entropy(model(part[0]), part[1], reduction="sum")


@pytest.mark.parametrize("subdomains, foc, global_iters", [
    (1, True, 2), (1, True, 0), (2, False, 2), (2, True, 2), (2, True, 0)])
def test_reported_evaluations_are_the_objective_calls(subdomains, foc, global_iters):
    """Every evaluation is counted, the FOC term's included.  The serial emulation of N subdomains
    evaluates f on the N shares an N-rank run would, so one evaluation is N objective calls."""
    model, x, y = problem()
    objective = CountingLoss()
    opt = APTS(model, objective, subdomains=subdomains, foc=foc, global_iters=global_iters)
    loss_evals = grad_evals = 0
    for _ in range(3):
        opt.step(x, y)
        loss_evals += opt.record()["loss_evals"]
        grad_evals += opt.record()["grad_evals"]
    assert objective.calls == subdomains * loss_evals
    assert objective.grad_calls == subdomains * grad_evals


def test_closures_evaluate_the_loss_alone_without_a_gradient(monkeypatch):
    """The engine may call APTS's closures with grad_out=None: the loss, no gradient computed."""
    from apts_mpi.trust_region import TrustRegionCore
    run = TrustRegionCore.run
    seen = []

    def checking_run(self, evaluate, *args, **kwargs):
        before = objective.grad_calls
        seen.append((float(evaluate()), objective.grad_calls - before))
        return run(self, evaluate, *args, **kwargs)

    monkeypatch.setattr(TrustRegionCore, "run", checking_run)
    model, x, y = problem()
    objective = CountingLoss()
    opt = APTS(model, objective, subdomains=2, foc=True, global_iters=1)
    f0 = torch.nn.functional.cross_entropy(model(x), y).item()
    opt.step(x, y)
    assert len(seen) == 3 and all(grads == 0 for _, grads in seen)
    for loss, _ in seen[:2]:  # the local phases start at theta_k, where the FOC term is 0
        assert loss == pytest.approx(f0, rel=1e-12)


def test_rho_compares_one_function_with_batch_norm():
    """With batch norm, f depends on how the minibatch is cut.  f(theta_k) and the trial loss are
    both the sum over the same pieces: the serial emulation's 2 shares (those of a 2-rank run),
    each cut into micro-batches of 7, evaluated here independently at theta_k and theta_k + s."""
    import copy
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3)).double()
    _, x, y = problem()

    def f(net):
        total = 0.0
        for half in (slice(0, 60), slice(60, 120)):
            for start in range(half.start, half.stop, 7):
                part = slice(start, min(start + 7, half.stop))
                total += torch.nn.functional.cross_entropy(net(x[part]), y[part], reduction="sum").item()
        return total / len(y)

    opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=2, micro_batch=7,
               acceptance="none", global_iters=0, radius=0.05)
    for _ in range(3):
        before = copy.deepcopy(model)
        opt.step(x, y)
        assert opt.report.accepted
        assert opt.report.loss == pytest.approx(f(before), rel=1e-12)
        assert opt.report.trial_loss == pytest.approx(f(model), rel=1e-12)
        assert opt.report.rho == pytest.approx((f(before) - f(model)) / opt.report.pred, rel=1e-9)


def test_bf16_autocast_differs_from_float32_by_rounding_only():
    """autocast="bf16": the local phases' forward passes run in bfloat16 (seen by a hook); over two
    iterations (before a local accept/reject decision can flip on a rounding difference) the
    iterates stay within a few bfloat16 units (2^-8) of the float32 run's relative to the distance
    travelled, with the same decisions; losses stay Python floats of the float32 evaluation."""
    runs = {}
    for mode in ("none", "bf16"):
        model, x, y = problem(dtype=torch.float32)
        seen = set()
        model[0].register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        theta0 = flat(model)
        opt = APTS(model, torch.nn.functional.cross_entropy, subdomains=3, radius=0.05, autocast=mode)
        iterates, accepts, losses = [], [], []
        for _ in range(2):
            losses.append(opt.step(x, y))
            accepts.append(opt.report.accepted)
            iterates.append(flat(model))
        runs[mode] = (iterates, theta0, accepts, losses, seen)
    t32, theta0, acc32, loss32, seen32 = runs["none"]
    tbf, _, accbf, lossbf, seenbf = runs["bf16"]
    assert seen32 == {torch.float32} and seenbf == {torch.float32, torch.bfloat16}
    assert accbf == acc32 and all(acc32)
    for a, b in zip(t32, tbf):
        diff, travelled = float((b - a).norm()), float((a - theta0).norm())
        assert 0 < diff <= 2 ** -5 * travelled
    assert all(isinstance(v, float) for v in lossbf)
    assert max(abs(a - b) for a, b in zip(loss32, lossbf)) <= 2 ** -8 * max(loss32)
