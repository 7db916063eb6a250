"""APTS local phases on part of the minibatch (``local_batch``) and in the data space (``space:
data``, APTS_D) on one process: against TrustRegion and autograd in float64, resume, validation."""
import pytest
import torch

from apts_mpi import APTS, TrustRegion
from apts_mpi.objective import Objective
from apts_mpi.trust_region import TrustRegionCore

from conftest import flat, problem

CE = torch.nn.functional.cross_entropy


def full_gradient(model, x, y):
    """f and grad f on the whole minibatch, by autograd (the independent reference)."""
    model.zero_grad()
    loss = CE(model(x), y)
    loss.backward()
    return loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


@pytest.mark.parametrize("kwargs", [dict(local_batch="shard"),
                                    dict(local_batch=0.999, micro_batch=7)])
def test_a_local_batch_that_is_the_whole_minibatch_gives_the_default_iterates(kwargs):
    """One subdomain: its shard, or every piece drawn, is the whole minibatch, so the stochastic
    path (f(theta_k) from the shared evaluation) must reproduce the default's bits."""
    model, x, y = problem()
    other, _, _ = problem()
    micro = kwargs.get("micro_batch")
    a = APTS(model, CE, subdomains=1, radius=0.05, global_iters=2, foc=True, micro_batch=micro)
    b = APTS(other, CE, subdomains=1, radius=0.05, global_iters=2, foc=True, **kwargs)
    accepted = []
    for _ in range(5):
        a.step(x, y)
        b.step(x, y)
        assert b.report.accepted == a.report.accepted and b.report.loss == a.report.loss
        accepted.append(a.report.accepted)
    assert torch.equal(flat(other), flat(model))
    assert any(accepted)


class Recording(Objective):
    """Summed cross-entropy that records the first input row of every part it is called on."""

    sequential_inputs = False  # no cached prefix: the parts reach the objective as cut

    def __init__(self):
        self.parts = []

    def __call__(self, model, part):
        self.parts.append((part[0][0].clone(), len(part[0])))
        return CE(model(part[0]), part[1], reduction="sum")


def test_a_fraction_draws_whole_pieces_per_iteration_and_subdomain():
    """local_batch 0.5 with 12 pieces of 10: each local phase evaluates 6 distinct pieces of the
    iteration's cuts, drawn anew per (iteration, subdomain), the same again from the same seed."""
    model, x, y = problem()
    starts = {tuple(x[i].tolist()): i for i in range(0, 120, 10)}  # first row -> piece
    drawn = []
    for _ in range(2):
        model, _, _ = problem()
        objective = Recording()
        opt = APTS(model, objective, subdomains=2, local_batch=0.5, micro_batch=10, global_iters=0,
                   local_iters=1, acceptance="none", seed=5)
        runs = []
        for _ in range(2):
            objective.parts.clear()
            opt.step(x, y)
            # per local phase: 6 pieces at u = 0 and 6 at its one trial; then the shared trial (12)
            calls = objective.parts[12:]  # after the shared evaluation of f(theta_k) (12 pieces)
            for d in range(2):
                phase = calls[12 * d:12 * d + 6]
                assert all(n == 10 for _, n in phase)
                pieces = sorted(starts[tuple(r.tolist())] for r, _ in phase)
                assert len(set(pieces)) == 6
                runs.append(pieces)
        drawn.append(runs)
    assert drawn[0] == drawn[1]                # a function of (seed, iteration, subdomain)
    assert len({tuple(p) for p in drawn[0]}) > 1  # not the same pieces everywhere


def capture_local_runs(monkeypatch):
    """Record, for each local phase, its closure's loss and gradient at u = 0, the gradient the
    engine starts from, and a central difference of the closure along a random direction."""
    run, seen = TrustRegionCore.run, []

    def checking_run(self, evaluate, *args, **kwargs):
        if kwargs.get("box") is not None:  # a local phase (the global pass has no box)
            n = self.subdomain.numel
            out = torch.empty(n, dtype=torch.float64)
            loss0 = float(evaluate(out))
            v = torch.randn(n, generator=torch.Generator().manual_seed(len(seen)), dtype=torch.float64)
            h = 1e-5
            self.subdomain.add_(v, alpha=h)
            plus = float(evaluate(None))
            self.subdomain.add_(v, alpha=-2 * h)
            minus = float(evaluate(None))
            self.subdomain.add_(v, alpha=h)
            seen.append(dict(loss0=loss0, grad=out, start=self.grad.clone(),
                             slope=(plus - minus) / (2 * h), v=v))
        return run(self, evaluate, *args, **kwargs)

    monkeypatch.setattr(TrustRegionCore, "run", checking_run)
    return seen


@pytest.mark.parametrize("kwargs", [dict(space="data"), dict(local_batch="shard", foc=True),
                                    dict(local_batch=0.5, micro_batch=20, foc=True)])
