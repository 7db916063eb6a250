"""The command line as a user runs it: ``python -m apts_mpi`` and ``mpiexec -n 2 python -m mpi4py
-m apts_mpi`` in subprocesses, on the digits demo (a few epochs take about a second).

Every launch costs a torch import per rank, so runs are shared through module fixtures and the
launches one fixture needs run side by side.  The bad-input cases that need no MPI world run as
forked children of one process that imported torch once (``FORK_SERVER``): each case is still a
process of its own, with its argv, its stdout/stderr file descriptors, MPI initialised in it and its
exit status; one case also runs from a fresh interpreter, and the two-rank cases are real launches.
Every launch has a timeout, after which it and its descendants are killed by pid.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from apts_mpi.results import load_checkpoint, read_metrics

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo.yaml"
PYTHON = sys.executable
MPIEXEC = shutil.which("mpiexec", path=str(Path(PYTHON).parent) + os.pathsep + os.environ["PATH"])
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
ENV.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",  # no GPU, so device=cuda must be refused
           PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
LAUNCH_TIMEOUT = 240
ERROR_PREFIX = "apts-mpi: error: "
SMALL_BATCH = ["--set", "data.batch_size=100"]  # 15 minibatches per epoch instead of 1
UNTIL_KILLED = ["--set", "epochs=1000", "--set", "checkpoint_every=1"]
EXPECTED_SERIES = ("epoch", "loss", "final_loss", "radius", "rho", "accepted", "step_inf",
                   "loss_evals", "grad_evals", "seconds")


class Result(NamedTuple):
    rc: int
    out: str
    err: str

    def show(self):
        return f"exit status {self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


# ---------------------------------------------------------------------------------------------
# launching and killing

def _process_table():
    """{pid: (parent pid, state)} from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def descendants(pid):
    table = _process_table()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (ppid, _) in table.items() if ppid == parent]
        found += kids
        todo += kids
    return found


def alive(pids, wait=0.0):
    """The pids of ``pids`` still running after up to ``wait`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + wait
    while True:
        table = _process_table()
        running = [p for p in pids if p in table and table[p][1] != "Z"]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.1)


def _kill(pids):
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


_LAUNCHED = []


@pytest.fixture(scope="module", autouse=True)
def _no_launch_outlives_the_module():
    yield
    for launch in _LAUNCHED:
        if launch.proc.poll() is None:
            launch.kill()


class Launch:
    """One command line started in its own session, stdout/stderr into files under ``where``."""

    def __init__(self, where, args, ranks=1, env=None, program=None, preexec_fn=None):
        if ranks > 1 and MPIEXEC is None:
            pytest.fail("mpiexec not found: install the project with the 'mpich' extra or a system MPI")
        where = Path(where)
        name = f"launch-{time.monotonic_ns()}"
        self.out_path, self.err_path = where / f"{name}.out", where / f"{name}.err"
        args = [str(a) for a in args]
        cmd = ([PYTHON, "-m", "apts_mpi", *args] if ranks == 1 and program is None else
               [MPIEXEC, "-n", str(ranks), *(program or [PYTHON, "-m", "mpi4py", "-m", "apts_mpi"]),
                *args])
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=where, env={**ENV, **(env or {})},
                                         start_new_session=True, preexec_fn=preexec_fn)
        _LAUNCHED.append(self)

    def result(self):
        return Result(self.proc.returncode, self.out_path.read_text(), self.err_path.read_text())

    def rank_pids(self):
        """The Python processes below the launch running apts_mpi (the ranks), or the launch itself."""
        ranks = []
        for pid in descendants(self.proc.pid):
            with suppress(OSError):
                if b"apts_mpi" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    ranks.append(pid)
        return ranks or [self.proc.pid]

    def kill(self):
        _kill([self.proc.pid, *descendants(self.proc.pid)])
        self.proc.wait()

    def wait(self, timeout=LAUNCH_TIMEOUT) -> Result:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.proc.args} still running after {timeout} s; killed")
        return self.result()

    def wait_for_output(self, text, timeout=LAUNCH_TIMEOUT):
        """Poll until ``text`` is in the launch's stdout; fails if it ends first or the time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.out_path.read_text():
            if self.proc.poll() is not None:
                pytest.fail(f"launch ended before it printed {text!r}:\n{self.result().show()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{text!r} not printed within {timeout} s")
            time.sleep(0.02)

    def wait_for(self, path, timeout=LAUNCH_TIMEOUT):
        """Poll until ``path`` exists; fails if the launch ends first or the time runs out."""
        deadline = time.monotonic() + timeout
        while not Path(path).exists():
            if self.proc.poll() is not None:
                pytest.fail(f"launch ended before {path} was written:\n{self.result().show()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{path} not written within {timeout} s")
            time.sleep(0.02)


