"""The optimiser interface and the data-parallel baselines, through the training loop, on one process.

References: torch's own optimisers (and the ``schedulefree`` package) stepped by a plain loop over
the same minibatches, in float64.
"""
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI

from apts_mpi import APTS, config
from apts_mpi.data import MinibatchSampler
from apts_mpi.objective import SampleLoss
from apts_mpi.optimizers import RECORD_FIELDS, AdamThenAPTS, AdamThenLBFGS
from apts_mpi.problems import PROBLEMS
from apts_mpi.problems.base import Problem
from apts_mpi.results import read_metrics
from apts_mpi.train import EPOCH_SERIES, Experiment, train

SMALL = {"data": {"batch_size": 300}, "model": {"dtype": "float64"}, "epochs": 2}


def cfg(method, **keywords):
    return config.resolve({**SMALL, "optimizer": {"method": method, **keywords}})


def reference(c, make_optimizer, epoch_end=lambda opt: None):
    """The parameters after a plain loop: torch's optimiser, mean cross-entropy, the same batches."""
    problem = PROBLEMS[c["data"]["dataset"]](c, torch.device("cpu"), torch.float64)
    torch.manual_seed(c["seed"])
    model = problem.build_model()
    opt = make_optimizer(model.parameters())
    sampler = MinibatchSampler(problem.n_train, c["data"]["batch_size"], c["data"]["overlap"], c["seed"])
    for epoch in range(c["epochs"]):
        for idx in sampler.epoch_batches(epoch):
            x, y = problem.batch(idx)

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        epoch_end(opt)
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def trained(c, tmp_path):
    ex = Experiment(c, MPI.COMM_SELF).build()
    epochs = train(c, tmp_path / "run", MPI.COMM_SELF, experiment=ex)
    return torch.nn.utils.parameters_to_vector(ex.model.parameters()).detach(), epochs, ex


@pytest.mark.parametrize("method, keywords, make", [
    ("adamw", {"lr": 3e-3, "weight_decay": 0.05},
     lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05)),
    ("adam", {"lr": 3e-3}, lambda p: torch.optim.Adam(p, lr=3e-3)),
    ("sgd", {"lr": 0.05, "momentum": 0.9}, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    ("lbfgs", {"history_size": 5, "max_iter": 3, "tolerance_grad": 0, "tolerance_change": 0.0},
     lambda p: torch.optim.LBFGS(p, history_size=5, max_iter=3, line_search_fn="strong_wolfe",
                                 tolerance_grad=0, tolerance_change=0.0)),
])
def test_baseline_equals_torch_optimizer_in_a_plain_loop(tmp_path, method, keywords, make):
    c = cfg(method, **keywords)
    mine, epochs, _ = trained(c, tmp_path)
    torch.testing.assert_close(mine, reference(c, make), rtol=1e-10, atol=1e-12)
    assert epochs["test_accuracy"][-1] > 0.5


def test_schedulefree_evaluates_at_the_average_and_trains_at_the_gradient_point(tmp_path):
    import schedulefree

    def make(params):
        opt = schedulefree.AdamWScheduleFree(params, lr=2.5e-3)
        opt.train()
        return opt

    def epoch_end(opt):  # the loop's evaluation: eval() then train()
        opt.eval()
        opt.train()

    c = cfg("schedulefree", lr=2.5e-3)
    mine, epochs, ex = trained(c, tmp_path)
    torch.testing.assert_close(mine, reference(c, make, epoch_end), rtol=1e-10, atol=1e-12)
    assert ex.optimizer.optimizer.param_groups[0]["train_mode"]


def test_adam_then_lbfgs_switches_after_adam_steps():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=torch.float64)
    A = A @ A.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    x, x_ref = torch.zeros(6, dtype=torch.float64, requires_grad=True), torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = AdamThenLBFGS([x], lr=0.1, adam_steps=3, history_size=10, max_iter=20)
    adam = torch.optim.Adam([x_ref], lr=0.1)

    def closure_of(v, o):
        def closure():
            o.zero_grad()
            loss = 0.5 * v @ A @ v - b @ v
            loss.backward()
            return loss
        return closure
    for _ in range(3):
        opt.step(closure_of(x, opt))
        adam.step(closure_of(x_ref, adam))
        assert torch.equal(x, x_ref)
    assert opt.current is opt.lbfgs
    for _ in range(3):
        opt.step(closure_of(x, opt))
    solution = torch.linalg.solve(A, b)
    torch.testing.assert_close(x.detach(), solution, rtol=1e-4, atol=1e-5)  # L-BFGS stops at 1e-7 gradients
    # tolerances 0: the step call runs on past torch's stopping tests, closer to the solution
    ends = []
    for tolerances in ({}, {"tolerance_grad": 0, "tolerance_change": 0}):
        v = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        o = AdamThenLBFGS([v], lr=0.1, adam_steps=0, history_size=10, max_iter=20, **tolerances)
        o.step(closure_of(v, o))
        ends.append((o.lbfgs.state[v]["n_iter"], float((v.detach() - solution).abs().max())))
    (n_default, err_default), (n_zero, err_zero) = ends
    assert n_zero > n_default and err_default > 1e-7 > err_zero
    state = opt.state_dict()
    again = AdamThenLBFGS([x_ref], lr=0.1, adam_steps=3, history_size=10, max_iter=20)
    again.load_state_dict(state)
    assert again.steps == 6 and again.current is again.lbfgs


