"""APTS under a real mpiexec: N-rank runs against serial emulation, and a failing rank."""
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "mpi"))
import cases  # noqa: E402
from conftest import mpirun  # noqa: E402

pytestmark = pytest.mark.mpi
HERE = Path(__file__).parent
LAUNCH_TIMEOUT = 300


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda n: f"{n}ranks")
def launch(request, tmp_path_factory):
    """One mpiexec launch per world size runs every case of that size."""
    out = tmp_path_factory.mktemp(f"mpi{request.param}")
    proc = mpirun(request.param, HERE / "mpi" / "cases.py", out, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return request.param, out


def test_equivalence_with_serial_emulation(launch):
    world, out = launch
    checked = 0
    for name, (subdomains, kwargs) in cases.cases(world).items():
        result = np.load(out / f"{name}.npz")
        serial = {k: v for k, v in kwargs.items() if k != "replicas"}
        flat, accepted = cases.run_case(serial, subdomains)
        rel = np.abs(flat - result["flat"]).max() / np.abs(flat).max()
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"
        assert np.array_equal(accepted, result["accepted"]), f"{name}: accept/reject sequence differs"
        assert float(result["spread"]) == 0.0, f"{name}: ranks hold different parameters"
        checked += 1
    assert checked == len(cases.cases(world)) >= 11


def test_equivalence_runs_mix_accepts_and_rejects(launch):
    world, out = launch
    seqs = np.concatenate([np.load(out / f"{n}.npz")["accepted"][:, 0] for n in cases.cases(world)])
    assert seqs.any() and not seqs.all()


@pytest.mark.parametrize("launch", [4], indirect=True, ids=["4ranks"])
def test_different_data_per_rank_keeps_ranks_identical(launch):
    world, out = launch
    assert world == 4
    assert float(np.load(out / "different-data.npz")["spread"]) == 0.0


@pytest.mark.parametrize("launch", [4], indirect=True, ids=["4ranks"])
def test_batchnorm_statistics_stay_identical_across_ranks(launch):
    """Running statistics change with every forward pass, differently per rank; the coordinator's
    are broadcast each iteration, so parameters and buffers agree bit for bit."""
    world, out = launch
    assert float(np.load(out / "batchnorm.npz")["spread"]) == 0.0


def test_every_rank_reports_the_coordinators_values(launch):
    """f(theta_k), the trial loss, pred, rho, the radius and the loss after the global pass are the
    same on every rank, also when the ranks' reductions differ (the perturbed case)."""
    world, out = launch
    for name in cases.cases(world):
        assert float(np.load(out / f"{name}.npz")["report_spread"]) == 0.0, name


@pytest.mark.parametrize("launch", [2, 4], indirect=True, ids=["2ranks", "4ranks"])
def test_data_fault_on_one_rank_is_seen_by_every_rank(launch):
    """A NaN that only rank 1's local phase sees: the loss the loop checks is NaN on every rank,
    the step is not accepted and counts as non-finite (the loop then stops)."""
    world, out = launch
    rows = np.load(out / "data-fault.npz")["rows"]
    assert rows.shape == (world, 3)
    assert np.isnan(rows[:, 0]).all(), rows
    assert (rows[:, 1] == 0).all() and (rows[:, 2] == 1).all(), rows


def test_failing_rank_aborts_launch():
    start = time.monotonic()
    proc = mpirun(2, HERE / "mpi" / "fail.py", timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert "finished without failure" not in proc.stdout
    assert elapsed < 30, f"launch took {elapsed:.1f} s to fail"