def run_all(where, launches):
    """Start ``{key: (args, ranks)}`` side by side; ``{key: Result}`` once all have ended."""
    started = {k: Launch(where, args, ranks) for k, (args, ranks) in launches.items()}
    return {k: launch.wait() for k, launch in started.items()}


# ---------------------------------------------------------------------------------------------
# checks

def assert_ok(result, what):
    assert result.rc == 0, f"{what} failed:\n{result.show()}"


def assert_one_error_line(result, *words):
    """Exit status 2 and exactly one line ``apts-mpi: error: ...`` on stderr holding ``words``."""
    assert result.rc == 2, f"expected exit status 2:\n{result.show()}"
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), \
        f"expected exactly one line '{ERROR_PREFIX}...' on stderr:\n{result.show()}"
    for word in words:
        assert str(word) in lines[0], f"the message does not name {str(word)!r}: {lines[0]}"


def folder_state(path):
    """Names and SHA-256 of everything under ``path`` (None if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "folder" for p in sorted(path.rglob("*"))}


# attributes that say where and under which job a run ran, not what it computed: a requeued or
# resubmitted job gets a new SLURM job id, and may land on other hosts
PLACE = ("slurm_job_id", "hosts", "local_ranks")


def trajectory(run_dir):
    """What a run's files say about its trajectory, wall-time series (``seconds*``) and the
    attributes of its place (:data:`PLACE`) left out."""
    run_dir = Path(run_dir)
    iterations, epochs, attrs = read_metrics(run_dir / "metrics.h5")
    payload, meta = load_checkpoint(run_dir / "checkpoint.h5")
    arrays = {}
    for group, series in (("metrics iterations", iterations), ("metrics epochs", epochs),
                          ("checkpoint iterations", payload["iterations"]),
                          ("checkpoint epochs", payload["epochs"])):
        for name, values in series.items():
            if not name.startswith("seconds"):
                arrays[f"{group}/{name}"] = np.asarray(values)
    for name, tensor in payload["model"].items():
        arrays[f"parameter {name}"] = tensor.numpy()
    arrays["torch RNG state"] = payload["rng"]["torch"].numpy()
    attrs = {k: v for k, v in attrs.items() if k not in PLACE}
    other = {"attrs": attrs, "meta": meta, "epoch": payload["epoch"], "sampler": payload["sampler"]}
    return arrays, other


def assert_same_trajectory(a, b):
    """Metric series, parameters, RNG and sampler state of runs ``a`` and ``b`` bitwise equal."""
    arrays_a, other_a = trajectory(a)
    arrays_b, other_b = trajectory(b)
    assert sorted(arrays_a) == sorted(arrays_b), f"different series in {a} and {b}"
    differ = []
    for name, x in arrays_a.items():
        y = arrays_b[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            where = ""
            if x.dtype == y.dtype and x.shape == y.shape and x.ndim == 1:
                first = next(i for i in range(len(x)) if x[i:i + 1].tobytes() != y[i:i + 1].tobytes())
                where = f" (first at index {first} of {len(x)})"
            differ.append(f"{name}{where}: {x.dtype}{list(x.shape)} {x.ravel()[:4]} vs "
                          f"{y.dtype}{list(y.shape)} {y.ravel()[:4]}")
    assert not differ, f"{a} and {b} differ bitwise in:\n" + "\n".join(differ)
    for key, value in other_a.items():
        assert value == other_b[key], f"{key} differs: {value!r} vs {other_b[key]!r}"


# ---------------------------------------------------------------------------------------------
# 1. end to end: train on 1 process and on 2 ranks, report, plot

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    dirs = {"serial": tmp / "serial", "two-ranks": tmp / "two-ranks"}
    trained = run_all(tmp, {
        "serial": (["train", CONFIG, "--set", "epochs=3", "--out", dirs["serial"]], 1),
        "two-ranks": (["train", CONFIG, "--set", "epochs=3", "--out", dirs["two-ranks"]], 2)})
    for key, result in trained.items():
        assert_ok(result, f"train ({key})")
    shown = run_all(tmp, {"report": (["report", *dirs.values()], 1),
                          "plot": (["plot", *dirs.values(), "--out", tmp / "figure.png"], 1)})
    return dirs, trained, shown, tmp / "figure.png"


@pytest.mark.parametrize("key, world", [("serial", 1), ("two-ranks", 2)])
def test_train_writes_metrics_and_checkpoint(demo, key, world):
    dirs, trained, _, _ = demo
    iterations, epochs, attrs = read_metrics(dirs[key] / "metrics.h5")
    assert epochs["epoch"].tolist() == [1, 2, 3]
    for name in ("test_accuracy", "train_accuracy"):
        values = epochs[name]
        assert np.all((values >= 0) & (values <= 1)), f"{name} outside [0, 1]: {values}"
    assert epochs["loss"][-1] < epochs["loss"][0], "three epochs of APTS did not lower the loss"
    missing = set(EXPECTED_SERIES) - set(iterations)
    assert not missing, f"iteration series missing: {sorted(missing)}"
    assert iterations["epoch"].tolist() == [1, 2, 3]  # full batch: one iteration per epoch
    assert attrs["world_size"] == world and attrs["method"] == "apts" and attrs["subdomains"] == world
    assert attrs["config"]["epochs"] == 3
    payload, meta = load_checkpoint(dirs[key] / "checkpoint.h5")
    assert payload["epoch"] == 3 and meta["world_size"] == world
    epoch_lines = [line for line in trained[key].out.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 3, f"expected one line per epoch, from rank 0 only:\n{trained[key].out}"


def test_report_prints_one_row_per_run(demo):
    dirs, _, shown, _ = demo
    assert_ok(shown["report"], "report")
    lines = [line for line in shown["report"].out.splitlines() if line.strip()]
    assert lines[0].split()[:2] == ["run", "seeds"] and set(lines[1]) <= {"-", " "}, shown["report"].out
    rows = lines[2:]
    assert len(rows) == len(dirs), f"expected {len(dirs)} rows:\n{shown['report'].out}"
    for (name, run_dir), row in zip(dirs.items(), rows):
        _, epochs, _ = read_metrics(run_dir / "metrics.h5")
        cells = row.split()  # apts N=<world> <folder> <seeds> <epochs> <final acc %> ...
        assert name in cells and cells[3:5] == ["1", "3"], row
        assert f"{100 * epochs['test_accuracy'][-1]:.2f}" in cells, row


def test_plot_writes_png(demo):
    _, _, shown, figure = demo
    assert_ok(shown["plot"], "plot")
    data = figure.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    assert data[-8:-4] == b"IEND", "the PNG file is truncated"
    assert str(figure) in shown["plot"].out


# ---------------------------------------------------------------------------------------------
# 3. exact resume, TR on 1 process (its 2-epoch folder, copied, serves the bad-input cases)

@pytest.fixture(scope="module")
def tr_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tr")
    base = ["train", CONFIG, "--set", "optimizer.method=tr", *SMALL_BATCH]
    results = run_all(tmp, {"whole": ([*base, "--set", "epochs=4", "--out", tmp / "whole"], 1),
                            "first": ([*base, "--set", "epochs=2", "--out", tmp / "resumed"], 1)})
    if results["first"].rc == 0:
        shutil.copytree(tmp / "resumed", tmp / "two-epochs")
    resume = [*base, "--set", "epochs=4", "--resume", "--out", tmp / "resumed"]
    results["second"] = Launch(tmp, resume).wait()
    return tmp, results


def test_tr_resume_is_exact(tr_runs):
    tmp, results = tr_runs
    for key in ("whole", "first", "second"):
        assert_ok(results[key], f"TR run '{key}'")
    assert "epoch   3" in results["second"].out and "epoch   1" not in results["second"].out
    assert_same_trajectory(tmp / "whole", tmp / "resumed")


# ---------------------------------------------------------------------------------------------
# 2. bad input: one line, exit status 2, nothing written

FORK_SERVER = r'''
import json, os, runpy, signal, sys, traceback
import h5py, numpy, sklearn.datasets, sklearn.model_selection, torch, yaml  # the slow imports, once
import apts_mpi.cli  # not mpi4py.MPI: each child initialises MPI itself, as a fresh process does
codes = []
for case in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.chdir(case["cwd"])
        for fd, name in ((1, "out"), (2, "err")):
            f = os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        signal.alarm(case["timeout"])
        os.environ.update(case["env"])
        sys.argv = ["apts_mpi", *case["args"]]
        code = 0
        try:
            runpy.run_module("apts_mpi", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
'''

# name: (command line with {config}, {tmp} (the files of _bad_files), {ckpt} (a copy of the 2-epoch
# TR run, 1 rank) and {out} (a fresh --out folder that must not exist afterwards); words the one
# error line must hold)
TR_RUN = "train {config} --set optimizer.method=tr --set data.batch_size=100"
BAD_INPUT = {
    "unknown top-level key": ("train {config} --set epochz=3 --out {out}", ["epochz", "unknown key"]),
    "unknown key in a section": ("train {config} --set optimizer.radiuss=0.05 --out {out}",
                                 ["optimizer.radiuss", "unknown key"]),
    "section not a mapping": ("train {config} --set optimizer=3 --out {out}", ["optimizer", "mapping"]),
    "method not a string": ("train {config} --set optimizer.method=[tr] --out {out}",
                            ["optimizer.method", "['tr']"]),
    "seed out of range": ("train {config} --set seed=18446744073709551616 --out {out}",
                          ["seed", "18446744073709551616"]),
    "wrong type from --set": ("train {config} --set epochs=ten --out {out}",
                              ["epochs", "integer", "'ten'"]),
    "wrong type in the file": ("train {tmp}/ten.yaml --out {out}", ["epochs", "integer", "'ten'"]),
    "--set value not YAML": ("train {config} --set epochs=[1 --out {out}", ["--set epochs", "YAML"]),
    "eta1 > eta2": ("train {config} --set optimizer.eta1=0.8 --out {out}", ["eta1=0.8", "eta2"]),
    "eta1 = eta2": ("train {config} --set optimizer.eta1=0.75 --out {out}", ["eta1=0.75", "eta2"]),
    "radius above max_radius": ("train {config} --set optimizer.radius=0.5 --out {out}",
                                ["radius (0.5)", "max_radius"]),
    "radius below min_radius": (TR_RUN + " --set optimizer.radius=0.00001 --out {out}",
                                ["radius (1e-05)", "min_radius"]),
    "decrease = 0": ("train {config} --set optimizer.decrease=0 --out {out}", ["decrease", "0.0"]),
    "decrease < 0": ("train {config} --set optimizer.decrease=-0.5 --out {out}", ["decrease", "-0.5"]),
    "local_iters = 0": ("train {config} --set optimizer.local_iters=0 --out {out}",
                        ["optimizer.local_iters", ">= 1"]),
    "unknown optimizer method": ("train {config} --set optimizer.method=newton --out {out}",
                                 ["optimizer.method", "'newton'"]),
    "config file missing": ("train {tmp}/missing.yaml --out {out}", ["missing.yaml"]),
    "config file not YAML": ("train {tmp}/broken.yaml --out {out}", ["broken.yaml", "not valid YAML"]),
    "config file binary": ("train {tmp}/binary.yaml --out {out}", ["binary.yaml", "not valid YAML"]),
    "config file not a mapping": ("train {tmp}/list.yaml --set seed=1 --out {out}",
                                  ["list.yaml", "mapping"]),
    "more subdomains than tensors": ("train {config} --set optimizer.subdomains=9 --out {out}",
                                     ["subdomains=9", "4 parameter tensors"]),
    "world size not divisible by replicas": ("train {config} --set optimizer.replicas=3 --out {out}",
                                             ["world size 1", "optimizer.replicas=3"]),
    "MNIST files missing": ("train {config} --set data.dataset=mnist --set data.root={tmp}/no-data "
                            "--out {out}/deeper/run", ["train-images-idx3-ubyte", "no-data"]),
    "IDX file malformed": ("train {config} --set data.dataset=mnist --set data.root={tmp}/bad-idx "
                           "--out {out}", ["magic", "bad-idx/MNIST/raw/train-images-idx3-ubyte"]),
    "device cuda without CUDA": ("train {config} --set device=cuda --out {out}", ["'cuda'"]),
    "duplicate key in the file": ("train {tmp}/twice.yaml --out {out}",
                                  ["twice.yaml", "duplicate key 'radius'", "line 2"]),
    "output folder cannot be created": ("train {config} --out /proc/apts-mpi-run",
                                        ["/proc/apts-mpi-run", "cannot be created"]),
    "output folder empty string": ("train {config} --out {empty}", ["--out is empty"]),
    "one-rank world in a step of two tasks": ("train {config} --out {out}",
                                              ["srun started 2 separate one-rank MPI worlds"]),
    "output folder exists": ("train {config} --out {tmp}/existing", ["existing", "--resume"]),
    "resume without checkpoint": ("train {config} --resume --out {out}", ["--resume", "checkpoint.h5"]),
    "resume a checkpoint of another config": (TR_RUN + " --set optimizer.radius=0.02 --resume --out "
                                              "{ckpt}", ["config_hash", "optimizer.radius (0.02 now"]),
    "resume to fewer epochs than the checkpoint": (TR_RUN + " --set epochs=1 --resume --out {ckpt}",
                                                   ["epoch 2", "epochs=1"]),
    "report of a folder without metrics": ("report {tmp}/existing", ["existing", "metrics.h5"]),
}
FRESH = "unknown top-level key"  # also run from a fresh interpreter
# the environment srun gives a task of a two-task step (without an MPI plugin: a one-rank world)
CASE_ENV = {"one-rank world in a step of two tasks": {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2",
                                                      "SLURM_PROCID": "0"}}


def _bad_files(tmp):
    """The files and folders the bad-input cases point at."""
    (tmp / "broken.yaml").write_text("epochs: [1, 2\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp / "list.yaml").write_text("- epochs\n- 3\n")
    (tmp / "ten.yaml").write_text('epochs: "ten"\n')
    (tmp / "twice.yaml").write_text("optimizer:\n  radius: 0.01\n  method: apts\n  radius: 0.02\n")
    (tmp / "no-data").mkdir()
    raw = tmp / "bad-idx" / "MNIST" / "raw"
    raw.mkdir(parents=True)  # images: magic 0x804 (4 dimensions), not 0x803
    (raw / "train-images-idx3-ubyte").write_bytes(bytes.fromhex("00000804 00000001 00000001 00"))
    (raw / "train-labels-idx1-ubyte").write_bytes(bytes.fromhex("00000801 00000001 00"))
    (tmp / "existing").mkdir()
    (tmp / "existing" / "notes.txt").write_text("mine")


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory, tr_runs):
    tmp = tmp_path_factory.mktemp("bad")
    _bad_files(tmp)
    ckpt = tr_runs[0] / "two-epochs"
    watched = {"existing": tmp / "existing", "checkpoint": ckpt}
    before = {k: folder_state(p) for k, p in watched.items()}
    cases, outs = [], {}
    for i, (name, (line, _)) in enumerate([*BAD_INPUT.items(), ("fresh", BAD_INPUT[FRESH])]):
        outs[name] = tmp / f"out-{i}"
        args = [word.format(config=CONFIG, tmp=tmp, ckpt=ckpt, out=outs[name], empty="")
                for word in line.split()]
        cases.append({"cwd": str(tmp), "out": str(tmp / f"case-{i}.out"), "env": CASE_ENV.get(name, {}),
                      "err": str(tmp / f"case-{i}.err"), "timeout": 120, "args": args})
    fresh = Launch(tmp, cases.pop()["args"])
    server = subprocess.run([PYTHON, "-c", FORK_SERVER], input=json.dumps(cases), capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT, env=ENV, cwd=tmp)
    assert server.returncode == 0, f"fork server failed:\n{server.stdout}\n{server.stderr}"
    codes = json.loads(server.stdout.splitlines()[-1])
    results = {name: Result(code, Path(case["out"]).read_text(), Path(case["err"]).read_text())
               for name, case, code in zip(BAD_INPUT, cases, codes)}
    results["fresh"] = fresh.wait()
    after = {k: folder_state(p) for k, p in watched.items()}
    return results, outs, before, after


@pytest.mark.parametrize("name", [*BAD_INPUT, "fresh"])
def test_bad_input_is_refused_before_any_work(bad_input, name):
    results, outs, _, _ = bad_input
    result = results[name]
    assert_one_error_line(result, *BAD_INPUT[FRESH if name == "fresh" else name][1])
    assert "epoch" not in result.out, f"training started:\n{result.show()}"
    assert not outs[name].exists(), f"a run folder was left behind: {sorted(os.listdir(outs[name]))}"


def test_refused_input_leaves_existing_folders_untouched(bad_input):
    _, _, before, after = bad_input
    for key, state in before.items():
        assert state and after[key] == state, f"the {key} folder changed: {state} -> {after[key]}"


@pytest.fixture(scope="module")
def bad_input_two_ranks(tmp_path_factory, tr_runs):
    tmp = tmp_path_factory.mktemp("bad2")
    ckpt = tr_runs[0] / "two-epochs"
    before = folder_state(ckpt)
    results = run_all(tmp, {
        "subdomains": (["train", CONFIG, "--set", "optimizer.subdomains=3", "--out", tmp / "out"], 2),
        "adam-apts subdomains": (["train", CONFIG, "--set", "optimizer.method=adam-apts", "--set",
                                  "optimizer.subdomains=4", "--out", tmp / "out"], 2),
        "world size": (["train", CONFIG, "--set", "optimizer.method=tr", *SMALL_BATCH, "--resume",
                        "--out", ckpt], 2)})
    return tmp, results, before, folder_state(ckpt)


def test_two_ranks_print_one_message_and_exit_2(bad_input_two_ranks):
    tmp, results, before, after = bad_input_two_ranks
    assert_one_error_line(results["subdomains"], "subdomains=3", "world has 2")
    assert_one_error_line(results["adam-apts subdomains"], "subdomains=4", "world has 2")
    assert not (tmp / "out").exists(), "a run folder was left behind"
    assert_one_error_line(results["world size"], "world_size", "is 1", "expected 2")
    assert after == before, "the refused resume changed the checkpoint folder"


# ---------------------------------------------------------------------------------------------
# 3. exact resume and kills, APTS on two ranks

def _kill_group_after_first_checkpoint(launch, run_dir):
    """SIGKILL the launch's process group once a checkpoint exists; returns ranks still alive 30 s on."""
    launch.wait_for(run_dir / "checkpoint.h5")
    ranks = launch.rank_pids()
    os.killpg(launch.proc.pid, signal.SIGKILL)
    launch.proc.wait(timeout=30)
    survivors = alive(ranks, wait=30)
    _kill(survivors)
    return survivors


