"""apts_mpi.comm beyond the buffer collectives: object collectives, barrier, split, point-to-point
and shared counters, on 1, 2 and 3 ranks of a real mpiexec (tests/mpi/comm_cases.py: every rank
checks what it received against values built from the rank numbers)."""
import json
from pathlib import Path

import pytest

from conftest import mpirun

pytestmark = pytest.mark.mpi
HERE = Path(__file__).parent


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_object_collectives_split_and_point_to_point(tmp_path, ranks):
    proc = mpirun(ranks, HERE / "mpi" / "comm_cases.py", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "comm.json").read_text())
    assert result["size"] == ranks and len(result["checks"]) == ranks
    expected = {"allgather_object", "gather_object", "bcast_object", "max_int", "split",
                "shared_counters"} | ({"send_recv"} if ranks > 1 else set())
    for rank, checks in enumerate(result["checks"]):
        assert set(checks) == expected
        failed = [name for name, ok in checks.items() if not ok]
        assert not failed, f"rank {rank}: {failed}"
