"""Model-parallel APTS (apts_mpi/model_parallel.py) under a real mpiexec: the same iterates as the
serial emulation with decomposition "stages", a negative control, the parameters each rank holds,
a killed rank, and the inputs it refuses."""
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import pipeline_cases as pc  # noqa: E402

from apts_mpi import APTS  # noqa: E402
from apts_mpi.decomposition import decompose, stage_bounds  # noqa: E402
from apts_mpi.errors import InputError  # noqa: E402
from conftest import ENV, MPIEXEC, mpirun  # noqa: E402

HERE = Path(__file__).parent


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def launch(request, tmp_path_factory):
    """One mpiexec launch per world size runs every case of that size."""
    out = tmp_path_factory.mktemp(f"pipe{request.param}")
    proc = mpirun(request.param, HERE / "mpi" / "pipeline_cases.py", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return request.param, out


@pytest.mark.mpi
def test_same_iterates_as_the_serial_emulation(launch):
    """Bitwise (float64, CPU): parameters, every reported value (f(theta_k), trial, pred, rho,
    radius, final loss) and the accept/reject sequences of the step and the global pass."""
    world, out = launch
    accepted = []
    for name, (kind, kwargs) in pc.cases(world).items():
        result = np.load(out / f"{name}.npz")
        flat, reports, acc = pc.run_serial(kind, kwargs, world)
        assert np.array_equal(flat, result["flat"]), name
        assert np.array_equal(reports, result["reports"], equal_nan=True), name
        assert np.array_equal(acc, result["accepted"]), name
        assert int(result["differing_reports"]) == 0, f"{name}: ranks report different values"
        accepted.append(acc[:, 0])
    accepted = np.concatenate(accepted)
    assert accepted.any() and not accepted.all()  # the cases exercise both branches


@pytest.mark.mpi
def test_coupling_through_current_iterates_would_differ(launch):
    """Negative control: local phases that see the other blocks at their local iterates (not at
    theta_k) give other iterates, so the equality above is a test of the decoupling."""
    world, out = launch
    for name in ("default", "no-global"):
        kind, kwargs = pc.cases(world)[name]
        control, _, _ = pc.run_serial(kind, kwargs, world, optimizer=pc.Coupled)
        reference = np.load(out / f"{name}.npz")["flat"]
        assert np.abs(control - reference).max() > 1e-3 * np.abs(reference).max(), name


@pytest.mark.mpi
def test_each_rank_holds_only_its_block(launch):
    """On the uniform deep MLP each rank holds <= 1/N + 10% of the parameters; the model's other
    blocks are released (what a rank's model still holds equals params_held)."""
    world, out = launch
    for name in pc.cases(world):
        result = np.load(out / f"{name}.npz")
        held, materialised = result["held"].T
        assert np.array_equal(held, materialised), name
        assert held.sum() == int(result["total"]), name  # the blocks partition the parameters
        if pc.cases(world)[name][0] == "deep":
            assert held.max() <= 1.1 * int(result["total"]) / world, name
        assert result["sent"][-1] == 0 and (result["sent"][:-1] > 0).all()  # down the pipe only


@pytest.mark.mpi
def test_a_killed_rank_ends_the_launch(tmp_path):
    stamp = tmp_path / "killed"
    proc = mpirun(2, HERE / "mpi" / "fail.py", "--kill", stamp, timeout=120)
    ended = time.time()
    assert stamp.exists(), proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert ended - float(stamp.read_text()) < 30


def test_one_rank_is_the_whole_model():
    """N = 1: one block, the pipe has no links; the iterates are serial APTS's."""
    kind, kwargs = pc.cases(1)["default"]
    flat, reports, acc = pc.run_serial(kind, kwargs, 1)
    opt, mp_reports, mp_acc = pc.run(kind, dict(kwargs, model_parallel=True))
    assert opt.params_held == flat.size
    assert np.array_equal(opt.sub.gather(torch.empty(flat.size, dtype=torch.float64)).numpy(), flat)
    assert np.array_equal(reports, mp_reports, equal_nan=True) and np.array_equal(acc, mp_acc)


def test_stages_cut_between_children_balanced_by_parameters():
    L = torch.nn.Linear
    model = torch.nn.Sequential(torch.nn.Flatten(), L(4, 8), torch.nn.ReLU(), L(8, 8), torch.nn.ReLU(),
                                L(8, 3), torch.nn.Identity())
    # parameter counts 40, 72, 27: a hand min-max partition
    assert stage_bounds(model, 1) == [0, 7]
    assert stage_bounds(model, 2) == [0, 2, 7]      # 40 | 99 (112 | 27 is worse)
    assert stage_bounds(model, 3) == [0, 2, 4, 7]
    assert [sd.numel for sd in decompose(model, 2, "stages")] == [40, 99]


def test_stages_are_the_exact_min_max_split_of_the_layers():
    """Against brute force over every placement of the cuts between LeNet-5's layers."""
    import itertools
    from apts_mpi.models import build_model
    model = build_model("cifar-lenet5", (3, 32, 32), 10)
    sizes = [sum(p.numel() for p in child.parameters()) for child in model]
    sizes = [n for n in sizes if n]
    for n in range(1, len(sizes) + 1):
        got = max(sd.numel for sd in decompose(model, n, "stages"))
        best = min(max(sum(sizes[a:b]) for a, b in zip((0,) + cuts, cuts + (len(sizes),)))
                   for cuts in itertools.combinations(range(1, len(sizes)), n - 1))
        assert got == best


def _mlp():
    return pc.network("mlp")


@pytest.mark.parametrize("make, keywords, message", [
    (lambda: torch.nn.ModuleList([torch.nn.Linear(2, 2)]), dict(decomposition="stages"), "nn.Sequential"),
    (_mlp, dict(decomposition="balanced"), "needs decomposition 'stages'"),
    (_mlp, dict(decomposition="stages", replicas=2), "replicas=2"),
    (_mlp, dict(decomposition="stages", foc=True), "foc=True"),
    (_mlp, dict(decomposition="stages", global_model="lsr1"), "global_model='lsr1'"),
    (_mlp, dict(decomposition="stages", subdomains=2), "needs 2 ranks"),
])
def test_refused_combinations(make, keywords, message):
    with pytest.raises(InputError, match=message):
        APTS(make(), torch.nn.functional.cross_entropy, None, model_parallel=True, **keywords)


def test_fewer_children_with_parameters_than_blocks():
    with pytest.raises(InputError, match="at least 5 top-level children with parameters"):
        APTS(_mlp(), torch.nn.functional.cross_entropy, None, decomposition="stages", subdomains=5)


def test_an_objective_through_the_inputs_is_refused():
    from apts_mpi.objective import Objective

    class Gradient(Objective):  # sequential_inputs False, like the PINN
        def __call__(self, model, part):
            return model(part[0]).sum()
    with pytest.raises(InputError, match="sequential_inputs"):
        APTS(_mlp(), Gradient(), None, decomposition="stages", model_parallel=True)


@pytest.mark.mpi
def test_train_with_model_parallel_resumes_bitwise(tmp_path):
    """``apts-mpi train`` with optimizer.model_parallel on 2 ranks (digits): the evaluation runs
    through the pipe, the checkpoint gathers the blocks, metrics.h5 records params_held of every
    rank, and 1 epoch + resume to 2 equal 2 epochs bit for bit."""
    sys.path.insert(0, str(HERE))
    from test_cli import assert_same_trajectory
    from apts_mpi.results import read_metrics
    base = ["-m", "apts_mpi", "train", HERE.parent / "configs" / "demo.yaml", "--set",
            "optimizer.model_parallel=true", "--set", "optimizer.decomposition=stages", "--set",
            "data.batch_size=500", "--set", "checkpoint_every=1"]
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py"]
    runs = {name: subprocess.Popen([*cmd, *map(str, base), "--set", f"epochs={epochs}", "--out",
                                    str(tmp_path / out)], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, env=ENV)
            for name, epochs, out in (("whole", 2, "whole"), ("first", 1, "resumed"))}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}: {out}"
    second = mpirun(2, *base, "--set", "epochs=2", "--resume", "--out", tmp_path / "resumed")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "epoch   2" in second.stdout + second.stderr
    assert_same_trajectory(tmp_path / "whole", tmp_path / "resumed")
    _, epochs, attrs = read_metrics(tmp_path / "whole" / "metrics.h5")
    held = list(attrs["params_held"])
    assert len(held) == 2 and sum(held) == 64 * 32 + 32 + 32 * 10 + 10  # mlp-digits, two blocks
    # the metrics evaluated through the pipe equal a one-process evaluation of the gathered model
    from apts_mpi.comm import Comm
    from apts_mpi.problems import PROBLEMS
    from apts_mpi.results import load_checkpoint
    problem = PROBLEMS["digits"](attrs["config"], torch.device("cpu"), torch.float32)
    model = problem.build_model()
    model.load_state_dict(load_checkpoint(tmp_path / "whole" / "checkpoint.h5")[0]["model"])
    whole = problem.evaluate(model, Comm(None))
    assert whole["test_accuracy"] == epochs["test_accuracy"][-1] > 0.3  # 0.1: chance
    assert whole["test_loss"] == pytest.approx(epochs["test_loss"][-1], rel=1e-6)