@pytest.fixture(scope="module")
def apts_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apts")
    base = ["train", CONFIG, *SMALL_BATCH]
    first = {"whole": Launch(tmp, [*base, "--set", "epochs=4", "--out", tmp / "whole"], 2),
             "first": Launch(tmp, [*base, "--set", "epochs=2", "--out", tmp / "resumed"], 2)}
    killed = Launch(tmp, [*base, *UNTIL_KILLED, "--out", tmp / "killed"], 2)
    survivors = _kill_group_after_first_checkpoint(killed, tmp / "killed")
    killed_at = load_checkpoint(tmp / "killed" / "checkpoint.h5")[0]["epoch"]
    results = {k: launch.wait() for k, launch in first.items()}
    resume = ["--set", "epochs=4", "--resume", "--out"]
    results.update(run_all(tmp, {"second": ([*base, *resume, tmp / "resumed"], 2),
                                 "after kill": ([*base, *resume, tmp / "killed"], 2)}))
    return tmp, results, survivors, killed_at


def test_apts_two_ranks_resume_is_exact(apts_runs):
    tmp, results, _, _ = apts_runs
    for key in ("whole", "first", "second"):
        assert_ok(results[key], f"APTS run '{key}'")
    assert "epoch   3" in results["second"].out and "epoch   1" not in results["second"].out
    assert_same_trajectory(tmp / "whole", tmp / "resumed")


