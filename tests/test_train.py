"""The training loop's numerical-fault stops, in one process (COMM_SELF)."""
import math

import pytest
from mpi4py import MPI

from apts_mpi import config
from apts_mpi.results import read_metrics, report_table
from apts_mpi.train import Experiment, TrainingStopped, train


def cfg(**sets):
    return config.load("configs/demo.yaml", [f"{k}={v}" for k, v in sets.items()])


def test_nonfinite_initial_loss_stops_with_a_message(tmp_path):
    c = cfg(epochs=3)
    ex = Experiment(c, MPI.COMM_SELF)
    ex.problem.train_x[0, 0, 0, 0] = math.nan  # a NaN in the data poisons every full-batch loss
    with pytest.raises(TrainingStopped, match="loss at the start of iteration 1 is nan"):
        train(c, tmp_path / "run", MPI.COMM_SELF, experiment=ex)
    _, epochs, attrs = read_metrics(tmp_path / "run" / "metrics.h5")
    assert "check the data" in attrs["stopped"]
    assert len(epochs["epoch"]) == 1


@pytest.mark.parametrize("method", ["tr", "apts"])
def test_radius_stuck_at_its_minimum_stops_the_run(tmp_path, method):
    # eta1 close to 1: almost no step passes, the radius falls to min_radius and stays
    c = cfg(**{"optimizer.method": method, "optimizer.eta1": 0.9999, "optimizer.eta2": 0.99999,
               "optimizer.min_radius": 0.001, "stall_iterations": 4, "epochs": 200})
    if method == "apts":
        c = cfg(**{"optimizer.eta1": 0.9999, "optimizer.eta2": 0.99999, "optimizer.min_radius": 0.001,
                   "optimizer.subdomains": 2, "optimizer.global_iters": 0, "stall_iterations": 4,
                   "epochs": 200})
    with pytest.raises(TrainingStopped, match="4 steps in a row rejected at min_radius=0.001"):
        train(c, tmp_path / "run", MPI.COMM_SELF)
    iterations, epochs, attrs = read_metrics(tmp_path / "run" / "metrics.h5")
    assert len(epochs["epoch"]) < 200
    assert (iterations["accepted"][-4:] == 0).all()
    assert (iterations["radius"][-4:] == 0.001).all()


def test_nonfinite_trials_are_counted_and_reported(tmp_path, monkeypatch):
    """A NaN injected into every third trial loss (TR evaluates twice per step: the point, then the
    trial): each one is a rejection, counted per epoch and shown in the report."""
    c = cfg(**{"optimizer.method": "tr", "epochs": 4})
    ex = Experiment(c, MPI.COMM_SELF).build()
    calls = {"n": 0}
    closure_of = ex.optimizer.closure

    def poisoned(x, y):
        inner = closure_of(x, y)

        def closure():
            calls["n"] += 1
            loss = inner()
            return loss * math.nan if calls["n"] % 6 == 0 else loss
        return closure

    monkeypatch.setattr(ex.optimizer, "closure", poisoned)
    train(c, tmp_path / "run", MPI.COMM_SELF, experiment=ex)
    iterations, epochs, _ = read_metrics(tmp_path / "run" / "metrics.h5")
    assert iterations["nonfinite"].tolist() == [0, 0, 1, 0]
    assert (iterations["accepted"] == 1 - iterations["nonfinite"]).all()
    assert epochs["nonfinite"].tolist() == [0, 0, 1, 1]
    table = report_table([tmp_path / "run"])
    assert "non-finite" in table.splitlines()[0]
    assert table.splitlines()[2].split()[-1] == str(int(epochs["nonfinite"][-1]))


def test_cost_decomposition_from_the_config_counts_flops_on_training_inputs(monkeypatch):
    """optimizer.decomposition=cost: the experiment hands two training inputs to APTS, whose split
    is then the one decompose computes with that example."""
    import torch
    from apts_mpi import decomposition
    seen = []
    real = decomposition._unit_flops
    monkeypatch.setattr(decomposition, "_unit_flops",
                        lambda model, params, units, example=None: seen.append(example) or
                        real(model, params, units, example))
    c = cfg(**{"optimizer.decomposition": "cost", "optimizer.subdomains": 2})
    ex = Experiment(c, MPI.COMM_SELF).build()
    assert len(seen) == 1 and torch.equal(seen[0], ex.problem.batch(torch.arange(2))[0])
    expected = decomposition.decompose(ex.model, 2, "cost", example=seen[0])
    assert [sd.pieces for sd in ex.optimizer.subdomains] == [sd.pieces for sd in expected]
