"""Every APTS mode gives, bit for bit, the iterates stored from main before the refactor into parts
(tests/reference/runs.py): parameters, every recorded value, the report and the accept sequences,
float64, in the serial emulation (N = 2 and 4) and under mpiexec at N = 2 and 4, model parallel
included."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "reference"))
import runs  # noqa: E402

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])


def test_serial_emulation_reproduces_the_reference_bitwise():
    stored = dict(np.load(runs.reference_path(1)))
    differ = runs.compare(stored, runs.all_runs(None))
    assert len(differ) == len(runs.cases(1)) >= 40
    assert {case: arrays for case, arrays in differ.items() if arrays} == {}


def test_reference_runs_mix_accepts_and_rejects():
    stored = np.load(runs.reference_path(1))
    accepted = np.concatenate([stored[k][:, 0] for k in stored.files if k.endswith("/accepted")])
    assert accepted.any() and not accepted.all()


@pytest.mark.mpi
@pytest.mark.parametrize("world", [2, 4])
def test_mpi_runs_reproduce_the_reference_bitwise(world, tmp_path):
    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the project with the 'mpich' extra or a system MPI")
    out = tmp_path / "differ.json"
    cmd = [MPIEXEC, "-n", str(world), sys.executable, "-m", "mpi4py", str(HERE / "reference" / "runs.py"),
           "check", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    differ = json.loads(out.read_text())
    assert len(differ) == len(runs.cases(world))
    assert {case: arrays for case, arrays in differ.items() if arrays} == {}