def test_apts_two_ranks_resume_after_sigkill_is_exact(apts_runs):
    tmp, results, survivors, killed_at = apts_runs
    assert not survivors, f"ranks {survivors} outlived the SIGKILL of their mpiexec process group"
    assert 1 <= killed_at < 4, f"the run was killed at epoch {killed_at}, not part-way through 4"
    assert_ok(results["whole"], "APTS run 'whole'")
    assert_ok(results["after kill"], "resume after SIGKILL")
    assert f"epoch   {killed_at + 1}" in results["after kill"].out
    assert_same_trajectory(tmp / "whole", tmp / "killed")


def test_killing_one_rank_ends_the_launch(tmp_path):
    launch = Launch(tmp_path, ["train", CONFIG, *SMALL_BATCH, *UNTIL_KILLED, "--out", tmp_path / "run"],
                    ranks=2)
    launch.wait_for(tmp_path / "run" / "checkpoint.h5")  # both ranks are in the training loop
    ranks = launch.rank_pids()
    assert len(ranks) == 2, f"expected two rank processes, found {ranks}"
    os.kill(ranks[-1], signal.SIGKILL)
    try:
        launch.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        launch.kill()
        pytest.fail("mpiexec still running 30 s after one of its ranks was killed")
    survivors = alive(ranks, wait=10)
    _kill(survivors)
    assert launch.proc.returncode != 0, "mpiexec reported success after a rank was killed"
    assert not survivors, f"rank {survivors} outlived its launch"