def test_foc_term_makes_each_local_model_first_order_consistent(monkeypatch, kwargs):
    """With the FOC term, each local objective on its part of the minibatch has at u = 0 the
    gradient of f on the whole minibatch (restricted to its subdomain): autograd and a central
    difference agree.  Its value is the part's loss, not f."""
    seen = capture_local_runs(monkeypatch)
    model, x, y = problem()
    f, g = full_gradient(model, x, y)
    opt = APTS(model, CE, subdomains=2, **kwargs)
    opt.step(x, y)
    assert len(seen) == 2
    for d, phase in enumerate(seen):
        a, b = (0, g.numel()) if kwargs.get("space") == "data" else (opt.offsets[d], opt.offsets[d + 1])
        torch.testing.assert_close(phase["grad"], g[a:b], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(phase["start"], g[a:b], rtol=1e-10, atol=1e-12)
        assert phase["slope"] == pytest.approx(float(g[a:b].dot(phase["v"])), rel=1e-6)
        assert phase["loss0"] != pytest.approx(f, rel=1e-6)  # a part, not the whole minibatch


def test_data_space_with_one_shard_is_a_trust_region_on_the_whole_batch():
    """N = 1, one local iteration, no global pass, local budget Delta: the shard is the whole
    minibatch, the FOC term vanishes, pred = -g^T s is the first-order model's decrease of the
    Cauchy step, so each iteration is one TrustRegion step with the same constants, accepts,
    rejections and radius included."""
    constants = dict(radius=0.5, max_radius=2.0, eta1=0.6, eta2=0.9)
    model, x, y = problem()
    ref_model, _, _ = problem()
    apts = APTS(model, CE, space="data", subdomains=1, local_iters=1, global_iters=0, **constants)
    tr = TrustRegion(ref_model.parameters(), **constants)
    decisions = []
    for _ in range(8):
        apts.step(x, y)

        def closure():
            tr.zero_grad()
            loss = CE(ref_model(x), y)
            loss.backward()
            return loss
        before = tr.counters.accepted
        tr.step(closure)
        decisions.append(apts.report.accepted)
        assert apts.report.accepted == (tr.counters.accepted > before)
        assert apts.radius == tr.radius
        torch.testing.assert_close(flat(model), flat(ref_model), rtol=1e-12, atol=1e-14)
    assert any(decisions) and not all(decisions)


@pytest.mark.parametrize("subdomains", [2, 3])
def test_data_space_pred_is_the_first_order_decrease_of_the_averaged_step(subdomains):
    """pred of the averaged correction s is -grad f(theta_k)^T s (autograd on the whole batch),
    and ||s||_inf stays within the local budget."""
    model, x, y = problem()
    opt = APTS(model, CE, space="data", subdomains=subdomains, global_iters=0, radius=0.05,
               local_fraction=0.5, acceptance="none")
    for _ in range(3):
        theta = flat(model)
        f, g = full_gradient(model, x, y)
        opt.step(x, y)
        s = flat(model) - theta
        assert opt.report.loss == pytest.approx(f, rel=1e-12)
        assert opt.report.pred == pytest.approx(-float(g.dot(s)), rel=1e-10)
        assert opt.report.pred > 0
        assert float(s.abs().max()) <= 0.5 * 0.05 * (1 + 1e-12)


@pytest.mark.parametrize("subdomains, local_iters", [(2, 1), (3, 3)])
def test_data_space_with_identical_shards_predicts_the_actual_decrease(subdomains, local_iters):
    """Every shard holds the same 40 samples, so every local phase minimises the same function
    (the FOC term is zero) and the averaged correction is each shard's.  The predicted decrease
    must then be the decrease of f itself to first order: measured against f evaluated here at
    theta_k and theta_k + s, actual - pred = O(||s||^2), so halving the radius halves pred and
    divides the gap by about four, and rho -> 1."""
    model0, x, y = problem()
    xs, ys = x[:40].repeat(subdomains, 1), y[:40].repeat(subdomains)
    preds, gaps = [], []
    for radius in (2e-3, 1e-3, 5e-4):
        model, _, _ = problem()
        opt = APTS(model, CE, space="data", subdomains=subdomains, local_iters=local_iters,
                   global_iters=0, local_fraction=1.0, radius=radius, acceptance="none")
        with torch.no_grad():
            before = CE(model(xs), ys).item()
            opt.step(xs, ys)
            after = CE(model(xs), ys).item()
        actual, pred = before - after, opt.report.pred
        assert opt.report.loss == pytest.approx(before, rel=1e-12)
        assert pred > 0 and actual == pytest.approx(pred, rel=0.05)
        preds.append(pred)
        gaps.append(abs(actual - pred))
    for a, b in zip(preds, preds[1:]):
        assert a / b == pytest.approx(2, rel=0.05)
    for a, b in zip(gaps, gaps[1:]):
        assert 3 < a / b < 5, gaps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [
    dict(subdomains=2),
    dict(subdomains=3, foc=True, local_batch="shard", micro_batch=15, global_iters=2),
    dict(subdomains=2, space="data", norm="2", local_iters=4),
    dict(subdomains=2, step="sign", local_fraction=0.1, local_batch=0.5, micro_batch=20,
         acceptance="nonmonotone"),
    dict(subdomains=2, radius=0.09, max_radius=0.1, local_fraction=0.5, local_iters=8),
])
def test_local_decisions_on_the_device_give_the_host_iterates(kwargs, dtype):
    """local_decisions='device' (branch-free local phases, one transfer each) against the default
    host-branching local phases: the same parameters bit for bit and the same reports; only the
    local evaluation counts may grow (a stopped local phase keeps evaluating its unchanged point)."""
    model, x, y = problem(dtype=dtype)
    other, _, _ = problem(dtype=dtype)
    constants = {"radius": 0.05, **kwargs}
    host = APTS(model, CE, **constants)
    device = APTS(other, CE, local_decisions="device", **constants)
    seen = set()
    for _ in range(6):
        host.step(x, y)
        device.step(x, y)
        a, b = vars(host.report), vars(device.report)
        for key in ("loss", "trial_loss", "final_loss", "pred", "rho", "accepted", "radius", "step_inf"):
            assert b[key] == a[key], key
        assert b["local_loss_evals"] >= a["local_loss_evals"]
        seen.add(a["accepted"])
        assert torch.equal(flat(other), flat(model))
    for d, core in host.local.items():
        c, e = core.counters, device.local[d].counters
        assert (e.accepted, e.rejected, e.rho, e.radius) == (c.accepted, c.rejected, c.rho, c.radius)
    assert True in seen


