"""The Python API is safe to adopt (issue 23, item 1): rank 0's model on every rank, a one-rank
world under a multi-process launcher refused, ``step(closure)`` explained, the README's snippet and
``examples/`` running as pasted under mpiexec, the CLI naming a serial emulation."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apts_mpi import APTS
from apts_mpi.comm import Comm
from apts_mpi.errors import InputError
from apts_mpi.launch import check_launch
from apts_mpi.optimizers import DataParallel

ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
# a child of this test must not inherit a launch's variables (the suite may run inside one)
LAUNCH_VARIABLES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
ENV = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES} | {"OMP_NUM_THREADS": "1"}
TIMEOUT = 180


def mpirun(n, *args, cwd=ROOT):
    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the project with the 'mpich' extra or a system MPI")
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, args)],
                          capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=cwd)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("build", ["apts", "adam"])
def test_step_with_a_closure_is_a_type_error_that_says_how(build):
    model = small_model()
    loss = torch.nn.functional.cross_entropy
    opt = APTS(model, loss) if build == "apts" else \
        DataParallel(model, loss, torch.optim.Adam(model.parameters()), Comm(None))

    def closure():
        return loss(model(torch.zeros(1, 4)), torch.zeros(1, dtype=torch.long))

    with pytest.raises(TypeError, match=r"not a closure: call opt\.step\(x, y\)") as error:
        opt.step(closure)
    assert "\n" not in str(error.value)
    # a minibatch still works, either way of passing it
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    assert np.isfinite(opt.step(x, y)) and np.isfinite(opt.step((x, y)))


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                                      "PMI_SIZE"])
def test_a_one_rank_world_under_a_launcher_of_several_is_refused(monkeypatch, variable):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    APTS(small_model(), torch.nn.functional.cross_entropy)  # no launcher: serial, fine
    monkeypatch.setenv(variable, "1")
    APTS(small_model(), torch.nn.functional.cross_entropy)  # a launch of one process: fine
    monkeypatch.setenv(variable, "2")
    with pytest.raises(InputError, match=rf"^{variable}=2: .* started 2 processes, but each is an "
                                         r"MPI world of 1 rank") as error:
        APTS(small_model(), torch.nn.functional.cross_entropy)
    assert "\n" not in str(error.value)
    model = small_model()
    with pytest.raises(InputError, match=variable):
        DataParallel(model, torch.nn.functional.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                     Comm(None))
    check_launch(world_size=2)  # a real world of 2 under the same variable: fine


def test_under_torchrun_variables_the_cli_refuses_in_one_line(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "apts_mpi", "train", "configs/demo.yaml", "--set",
                             "epochs=1", "--out", str(out)], capture_output=True, text=True,
                            timeout=TIMEOUT, env=ENV | {"WORLD_SIZE": "2"}, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "WORLD_SIZE=2" in result.stderr and not out.exists()


@pytest.mark.mpi
def test_every_optimiser_starts_from_rank_0s_parameters_and_buffers(tmp_path):
    result = mpirun(2, ROOT / "tests" / "mpi" / "broadcast.py", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(ROOT / "tests" / "mpi"))
    try:
        import broadcast
    finally:
        sys.path.pop(0)
    reference = {k: v.numpy() for k, v in broadcast.network(100).state_dict().items()}  # rank 0's seed
    other = {k: v.numpy() for k, v in broadcast.network(101).state_dict().items()}
    for name in ("apts", "adam", "apts-model-parallel"):
        for rank in (0, 1):
            with np.load(tmp_path / f"{name}-rank{rank}.npz") as saved:
                assert len(saved.files) >= (6 if name != "apts-model-parallel" else 2)
                for key in saved.files:
                    assert np.array_equal(saved[key], reference[key]), f"{name} rank {rank}: {key}"
                # rank 1's own network differed before (weights, running mean, counter)
                assert sum(not np.array_equal(other[k], reference[k]) for k in saved.files) >= 2


def readme_snippet():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"From Python \(runs as pasted.*?```python\n(.*?)```", text, flags=re.S)
    assert block, "README.md has no 'From Python (runs as pasted ...' snippet"
    return block.group(1)


def test_the_readme_snippet_runs_as_pasted_on_one_process(tmp_path):
    (tmp_path / "snippet.py").write_text(readme_snippet())
    result = subprocess.run([sys.executable, "snippet.py"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.mpi
def test_the_readme_snippet_runs_as_pasted_under_mpiexec(tmp_path):
    (tmp_path / "snippet.py").write_text(readme_snippet())
    result = mpirun(2, "snippet.py", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.mpi
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_run_as_pasted_under_mpiexec(example):
    assert f"mpiexec -n 2 python -m mpi4py examples/{example.name}" in example.read_text()
    result = mpirun(2, Path("examples") / example.name)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert "ranks 2" in last and last.endswith("largest difference between ranks 0"), last
    accuracy = float(re.search(r"accuracy ([0-9.]+)", last).group(1))
    assert accuracy >= 0.9, last  # two balanced classes: chance is 0.5


def test_the_cli_names_a_serial_emulation(tmp_path):
    result = subprocess.run([sys.executable, "-m", "apts_mpi", "train", "configs/demo.yaml", "--set",
                             "epochs=1", "--set", "optimizer.subdomains=3", "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, timeout=TIMEOUT, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "serial emulation of 3 subdomains on 1 process" in result.stdout