# ---------------------------------------------------------------------------------------------
# 4. determinism

@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("twins")
    args = ["train", CONFIG, *SMALL_BATCH, "--set", "epochs=3", "--set", "optimizer.subdomains=2",
            "--set", "optimizer.decomposition=random-tensors", "--set", "optimizer.local_model=lsr1"]
    return tmp, run_all(tmp, {k: ([*args, "--out", tmp / k], 1) for k in ("one", "two")})


def test_same_config_and_seed_give_identical_runs(twin_runs):
    tmp, results = twin_runs
    for key, result in results.items():
        assert_ok(result, f"run '{key}'")
    assert_same_trajectory(tmp / "one", tmp / "two")


# ---------------------------------------------------------------------------------------------
# 5. a failure on one rank only

def _tiny_mnist(root):
    """A valid two-image MNIST in the standard layout."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            bytes.fromhex("00000803 00000002 0000001c 0000001c") + bytes(range(256)) * 6 + bytes(32))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(bytes.fromhex("00000801 00000002 0307"))


def test_a_failure_on_one_rank_ends_every_rank_with_one_message(tmp_path):
    """Rank 1 finds no data while rank 0 does (APTS_DATA differs per rank): with replicas=2 the
    next step would be a collective communicator split, which rank 1 would never reach; instead
    every rank learns the error, rank 0 prints it, all exit 2."""
    if MPIEXEC is None:
        pytest.fail("mpiexec not found")
    _tiny_mnist(tmp_path / "good")
    args = ["-m", "mpi4py", "-m", "apts_mpi", "train", str(CONFIG), "--set", "data.dataset=mnist",
            "--set", "model.name=mnist-fc-small", "--set", "optimizer.replicas=2",
            "--out", str(tmp_path / "out")]
    cmd = [MPIEXEC, "-n", "1", "env", f"APTS_DATA={tmp_path / 'good'}", PYTHON, *args, ":",
           "-n", "1", "env", f"APTS_DATA={tmp_path / 'missing'}", PYTHON, *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV, cwd=tmp_path)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert time.monotonic() - start < 60
    assert_one_error_line(result, "rank 1:", "missing")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# 6. launches in a SLURM allocation (the environment srun and mpirun give; the real thing is in
#    tests/test_slurm.py)

@pytest.fixture(scope="module")
def slurm_environments(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm-env")
    train = ["train", CONFIG, "--set", "epochs=1", "--out"]
    # mpirun inside an allocation: Hydra starts its proxies as a one-task step, so every rank sees
    # SLURM_NTASKS=1 and SLURM_STEP_NUM_TASKS=1 in a world of 2
    hydra_step = {"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}
    launches = {"mpirun in an allocation": Launch(tmp, [*train, tmp / "mpirun"], 2, env=hydra_step),
                "one process in an salloc -n 2 shell": Launch(tmp, [*train, tmp / "salloc"],
                                                              env={"SLURM_NTASKS": "2"})}
    return {k: launch.wait() for k, launch in launches.items()}


@pytest.mark.parametrize("case", ["mpirun in an allocation", "one process in an salloc -n 2 shell"])
def test_correct_launches_in_an_allocation_run(slurm_environments, case):
    assert_ok(slurm_environments[case], case)


# ---------------------------------------------------------------------------------------------
# 7. SIGTERM / SIGUSR1: every rank stops after the same iteration with a checkpoint, exit 75,
#    and --resume continues bit for bit

@pytest.fixture(scope="module")
def signalled_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signalled")
    base = ["train", CONFIG, *SMALL_BATCH, "--set", "epochs=4"]
    stopped = {}
    for name, rank in (("SIGTERM", -1), ("SIGUSR1", 0)):  # one after the other: 4 epochs take 4 s
        launch = Launch(tmp, [*base, "--out", tmp / name], 2)
        launch.wait_for_output("run demo:")  # set-up done: in the first epoch
        os.kill(launch.rank_pids()[rank], getattr(signal, name))  # one rank only
        stopped[name] = launch.wait()
    samplers = {k: load_checkpoint(tmp / k / "checkpoint.h5")[0]["sampler"] for k in stopped}
    resumed = run_all(tmp, {k: ([*base, "--resume", "--out", tmp / k], 2) for k in stopped})
    return tmp, stopped, samplers, resumed


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_signal_stops_every_rank_with_a_checkpoint_and_status_75(signalled_runs, name):
    _, stopped, samplers, _ = signalled_runs
    result = stopped[name]
    assert result.rc == 75, f"expected exit status 75 (stopped, resumable):\n{result.show()}"
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"apts-mpi: stopped: {name} received: checkpoint"), \
        result.show()
    assert samplers[name]["position"] > 0, f"not a mid-epoch checkpoint: {samplers[name]}"


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_resume_after_a_signal_is_exact(signalled_runs, apts_runs, name):
    tmp, _, _, resumed = signalled_runs
    assert_ok(resumed[name], f"resume after {name}")
    assert_ok(apts_runs[1]["whole"], "APTS run 'whole'")
    assert_same_trajectory(apts_runs[0] / "whole", tmp / name)


# ---------------------------------------------------------------------------------------------
# 8. the console script under mpiexec: an error on one rank aborts the job (no hang)

FULL_DISK = """# test fault: the disk of rank 0's run folder is full when the first checkpoint is written
import errno
import apts_mpi.results as results
def save_checkpoint(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device (injected)")
results.save_checkpoint = save_checkpoint
"""


def test_console_script_aborts_the_job_when_one_rank_raises(tmp_path):
    """Rank 0 raises while rank 1 waits in the next collective: without an abort the job hangs."""
    script = Path(PYTHON).parent / "apts-mpi"
    if not script.exists() or MPIEXEC is None:
        pytest.fail(f"no console script at {script} or no mpiexec: install the project")
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FULL_DISK)
    args = [str(script), "train", str(CONFIG), "--set", "epochs=5", "--set", "checkpoint_every=1",
            "--out", str(tmp_path / "run")]  # rank 1 goes on to epoch 2, rank 0 into MPI_Finalize
    cmd = [MPIEXEC, "-n", "1", "env", f"PYTHONPATH={tmp_path / 'fault'}{os.pathsep}{ENV['PYTHONPATH']}",
           *args, ":", "-n", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=tmp_path, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        _kill([proc.pid, *descendants(proc.pid)])
        proc.communicate()
        pytest.fail("the job still ran 120 s after rank 0 raised: it hangs")
    assert proc.returncode != 0, err
    assert "Traceback" in err and "No space left on device (injected)" in err, err


# ---------------------------------------------------------------------------------------------
# 9. one run per run folder

@pytest.fixture(scope="module")
def locked_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locked")
    base = ["train", CONFIG, "--set", "optimizer.method=tr", *SMALL_BATCH, "--set", "epochs=1000"]
    first = Launch(tmp, [*base, "--out", tmp / "run"])
    first.wait_for(tmp / "run" / "checkpoint.h5")
    second = run_all(tmp, {"--resume": ([*base, "--resume", "--out", tmp / "run"], 1),
                           "fresh": ([*base, "--out", tmp / "run"], 1)})
    alive_after = first.proc.poll() is None
    os.kill(first.proc.pid, signal.SIGTERM)
    first_result = first.wait()
    race = run_all(tmp, {k: (["train", CONFIG, "--set", "epochs=2", "--out", tmp / "race"], 1)
                         for k in ("one", "two")})
    return second, alive_after, first_result, race


@pytest.mark.parametrize("how", ["--resume", "fresh"])
def test_a_second_run_on_a_running_folder_is_refused(locked_folder, how):
    second, alive_after, first_result, _ = locked_folder
    assert_one_error_line(second[how], "in use by another run")
    assert alive_after, "the first run ended while the second was refused"
    assert first_result.rc == 75, f"the first run did not stop cleanly:\n{first_result.show()}"


def test_two_fresh_runs_on_one_folder_one_wins(locked_folder):
    race = locked_folder[3]
    codes = sorted(r.rc for r in race.values())
    assert codes == [0, 2], "\n".join(r.show() for r in race.values())
    loser = next(r for r in race.values() if r.rc == 2)
    assert_one_error_line(loser, "race")


# ---------------------------------------------------------------------------------------------
# 10. smaller launch faults

def test_usage_error_under_mpiexec_is_printed_once(tmp_path):
    result = Launch(tmp_path, ["train"], ranks=2).wait()
    assert result.rc == 2, result.show()
    assert result.err.count("error:") == 1 and "usage: apts-mpi" in result.err, result.show()


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    """Its folder is left empty: a plain run and --resume both take it up from epoch 0."""
    for name in ("plain", "resume"):
        (tmp_path / name).mkdir()
    results = run_all(tmp_path, {
        "plain": (["train", CONFIG, "--set", "epochs=1", "--out", tmp_path / "plain"], 1),
        "resume": (["train", CONFIG, "--set", "epochs=1", "--resume", "--out", tmp_path / "resume"], 1)})
    for name, result in results.items():
        assert_ok(result, name)
        assert "epoch   1" in result.out and (tmp_path / name / "checkpoint.h5").exists()
    assert "holds no checkpoint" in results["resume"].out


FAULTY_DATA = """# test fault: this rank's copy of the data holds a NaN (a bad node, a damaged copy)
import apts_mpi.data as data
_load = data.load_dataset
def load_dataset(*args, **kwargs):
    dataset = _load(*args, **kwargs)
    dataset.train_x.view(-1)[100] = float("nan")
    return dataset
data.load_dataset = load_dataset
"""


def test_non_finite_data_on_one_rank_is_refused_before_training(tmp_path):
    (tmp_path / "fault").mkdir()
    (tmp_path / "fault" / "sitecustomize.py").write_text(FAULTY_DATA)
    args = [PYTHON, "-m", "mpi4py", "-m", "apts_mpi", "train", str(CONFIG), "--set", "epochs=2",
            "--out", str(tmp_path / "out")]
    cmd = [MPIEXEC, "-n", "1", *args, ":", "-n", "1", "env",
           f"PYTHONPATH={tmp_path / 'fault'}{os.pathsep}{ENV['PYTHONPATH']}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=ENV,
                          cwd=tmp_path)
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert_one_error_line(result, "rank 1:", "training inputs hold 1 non-finite value")
    assert "epoch" not in result.out and not (tmp_path / "out").exists()
