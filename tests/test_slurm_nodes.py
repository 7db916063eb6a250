"""Jobs across two nodes of a real SLURM: 2 nodes x 2 tasks, MPICH over TCP between them.

Needs the two-node cluster of ``scripts/slurm_up start DIR --nodes=2`` (root) and
``SLURM_CONF=DIR/slurm.conf``; CI starts it after the one-node tests (.ci/run).  Without it every
test here is skipped and says why.  The nodes apts-node1 and apts-node2 are namespaces of this
machine, each with its own network, host name, /dev/shm, /tmp and boot id; SLURM talks over one
network (eth0), MPI over another (eth1, ``UCX_NET_DEVICES=eth1``); DIR is the shared file system.

* A cut data link stops the traffic between the nodes: they are not one host in disguise.
* The jobs/mnist-apts.sbatch job on 2 nodes x 2 tasks (digits) ends with the bits of the serial
  emulation of its four subdomains; SLURM_LOCALID (the node-local rank, which picks a GPU) and the
  host of every rank are in its metrics.h5.  MPICH adds the ranks' shares in rank order here, as
  the serial emulation does (a flat reduction tree, ``MPICH_IN_RANK_ORDER``); its default adds
  them pairwise, which differs in the last bits.
* One node's slurmd, steps and ranks SIGKILLed mid-run: the job ends within 60 s, SLURM requeues
  it, and once the node is back it resumes to the serial emulation's bits.
* One node's data link cut mid-run: the ranks' watchdog (watchdog_s) ends the job with one line
  and exit 75, the job requeues itself, and with the link mended it resumes to the same bits.
The times measured are printed (``-s`` shows them).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apts_mpi.results import load_checkpoint, read_metrics
from test_cli import trajectory

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]
NODES = ("apts-node1", "apts-node2")
EPOCHS = 30  # digits, minibatch 100: 16 iterations and one checkpoint per epoch (about 0.3 s)
RUN = ["--set", "data.dataset=digits", "--set", "model.name=mlp-digits",
       "--set", "data.batch_size=100", "--set", f"epochs={EPOCHS}"]
WATCHDOG_S = 15
# MPICH: the data network, and reductions in rank order (a flat tree: the root adds the ranks'
# contributions one after another, as the serial emulation adds its subdomains' shares)
MPICH_IN_RANK_ORDER = {
    "MPIR_CVAR_DEVICE_COLLECTIVES": "none",
    "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "tree", "MPIR_CVAR_ALLREDUCE_TREE_TYPE": "knomial_1",
    "MPIR_CVAR_ALLREDUCE_TREE_KVAL": "64",
    "MPIR_CVAR_REDUCE_INTRA_ALGORITHM": "nb", "MPIR_CVAR_IREDUCE_INTRA_ALGORITHM": "tsp_tree",
    "MPIR_CVAR_IREDUCE_TREE_TYPE": "knomial_1", "MPIR_CVAR_IREDUCE_TREE_KVAL": "64"}
MPI_ENV = {"UCX_NET_DEVICES": "eth1", **MPICH_IN_RANK_ORDER}
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]


def _cluster():
    """(DIR of the two-node cluster, None) or (None, why not)."""
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        return None, ("SLURM_CONF is not set: no SLURM cluster to submit to "
                      "(scripts/slurm_up start DIR --nodes=2 starts one)")
    if shutil.which("sbatch") is None:
        return None, "sbatch is not installed (scripts/slurm_up installs SLURM)"
    root = Path(conf).parent
    listed = (root / "nodes" / "list").read_text().split() if (root / "nodes" / "list").exists() else []
    if tuple(listed) != NODES:
        return None, f"the SLURM of {conf} is not the two-node cluster of scripts/slurm_up --nodes=2"
    probe = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or sorted(probe.stdout.split()) != list(NODES):
        return None, f"the SLURM cluster of {conf} does not answer with two nodes: {probe.stderr.strip()}"
    return root, None


CLUSTER, problem = _cluster()
if problem:
    pytestmark.append(pytest.mark.skip(reason=problem))


def slurm_up(action, *args):
    subprocess.run([str(REPO / "scripts" / "slurm_up"), action, str(CLUSTER), *args], check=True,
                   timeout=60)


def node_states():
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                         timeout=30).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def job_field(job, field):
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                         timeout=30).stdout
    found = re.search(rf"\b{field}=(\S+)", out)
    return found.group(1) if found else None


def wait_until(what, condition, timeout, poll=0.2):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(poll)


@pytest.fixture(autouse=True)
def healthy_nodes():
    """Every test starts and ends with both nodes up, their links up and no job in the queue."""
    def mend():
        subprocess.run(["scancel", "--user=root"], capture_output=True, timeout=30)
        for node in NODES:
            slurm_up("link", node, "up")
            if node_states().get(node, "").startswith("down"):
                slurm_up("node-up", node)
        wait_until("both nodes idle", lambda: set(node_states().values()) == {"idle"}, 120, poll=1)
    mend()
    yield
    mend()


@pytest.fixture
def shared(request):
    """A folder on the nodes' shared file system (DIR) for the test's jobs."""
    where = CLUSTER / "shared" / request.node.name.replace("[", "-").replace("]", "")
    shutil.rmtree(where, ignore_errors=True)
    (where / "data").mkdir(parents=True)  # digits need no files, the job script a folder
    return where


def sbatch(where, *args, wait=False):
    """jobs/mnist-apts.sbatch on 2 nodes x 2 tasks; the job ID (with ``wait``: and sbatch's status)."""
    exports = {"APTS_DATA": str(where / "data"), "VENV": str(VENV), "OUT_ROOT": str(where / "runs"),
               "OMP_NUM_THREADS": "1", **MPI_ENV}
    cmd = ["sbatch", "--parsable", f"--chdir={where}", "--nodes=2", "--ntasks=4",
           "--ntasks-per-node=2", "--cpus-per-task=1",
           "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()),
           *(["--wait"] if wait else []), str(REPO / "jobs" / "mnist-apts.sbatch"), *RUN, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    job = proc.stdout.strip().splitlines()[0].split(";")[0] if proc.stdout.strip() else None
    assert job, f"sbatch printed no job ID:\n{proc.stderr}"
    return (job, proc.returncode) if wait else job


def log_of(where, job):
    return (where / f"mnist-apts-{job}.out").read_text()


def run_dir(where):
    return where / "runs" / "mnist-apts-n4-seed0"


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The serial emulation of the job's run (one process, four subdomains), on this host."""
    out = tmp_path_factory.mktemp("serial") / "run"
    proc = subprocess.run([sys.executable, "-m", "apts_mpi", "train",
                           str(REPO / "configs" / "mnist-apts-n4.yaml"), *RUN, "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def assert_serial_bits(serial_dir, job_dir):
    """Every series, parameter, the RNG and the sampler of the job's files bitwise the serial
    emulation's (wall-time series left out; the attributes differ by world size and hosts)."""
    arrays_s, other_s = trajectory(serial_dir)
    arrays_j, other_j = trajectory(job_dir)
    assert sorted(arrays_s) == sorted(arrays_j)
    differ = [name for name, x in arrays_s.items()
              if x.dtype != arrays_j[name].dtype or x.tobytes() != arrays_j[name].tobytes()]
    assert not differ, f"{job_dir} differs from the serial emulation bitwise in {differ}"
    assert other_s["sampler"] == other_j["sampler"] and other_s["epoch"] == other_j["epoch"] == EPOCHS
    assert other_s["meta"]["config_hash"] == other_j["meta"]["config_hash"]


PROBE = """
import sys, time
from mpi4py import MPI
import numpy as np
comm, a = MPI.COMM_WORLD, np.ones(1000)
for i in range(int(sys.argv[1])):
    comm.Allreduce(MPI.IN_PLACE, a)
    if comm.rank == 0:
        print(i, time.monotonic(), flush=True)
    time.sleep(0.2)
"""


def test_a_cut_data_link_stops_the_traffic(shared):
    """An Allreduce every 0.2 s across the nodes goes on while the link is up and stops when
    apts-node2's data link goes down (with shared memory between "nodes" it would go on)."""
    (shared / "probe.py").write_text(PROBE)
    out = shared / "probe.out"
    with open(out, "w") as sink:
        srun = subprocess.Popen(["srun", "--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--mpi=pmi2",
                                 f"--chdir={shared}", f"--export=ALL,UCX_NET_DEVICES=eth1",
                                 str(VENV / "bin" / "python"), str(shared / "probe.py"), "1000"],
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until("ten collectives across the nodes", lambda: len(out.read_text().splitlines()) >= 10, 120)
        slurm_up("link", "apts-node2", "down", "data")
        cut = time.monotonic()
        time.sleep(6)
        times = [float(line.split()[1]) for line in out.read_text().splitlines() if len(line.split()) == 2]
    finally:
        srun.kill()
        srun.wait()
    before = [t for t in times if t < cut]
    after = [t for t in times if t > cut + 1]  # a collective under way at the cut may end
    assert len(before) >= 10 and not after, (f"{len(before)} collectives before the cut, "
                                             f"{len(after)} after it:\n{out.read_text()[-2000:]}")


def test_job_on_two_nodes_equals_the_serial_emulation(shared, serial):
    job, rc = sbatch(shared, wait=True)
    log = log_of(shared, job)
    assert rc == 0, log
    assert "run mnist-apts-n4: apts on 4 rank(s)" in log, log
    _, _, attrs = read_metrics(run_dir(shared) / "metrics.h5")
    assert attrs["world_size"] == 4
    # the node-local rank (SLURM_LOCALID: a GPU's index on a cluster) and the host of every rank
    assert attrs["hosts"] == ["apts-node1", "apts-node1", "apts-node2", "apts-node2"], attrs["hosts"]
    assert attrs["local_ranks"] == [0, 1, 0, 1], attrs["local_ranks"]
    assert_serial_bits(serial, run_dir(shared))


def _until_first_checkpoint(shared, job):
    wait_until("the first checkpoint", lambda: (run_dir(shared) / "checkpoint.h5").exists()
               or job_field(job, "JobState") not in ("PENDING", "RUNNING"), 300)
    assert job_field(job, "JobState") == "RUNNING", log_of(shared, job)
    time.sleep(1)  # mid-run, past the first checkpoint


def _ended(job):
    """The job's first run is over: requeued (pending, or running again) or ended for good."""
    return (int(job_field(job, "Restarts") or 0) >= 1
            or job_field(job, "JobState") not in ("RUNNING", "COMPLETING"))


def _completed_after_requeue(shared, job, serial):
    wait_until(f"job {job} to complete after its requeue", lambda: job_field(job, "JobState")
               in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), 600, poll=1)
    log = log_of(shared, job)
    assert job_field(job, "JobState") == "COMPLETED" and int(job_field(job, "Restarts")) >= 1, log
    assert "resuming its checkpoint" in log, log
    assert_serial_bits(serial, run_dir(shared))
    return log


def test_a_killed_node_ends_the_job_and_a_requeue_resumes_it(shared, serial):
    """SIGKILL of every process of apts-node2 (slurmd, steps, ranks) mid-run, as a node that dies:
    SLURM finds the node down, ends the job and requeues it (--requeue); the node back, the job
    resumes from its checkpoint to the serial emulation's bits."""
    job = sbatch(shared)
    _until_first_checkpoint(shared, job)
    slurm_up("kill-node", "apts-node2")
    killed = time.monotonic()
    wait_until("the job to end after the node's death", lambda: _ended(job), 120)
    took = time.monotonic() - killed
    print(f"\nnode killed -> job ended (requeued): {took:.1f} s")
    assert took < 60, f"the job ended {took:.0f} s after its node died"
    slurm_up("node-up", "apts-node2")
    _completed_after_requeue(shared, job, serial)


def test_a_cut_data_link_ends_the_job_by_the_watchdog(shared, serial):
    """apts-node2's data link cut mid-run: every rank waits in a collective for ever, SLURM still
    reaches both nodes.  The watchdog ends the job within watchdog_s (and the few seconds the
    ranks take to exit): one line naming the iteration and rank 0, exit 75 (the job script then
    requeues it), the checkpoint intact; with the link mended the job resumes to the serial
    emulation's bits."""
    job = sbatch(shared, "--set", f"watchdog_s={WATCHDOG_S}")
    _until_first_checkpoint(shared, job)
    slurm_up("link", "apts-node2", "down", "data")
    cut = time.monotonic()
    wait_until("the job to end after the cut", lambda: _ended(job), 120)
    took = time.monotonic() - cut
    slurm_up("link", "apts-node2", "up", "data")
    print(f"\ndata link cut -> job ended (requeued itself): {took:.1f} s (watchdog_s {WATCHDOG_S})")
    payload, meta = load_checkpoint(run_dir(shared) / "checkpoint.h5")  # intact: it loads, verified
    assert payload["epoch"] >= 1 and meta["world_size"] == 4
    log = _completed_after_requeue(shared, job, serial)
    first_run = log.split("resuming its checkpoint")[0]
    said = [line for line in first_run.splitlines() if line.startswith("apts-mpi:")]
    assert len(said) == 1 and re.match(r"apts-mpi: error: watchdog: iteration \d+ \(epoch \d+, "
                                       r"minibatch \d+ of 16\) made no progress on rank 0 ", said[0]), first_run
    assert "mnist-apts: stopped with a checkpoint: requeueing job" in first_run, first_run  # exit 75
    assert took < WATCHDOG_S + 10, f"the job ended {took:.0f} s after the cut (watchdog_s {WATCHDOG_S})"
