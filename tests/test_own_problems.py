"""Own networks and data from the CLI (issue 23, item 2): a model factory by import path, tensors
from .npz/.pt files, a Problem of one's own by import path or ``register``."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from apts_mpi import config
from apts_mpi.problems import PROBLEMS, Problem, register
from apts_mpi.results import load_checkpoint, read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
TIMEOUT = 180

NETS = '''
import torch

def make(input_shape, outputs):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, outputs))

def not_a_module(input_shape, outputs):
    return 42
'''

# a problem of one's own: least squares y = A x on generated data, with a data key of its own
OWN_PROBLEM = '''
import torch
from apts_mpi.objective import SampleLoss
from apts_mpi.options import Option
from apts_mpi.problems import Problem

class LeastSquares(Problem):
    datasets = ("least-squares",)
    data_keys = {"samples": Option("samples", 64, int, check=lambda v: v > 0, rule="must be > 0")}
    models = ("linear",)
    metrics = ("loss",)
    target = ("loss", "min")

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        g = torch.Generator().manual_seed(cfg["seed"])
        self.x = torch.randn(cfg["data"]["samples"], 3, generator=g, dtype=dtype)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=dtype)
        self.objective = SampleLoss(torch.nn.functional.mse_loss)
        self.n_train = len(self.y)

    def build_model(self):
        return torch.nn.Linear(3, 1, bias=False).to(self.device, self.dtype)

    def batch(self, indices):
        return self.x[indices], self.y[indices]

    def evaluate(self, model, comm):
        with torch.no_grad():
            return {"loss": float(torch.nn.functional.mse_loss(model(self.x), self.y))}
'''


@pytest.fixture
def user_code(tmp_path):
    (tmp_path / "mynets.py").write_text(NETS)
    (tmp_path / "myproblem.py").write_text(OWN_PROBLEM)
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in ("mynets", "myproblem"):
        sys.modules.pop(name, None)


def train_cli(where, cfg, *args):
    (where / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(where), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "apts_mpi", "train", str(where / "cfg.yaml"),
                           "--out", str(where / "run"), *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env=env, cwd=where)


def rings(n, seed):
    g = np.random.default_rng(seed)
    y = g.integers(0, 2, n)
    angle = g.uniform(0, 2 * np.pi, n)
    r = 0.5 + 0.5 * y + 0.1 * g.standard_normal(n)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], 1).astype(np.float32), y


def test_own_network_on_own_npz_tensors_from_the_cli(user_code):
    x, y = rings(600, 0)
    tx, ty = rings(200, 1)
    np.savez(user_code / "train.npz", x=x, y=y)
    np.savez(user_code / "test.npz", x=tx, y=ty)
    result = train_cli(user_code, {"epochs": 3, "data": {"dataset": "tensors", "train": "train.npz",
                                                         "test": "test.npz", "batch_size": 200},
                                   "model": {"name": "mynets:make"},
                                   "optimizer": {"method": "apts", "subdomains": 2}})
    assert result.returncode == 0, result.stdout + result.stderr
    _, epochs, _ = read_metrics(user_code / "run" / "metrics.h5")
    assert list(epochs["epoch"]) == [1, 2, 3]
    # independent reference: the saved model, rebuilt from the user's factory, on the test file
    import mynets
    model = mynets.make((2,), 2)
    model.load_state_dict(load_checkpoint(user_code / "run" / "checkpoint.h5")[0]["model"])
    with torch.no_grad():
        out = model(torch.from_numpy(tx))
    accuracy = float((out.argmax(1).numpy() == ty).mean())
    loss = float(torch.nn.functional.cross_entropy(out, torch.from_numpy(ty)))
    assert epochs["test_accuracy"][-1] == pytest.approx(accuracy, abs=1e-12)
    assert epochs["test_loss"][-1] == pytest.approx(loss, rel=1e-5)
    assert accuracy > 0.6  # better than chance after three epochs


def test_own_network_on_pt_regression_tensors_without_a_test_file(user_code):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    y = x @ torch.randn(4, 3, generator=g)
    torch.save({"x": x, "y": y}, user_code / "train.pt")
    result = train_cli(user_code, {"epochs": 2, "data": {"dataset": "tensors", "train": "train.pt"},
                                   "model": {"name": "mynets:make"}, "optimizer": {"method": "adam"}})
    assert result.returncode == 0, result.stdout + result.stderr
    _, epochs, _ = read_metrics(user_code / "run" / "metrics.h5")
    import mynets
    model = mynets.make((4,), 3)
    model.load_state_dict(load_checkpoint(user_code / "run" / "checkpoint.h5")[0]["model"])
    with torch.no_grad():
        mse = float(torch.nn.functional.mse_loss(model(x), y))
    assert epochs["loss"][-1] == pytest.approx(mse, rel=1e-5)
    assert "test_loss" not in epochs


def test_own_problem_by_import_path_from_the_cli(user_code):
    result = train_cli(user_code, {"epochs": 2, "data": {"dataset": "myproblem:LeastSquares",
                                                         "samples": 80},
                                   "model": {"name": "linear", "dtype": "float64"},
                                   "optimizer": {"method": "apts", "subdomains": 1, "radius": 1.0,
                                                 "max_radius": 10.0}})
    assert result.returncode == 0, result.stdout + result.stderr
    _, epochs, attrs = read_metrics(user_code / "run" / "metrics.h5")
    assert attrs["n_train"] == 80 and attrs["config"]["data"]["samples"] == 80
    assert epochs["loss"][-1] < epochs["loss"][0]


@pytest.mark.parametrize("cfg, words", [
    ({"data": {"dataset": "tensors", "train": "train.npz"}, "model": {"name": "nowhere:make"}},
     "model.name 'nowhere:make': cannot import nowhere"),
    ({"data": {"dataset": "tensors", "train": "train.npz"}, "model": {"name": "mynets:not_a_module"}},
     "returned int, not a torch.nn.Module"),
    ({"data": {"dataset": "tensors", "train": "missing.npz"}, "model": {"name": "mynets:make"}},
     "missing.npz: no such file"),
    ({"data": {"dataset": "tensors", "train": "nolabels.npz"}, "model": {"name": "mynets:make"}},
     "expected arrays 'x' and 'y', found x"),
    ({"data": {"dataset": "tensors"}, "model": {"name": "mynets:make"}}, "data.train: give"),
    ({"data": {"dataset": "myproblem:Nothing"}}, "module myproblem has no 'Nothing'"),
    ({"data": {"dataset": "mynets:make"}}, "not a subclass of apts_mpi.problems.Problem"),
    ({"data": {"dataset": "myproblem:LeastSquares", "sample": 3}, "model": {"name": "linear"}},
     "data.sample: unknown key"),
    ({"data": {"dataset": "myproblem:LeastSquares"}, "model": {"name": "mynets:make"}},
     "model.name must be one of linear; got 'mynets:make'"),
    ({"data": {"dataset": "tensors", "train": "train.npz"}}, "model.name 'mlp-digits': expected an import path"),
])
def test_bad_own_input_is_one_line(user_code, cfg, words, monkeypatch):
    from mpi4py import MPI
    from apts_mpi.errors import InputError
    from apts_mpi.train import Experiment
    monkeypatch.chdir(user_code)
    x, _ = rings(10, 0)
    np.savez(user_code / "train.npz", x=x, y=np.arange(10) % 2)
    np.savez(user_code / "nolabels.npz", x=x)
    with pytest.raises(InputError) as error:
        Experiment(config.resolve({"epochs": 1, **cfg}), MPI.COMM_SELF)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_bad_own_input_from_the_cli_is_exit_2_and_leaves_nothing(user_code):
    result = train_cli(user_code, {"data": {"dataset": "tensors", "train": "missing.npz"},
                                   "model": {"name": "mynets:make"}})
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "missing.npz: no such file" in result.stderr
    assert not (user_code / "run").exists()


def test_register_adds_a_problem_the_config_accepts(user_code):
    import myproblem
    try:
        register(myproblem.LeastSquares)
        resolved = config.resolve({"data": {"dataset": "least-squares"}, "model": {"name": "linear"}})
        assert resolved["data"]["samples"] == 64
    finally:
        PROBLEMS.pop("least-squares", None)
    with pytest.raises(TypeError):
        register(int)
    assert issubclass(myproblem.LeastSquares, Problem)