@pytest.mark.parametrize("kwargs, message", [
    (dict(local_batch=0), "local_batch must be a fraction in (0, 1] or 'shard'"),
    (dict(local_batch="half"), "local_batch must be a fraction in (0, 1] or 'shard'"),
    (dict(space="tensors"), "space must be one of parameters, data"),
    (dict(space="data", replicas=2), "does not combine with replicas > 1"),
    (dict(space="data", local_batch=0.5), "local_batch applies to space='parameters'"),
    (dict(local_decisions="device", local_model="lbfgs"), "local_decisions='device' needs local_model"),
    (dict(local_decisions="gpu"), "local_decisions must be one of host, device"),
])
def test_bad_keywords_raise_one_clear_message(kwargs, message):
    model, _, _ = problem()
    with pytest.raises(ValueError) as err:
        APTS(model, CE, **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs", [dict(), dict(space="data")])
def test_device_decisions_read_the_device_once_per_local_phase(monkeypatch, kwargs):
    """Every read of a tensor's value on the host (tolist, item, float, int, bool) counted during
    the local phases: 2 per local iteration and f_d(0) on the host path (5 iterations: 11), one
    per local phase with local_decisions='device'."""
    reads = []
    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        def counted(self, *args, _read=getattr(torch.Tensor, name), **kw):
            reads.append(1)
            return _read(self, *args, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    per_phase = {}
    for decisions in ("host", "device"):
        model, x, y = problem(dtype=torch.float32)
        opt = APTS(model, CE, subdomains=2, radius=0.05, local_decisions=decisions, **kwargs)
        phase, counts = opt._local_phase, []

        def counted_phase(*args):
            before = len(reads)
            out = phase(*args)
            counts.append(len(reads) - before)
            return out
        opt._local_phase = counted_phase
        opt.step(x, y)
        per_phase[decisions] = counts
    assert per_phase == {"host": [11, 11], "device": [1, 1]}


@pytest.mark.parametrize("kwargs", [dict(subdomains=3, local_batch="shard", foc=True, micro_batch=15),
                                    dict(subdomains=2, space="data", global_iters=2)])
def test_a_shard_local_phase_takes_f_d0_from_the_start_evaluation(kwargs):
    """With one share per local phase, f_d(0) and its gradient come from the start evaluation's
    sums of that share: the same iterates and decisions as evaluating the share again (float64,
    to rounding), and exactly one local evaluation fewer per subdomain and iteration."""
    model, x, y = problem()
    other, _, _ = problem()
    reuse = APTS(model, CE, radius=0.05, **kwargs)
    again = APTS(other, CE, radius=0.05, **kwargs)
    assert reuse.evaluator.reuse_start
    again.evaluator.reuse_start = False  # evaluate f_d(0) in the local phase, as without the reuse
    for _ in range(5):
        reuse.step(x, y)
        again.step(x, y)
        a, b = vars(reuse.report), vars(again.report)
        assert a["accepted"] == b["accepted"]
        for key in ("loss", "trial_loss", "final_loss", "pred", "radius"):
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-15), key
        assert b["local_grad_evals_total"] - a["local_grad_evals_total"] == kwargs["subdomains"]
        assert b["local_loss_evals_total"] - a["local_loss_evals_total"] == kwargs["subdomains"]
    assert torch.allclose(flat(model), flat(other), rtol=0, atol=1e-13)
