"""The job scripts on a real one-node SLURM, on scikit-learn's digits (no data files needed).

Needs a running cluster: ``scripts/slurm_up start DIR`` (root; installs Debian's slurmctld, slurmd
and munge where they are missing) and ``SLURM_CONF=DIR/slurm.conf`` in the environment; CI does
both after the main suite (.ci/run).  Without a cluster that answers, every test here is skipped
and says why.  The launches: ``sbatch --wait`` of jobs/mnist-apts.sbatch (2 tasks, srun
--mpi=pmi2 with the PyPI MPICH) and of the jobs/mnist-baselines.sbatch array; the singleton launch
(srun without an MPI plugin) refused with one line; a job killed by its time limit and submitted
again ends with the files of an uninterrupted run; ``scontrol requeue`` of a running job, and of a
job whose ranks were SIGKILLed (MPICH's shared-memory segments left in /dev/shm), resume to the
files of an uninterrupted run.  The time-limit job takes 1 to 1.5 minutes to be stopped; a
requeued job waits ``cred_expire`` (10 s in scripts/slurm_up) before it starts again.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from apts_mpi.results import load_checkpoint, read_metrics
from test_cli import assert_same_trajectory

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]
DIGITS = ["--set", "data.dataset=digits", "--set", "model.name=mlp-digits"]
EPOCHS = 40  # APTS on digits, full batch: one iteration and one checkpoint per epoch (about 0.5 s)
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def _cluster_problem():
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        return "SLURM_CONF is not set: no SLURM cluster to submit to (scripts/slurm_up starts one)"
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (scripts/slurm_up installs SLURM)"
    probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        return f"the SLURM cluster of {conf} does not answer: {probe.stderr.strip()}"
    return None


problem = _cluster_problem()
if problem:
    pytestmark.append(pytest.mark.skip(reason=problem))


def sbatch(tmp, script, *args, wait=False, env=None, options=()):
    """Submit jobs/SCRIPT from the checkout, log files and run folders under ``tmp``; returns the
    job ID (with ``wait``: after the job ended, and the exit status of ``sbatch --wait``)."""
    exports = {"APTS_DATA": str(tmp / "data"), "VENV": str(VENV), "OUT_ROOT": str(tmp / "runs"),
               **(env or {})}
    (tmp / "data").mkdir(parents=True, exist_ok=True)  # digits need no files, the script a folder
    # the log files, named by the script's --output, go to the job's working folder (--chdir)
    cmd = ["sbatch", "--parsable", f"--chdir={tmp}", "--cpus-per-task=1",
           "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()), *options,
           *(["--wait"] if wait else []), str(REPO / "jobs" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else None
    assert job, f"sbatch printed no job ID:\n{proc.stderr}"
    return (job, proc.returncode) if wait else job


def job_field(job, field):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         timeout=30).stdout
    found = re.search(rf"\b{field}=(\S+)", out)
    return found.group(1) if found else None


def wait_until(what, condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(1)


def wait_ended(job, timeout=600, restarts=0):
    """Wait until the job has ended (after ``restarts`` requeues); returns its state."""
    final = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY")
    wait_until(f"job {job} to end", lambda: job_field(job, "JobState") in final
               and int(job_field(job, "Restarts") or 0) >= restarts, timeout)
    return job_field(job, "JobState")


def log_of(tmp, name, job):
    return (tmp / f"{name}-{job}.out").read_text()


def rank_pids(run_dir):
    """The training processes whose command line names ``run_dir``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if b"apts_mpi" in cmdline and str(run_dir).encode() in cmdline:
                    pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted APTS run of the job script, EPOCHS epochs (also the plain sbatch check)."""
    tmp = tmp_path_factory.mktemp("reference")
    job, rc = sbatch(tmp, "mnist-apts.sbatch", *DIGITS, "--set", f"epochs={EPOCHS}",
                     wait=True, options=["--ntasks=2"])
    return tmp, job, rc


def test_mnist_apts_job_runs_two_ranks_in_one_world(reference):
    tmp, job, rc = reference
    log = log_of(tmp, "mnist-apts", job)
    assert rc == 0, log
    assert "run mnist-apts-n2: apts on 2 rank(s)" in log, log
    _, epochs, attrs = read_metrics(tmp / "runs" / "mnist-apts-n2-seed0" / "metrics.h5")
    assert attrs["world_size"] == 2 and epochs["epoch"][-1] == EPOCHS
    assert epochs["test_accuracy"][-1] > 0.9, epochs["test_accuracy"][-1]


def test_baselines_array_runs_and_logs_under_the_array_job_id(tmp_path):
    array, rc = sbatch(tmp_path, "mnist-baselines.sbatch", *DIGITS, "--set", "epochs=2",
                       wait=True, options=["--ntasks=2", "--array=0-3"])
    for index, method in enumerate(("adam", "sgd", "lbfgs", "tr")):
        log_file = tmp_path / f"mnist-baselines-{array}_{index}.out"  # the script's --output=%x-%A_%a
        assert log_file.exists(), sorted(p.name for p in tmp_path.iterdir())
        log = log_file.read_text()
        assert f"mnist-baselines: job {array}_{index} " in log, log
        assert "on 2 rank(s)" in log, log
        _, epochs, attrs = read_metrics(tmp_path / "runs" / f"mnist-{method}-n2-seed0" / "metrics.h5")
        assert attrs["method"] == method and attrs["world_size"] == 2 and epochs["epoch"][-1] == 2
    assert rc == 0


def test_singleton_launch_is_refused_with_one_line(tmp_path):
    job, rc = sbatch(tmp_path, "mnist-apts.sbatch", *DIGITS, wait=True, env={"SRUN_MPI": "none"},
                     options=["--ntasks=2"])
    log = log_of(tmp_path, "mnist-apts", job)
    errors = [line for line in log.splitlines() if line.startswith("apts-mpi: error:")]
    assert rc != 0 and len(errors) == 1, log
    assert "srun started 2 separate one-rank MPI worlds" in errors[0], log
    assert not (tmp_path / "runs" / "mnist-apts-n2-seed0").exists()


def test_job_killed_by_its_time_limit_resumes_to_the_uninterrupted_result(tmp_path):
    """--time=1: SLURM sends SIGTERM after 1 to 1.5 minutes; the ranks write a checkpoint (the only
    one: checkpoint_every is larger than the run) and exit 75.  The same sbatch line submitted
    again, with an end in reach, resumes it; a run of that length uninterrupted gives the same bits."""
    long_run = ["--set", "checkpoint_every=1000000"]
    killed = tmp_path / "killed"
    job, _ = sbatch(killed, "mnist-apts.sbatch", *DIGITS, *long_run, "--set", "epochs=1000000",
                    wait=True, options=["--ntasks=2", "--time=1"])
    log = log_of(killed, "mnist-apts", job)
    assert job_field(job, "JobState") == "TIMEOUT", log
    assert "apts-mpi: stopped: SIGTERM received: checkpoint written" in log, log
    run_dir = killed / "runs" / "mnist-apts-n2-seed0"
    stopped_at = load_checkpoint(run_dir / "checkpoint.h5")[0]["epoch"]
    assert stopped_at > 0, log
    end = ["--set", f"epochs={stopped_at + 3}"]
    again = sbatch(killed, "mnist-apts.sbatch", *DIGITS, *long_run, *end, options=["--ntasks=2"])
    whole, rc = sbatch(tmp_path / "whole", "mnist-apts.sbatch", *DIGITS, *long_run, *end, wait=True,
                       options=["--ntasks=2"])
    assert rc == 0, log_of(tmp_path / "whole", "mnist-apts", whole)
    assert wait_ended(again) == "COMPLETED", log_of(killed, "mnist-apts", again)
    assert "resuming its checkpoint" in log_of(killed, "mnist-apts", again)
    assert_same_trajectory(tmp_path / "whole" / "runs" / "mnist-apts-n2-seed0", run_dir)


@pytest.mark.parametrize("how", ["running", "after SIGKILL"])
def test_requeued_job_resumes_to_the_uninterrupted_result(reference, tmp_path, how):
    """``scontrol requeue`` of a running job (SIGTERM: a checkpoint, exit 75), or of a job whose
    ranks were SIGKILLed (as by a node fault: MPICH's shared-memory segments stay in /dev/shm).
    The requeued job keeps its ID and numbers its steps from 0 again; it resumes and ends with the
    files of the uninterrupted reference run."""
    ref_tmp, ref_job, ref_rc = reference
    assert ref_rc == 0, log_of(ref_tmp, "mnist-apts", ref_job)
    job = sbatch(tmp_path, "mnist-apts.sbatch", *DIGITS, "--set", f"epochs={EPOCHS}",
                 options=["--ntasks=2"])
    run_dir = tmp_path / "runs" / "mnist-apts-n2-seed0"
    wait_until("the first checkpoint", lambda: (run_dir / "checkpoint.h5").exists()
               or job_field(job, "JobState") not in ("PENDING", "RUNNING"), 300)
    assert job_field(job, "JobState") == "RUNNING", log_of(tmp_path, "mnist-apts", job)
    if how == "after SIGKILL":
        for pid in rank_pids(run_dir):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(f"job {job} to fail", lambda: job_field(job, "JobState") == "FAILED", 120)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    state = wait_ended(job, restarts=1)
    log = log_of(tmp_path, "mnist-apts", job)
    assert state == "COMPLETED", log
    assert "resuming its checkpoint" in log, log
    if how == "running":
        assert "apts-mpi: stopped: SIGTERM received" in log, log
    assert_same_trajectory(ref_tmp / "runs" / "mnist-apts-n2-seed0", run_dir)


def test_an_array_of_two_seeds_runs_one_folder_per_seed(tmp_path):
    """``sbatch --array=0-1`` of jobs/mnist-apts.sbatch without SEED: task i trains seed i into its
    own run folder (before, both tasks trained seed 0 into one folder)."""
    array, rc = sbatch(tmp_path, "mnist-apts.sbatch", *DIGITS, "--set", "epochs=3", wait=True,
                       options=["--ntasks=2", "--array=0-1"])
    logs = {p.name: p.read_text() for p in tmp_path.glob("mnist-apts-*.out")}
    assert rc == 0 and len(logs) == 2, logs
    first_losses = []
    for seed in (0, 1):
        run_dir = tmp_path / "runs" / f"mnist-apts-n2-seed{seed}"
        (log,) = [text for text in logs.values() if f"seed {seed} -> {run_dir}," in text]
        assert f"mnist-apts: job {array}_{seed} " in log, log
        iterations, epochs, attrs = read_metrics(run_dir / "metrics.h5")
        assert attrs["seed"] == seed and attrs["config"]["seed"] == seed and attrs["world_size"] == 2
        assert epochs["epoch"].tolist() == [1, 2, 3]
        first_losses.append(iterations["loss"][0])
    assert first_losses[0] != first_losses[1]  # two initialisations, not one run twice
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mnist-apts-n2-seed0",
                                                                     "mnist-apts-n2-seed1"]
