"""Progress you can see (issue 23, item 3) and provenance (item 6): heartbeat lines inside an
epoch, metrics.h5 at every epoch whatever checkpoint_every, "resumed from epoch k", and the
versions, commit and job a run was made with."""
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import mpi4py
import numpy as np
import pytest
from mpi4py import MPI

from apts_mpi import config
from apts_mpi.progress import duration, heartbeat_line
from apts_mpi.results import read_metrics
from apts_mpi.train import Experiment, train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
TIMEOUT = 180
HEARTBEAT = re.compile(r"^epoch (\d+)/(\d+)  iteration (\d+)/(\d+)  ([0-9.e+-]+) s/it  ETA epoch (\S+ \S+|-), "
                       r"run (\S+ \S+|-)  radius (\S+)  accepted (\d+)/(\d+) \((\d+)%\)$")


def cli(out, *args, env=()):
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    environ.update(OMP_NUM_THREADS="1", **dict(env))
    return subprocess.run([sys.executable, "-m", "apts_mpi", "train", "configs/demo.yaml", "--out",
                           str(out), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=environ, cwd=ROOT)


def test_heartbeat_line_numbers():
    line = heartbeat_line(2, 10, 30, 120, 0.5, 0.0123, 27, 30)
    # 90 iterations left in the epoch at 0.5 s: 45 s; then 8 epochs of 120: 480 s more
    assert line == ("epoch 2/10  iteration 30/120  0.5 s/it  ETA epoch 45 s, run 8.8 min  "
                    "radius 1.23e-02  accepted 27/30 (90%)")
    assert heartbeat_line(1, 1, 1, 1, 2.0, math.nan, 0, 0).endswith("radius -  accepted -")
    assert [duration(s) for s in (42, 300, 9000)] == ["42 s", "5.0 min", "2.5 h"]


def test_heartbeat_in_the_log_resume_message_and_provenance(tmp_path):
    out = tmp_path / "run"
    sets = ["--set", "epochs=2", "--set", "data.batch_size=400", "--set", "log_interval_s=0",
            "--set", "checkpoint_every=1"]
    first = cli(out, *sets, env={"SLURM_JOB_ID": "4242"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "\r" not in first.stdout + first.stderr
    _, _, attrs = read_metrics(out / "metrics.h5")
    iterations = math.ceil(attrs["n_train"] / 400)  # the sampler's minibatches per epoch
    beats = [HEARTBEAT.match(line) for line in first.stdout.splitlines() if line.startswith("epoch ")
             and "iteration" in line]
    assert len(beats) == 2 * iterations and all(beats), first.stdout
    seen = [(int(b[1]), int(b[2]), int(b[3]), int(b[4])) for b in beats]
    assert seen == [(e, 2, i, iterations) for e in (1, 2) for i in range(1, iterations + 1)]
    assert all(int(b[10]) == int(b[3]) for b in beats)  # APTS decides every step
    # provenance
    assert attrs["mpi4py"] == mpi4py.__version__ and attrs["numpy"] == np.__version__
    assert attrs["mpi_library"] == MPI.Get_library_version().strip().splitlines()[0].strip()
    assert attrs["slurm_job_id"] == "4242"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert attrs["git_commit"].split("-")[0] == head.stdout.strip()
    # resume
    second = cli(out, *sets[:-4], "--set", "epochs=3", "--set", "log_interval_s=0", "--resume")
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r"^resumed from epoch 2 \(\d+ iterations done, [0-9.]+ s\)$", second.stdout, re.M)


def test_metrics_are_written_at_every_epoch_whatever_checkpoint_every(tmp_path):
    cfg = config.load("configs/demo.yaml", ["epochs=5", "checkpoint_every=100", "data.batch_size=600"])
    ex = Experiment(cfg, MPI.COMM_SELF)
    evaluate, calls = ex.problem.evaluate, []

    def failing_in_epoch_3(*args):  # a crash after two epochs, before any checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return evaluate(*args)

    ex.problem.evaluate = failing_in_epoch_3
    with pytest.raises(RuntimeError, match="node lost"):
        train(cfg, tmp_path / "run", MPI.COMM_SELF, experiment=ex)
    assert not (tmp_path / "run" / "checkpoint.h5").exists()
    iterations, epochs, _ = read_metrics(tmp_path / "run" / "metrics.h5")
    assert list(epochs["epoch"]) == [1, 2]
    assert len(iterations["loss"]) == 2 * math.ceil(ex.problem.n_train / 600)