def test_adam_then_apts_is_adam_then_apts_from_adams_last_iterate(tmp_path):
    """The loop's adam-apts against torch's Adam for ``adam_steps`` batches, then a separate APTS
    (serial emulation, 2 subdomains) stepped on the following batches from where Adam ended."""
    apts_keywords = {"subdomains": 2, "local_iters": 3, "radius": 0.05, "max_radius": 0.5}
    c = cfg("adam-apts", lr=3e-3, adam_steps=4, **apts_keywords)
    mine, epochs, ex = trained(c, tmp_path)
    assert isinstance(ex.optimizer, AdamThenAPTS) and ex.optimizer.n_subdomains == 2
    problem = PROBLEMS[c["data"]["dataset"]](c, torch.device("cpu"), torch.float64)
    torch.manual_seed(c["seed"])
    model = problem.build_model()
    adam, apts = torch.optim.Adam(model.parameters(), lr=3e-3), None
    sampler = MinibatchSampler(problem.n_train, c["data"]["batch_size"], c["data"]["overlap"], c["seed"])
    steps = [idx for epoch in range(c["epochs"]) for idx in sampler.epoch_batches(epoch)]
    assert len(steps) > 6
    for k, idx in enumerate(steps):
        x, y = problem.batch(idx)
        if k < 4:
            adam.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            adam.step()
        else:
            apts = apts or APTS(model, torch.nn.functional.cross_entropy, None, seed=c["seed"], **apts_keywords)
            apts.step(x, y)
    torch.testing.assert_close(mine, torch.nn.utils.parameters_to_vector(model.parameters()).detach(),
                               rtol=1e-10, atol=1e-12)
    iterations, _, _ = read_metrics(tmp_path / "run" / "metrics.h5")
    assert np.isnan(iterations["radius"][:4]).all() and np.isfinite(iterations["radius"][4:]).all()
    assert (iterations["grad_evals"][:4] == 1).all() and (iterations["grad_evals"][4:] > 1).all()
    assert ex.optimizer.radius == apts.radius


@pytest.mark.parametrize("method", ["schedulefree", "adam-lbfgs", "adamw", "adam-apts"])
def test_resume_is_bitwise_for_the_new_baselines(tmp_path, method):
    keywords = {"adam-lbfgs": {"adam_steps": 5},
                "adam-apts": {"adam_steps": 3, "subdomains": 2}}.get(method, {})
    whole = cfg(method, **keywords)
    trained(whole, tmp_path / "whole")
    first = config.resolve({**SMALL, "epochs": 1, "optimizer": {"method": method, **keywords}})
    train(first, tmp_path / "split" / "run", MPI.COMM_SELF)
    train(whole, tmp_path / "split" / "run", MPI.COMM_SELF, resume=True)
    a, b = (read_metrics(tmp_path / p / "run" / "metrics.h5") for p in ("whole", "split"))
    for group in (0, 1):
        for name in a[group]:
            if not name.startswith("seconds"):
                np.testing.assert_array_equal(a[group][name], b[group][name], err_msg=name)


class Regression(Problem):
    """Not classification: least squares on a fixed random linear model, metrics of its own."""

    datasets = ("toy-regression",)
    models = ("linear",)
    metrics = ("residual_norm",)
    target = ("residual_norm", "min")

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(64, 5, generator=g, dtype=dtype)
        self.w = torch.randn(5, 1, generator=g, dtype=dtype)
        self.y = self.x @ self.w
        self.objective = _SquaredError()
        self.n_train = 64

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(5, 1, bias=False)).to(self.dtype)

    def batch(self, indices):
        return self.x[indices], self.y[indices]

    def evaluate(self, model, comm):
        with torch.no_grad():
            return {"residual_norm": float(torch.linalg.vector_norm(model(self.x) - self.y))}


class _SquaredError(SampleLoss):
    def __init__(self):
        super().__init__(torch.nn.functional.mse_loss)


@pytest.mark.parametrize("method", ["tr", "apts", "adam"])
def test_a_problem_that_is_not_classification_runs_through_the_loop(tmp_path, monkeypatch, method):
    monkeypatch.setitem(PROBLEMS, "toy-regression", Regression)
    keywords = {"subdomains": 1, "radius": 0.1, "max_radius": 1.0} if method == "apts" else {}
    c = config.resolve({"data": {"dataset": "toy-regression", "batch_size": 64},
                        "model": {"name": "linear", "dtype": "float64"}, "epochs": 30,
                        "target": 1e-3, "optimizer": {"method": method, **keywords}})
    epochs = train(c, tmp_path / "run", MPI.COMM_SELF)
    iterations, saved, attrs = read_metrics(tmp_path / "run" / "metrics.h5")
    assert set(saved) == set(EPOCH_SERIES) | {"residual_norm"}
    assert set(iterations) == {"epoch", "seconds", *RECORD_FIELDS}
    assert epochs["residual_norm"][-1] < epochs["residual_norm"][0]
    # the epoch loss of a problem without its own: the mean of the epoch's final losses
    np.testing.assert_allclose(saved["loss"][0], iterations["final_loss"][0])
    if saved["residual_norm"][-1] <= 1e-3:
        assert "reached residual norm" in attrs["stopped"]
    assert math.isnan(saved["radius"][-1]) == (method == "adam")
