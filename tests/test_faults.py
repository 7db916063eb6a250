"""Faults a user's cluster brings (issue 24): a full disk, runs sharing a parent folder, bad values
that only the problem can judge, a run killed between its first files, and smaller cases.

The full-disk cases run on a real 1 MiB tmpfs (``mount -t tmpfs``; skipped, with the reason, where
mounting is not permitted).  Everything else is a real launch of the command line, as in
tests/test_cli.py, whose helpers these tests share.
"""
import hashlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from apts_mpi import config as configuration
from apts_mpi.cli import RunFolder
from apts_mpi.errors import InputError
from apts_mpi.results import load_checkpoint, read_metrics, save_checkpoint, write_metrics
from test_cli import CONFIG, ENV, PYTHON, Launch, assert_one_error_line, run_all

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted at ``tmp_path / "disk"``, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    return filler


# ---------------------------------------------------------------------------------------------
# 1. a full disk never costs the last good checkpoint

FULL_DISK_WRITES = textwrap.dedent("""
    import os, sys, torch
    from apts_mpi.results import save_checkpoint, load_checkpoint, write_metrics, read_metrics
    disk, leave = sys.argv[1], int(sys.argv[2])
    ckpt, metrics = os.path.join(disk, "checkpoint.h5"), os.path.join(disk, "metrics.h5")
    def payload(epoch):  # many small nodes: HDF5 caches them and fails only when it flushes
        return {"w": {str(i): torch.full((50,), float(epoch)) for i in range(40)}, "epoch": epoch}
    save_checkpoint(ckpt, payload(98), {"run": "x"})
    write_metrics(metrics, {"loss": [1.0] * 98}, {"epoch": list(range(1, 99))}, {"run": "x"})
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(b"x" * (free - leave))
    for name, write in (("checkpoint", lambda: save_checkpoint(ckpt, payload(99), {"run": "x"})),
                        ("metrics", lambda: write_metrics(metrics, {"loss": [1.0] * 30000},
                                                          {"epoch": list(range(1, 100))}, {}))):
        try:
            write()
            print(name, "written")
        except Exception as e:
            print(name, "raised", type(e).__name__, str(e).splitlines()[0])
    print("checkpoint epoch", load_checkpoint(ckpt)[0]["epoch"])
    print("metrics epochs", len(read_metrics(metrics)[1]["epoch"]))
    print("leftovers", sorted(n for n in os.listdir(disk) if n.startswith(".")))
""")


@pytest.mark.parametrize("leave", [0, 4096, 20480])
def test_a_full_disk_keeps_the_previous_checkpoint_and_metrics(small_disk, tmp_path, leave):
    """Epoch 98 written, the disk fills, epoch 99 is written: both writes raise WriteError, the
    files of epoch 98 stay and load, nothing is printed as "Exception ignored", no temporary file
    is left.  (Before: h5py printed the errors from destructors, the corrupt epoch-99 file was sealed
    and renamed over the good one, or the process died of a segmentation fault.)"""
    script = tmp_path / "writes.py"
    script.write_text(FULL_DISK_WRITES)
    proc = subprocess.run([PYTHON, str(script), str(small_disk), str(leave)], capture_output=True,
                          text=True, timeout=120, env=ENV)
    show = f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, show
    assert "Exception ignored" not in proc.stderr, show
    out = proc.stdout.splitlines()
    assert out[0].startswith("checkpoint raised WriteError") and "No space left" in out[0], show
    assert out[1].startswith("metrics raised WriteError") and "No space left" in out[1], show
    assert out[2:] == ["checkpoint epoch 98", "metrics epochs 98", "leftovers []"], show


@pytest.mark.slow
def test_a_full_disk_ends_the_run_with_one_line_and_status_74(small_disk):
    """Two ranks train into a small disk that fills after the first checkpoints: every rank stops
    with status 74, rank 0 says once which file failed and which checkpoint is kept, and that
    checkpoint resumes once there is room."""
    run = small_disk / "run"
    base = ["train", CONFIG, "--set", "checkpoint_every=1", "--out", run]
    launch = Launch(small_disk.parent, [*base, "--set", "epochs=100000"], ranks=2)
    launch.wait_for(run / "checkpoint.h5")
    filler = fill(small_disk)
    result = launch.wait()
    lines = result.err.splitlines()
    assert result.rc == 74, result.show()
    assert len(lines) == 1 and lines[0].startswith("apts-mpi: stopped: "), result.show()
    assert "No space left on device" in lines[0] and "is kept" in lines[0], result.show()
    epoch = int(lines[0].split("the checkpoint of epoch ")[1].split()[0])
    assert load_checkpoint(run / "checkpoint.h5")[0]["epoch"] == epoch
    filler.unlink()
    resumed = Launch(small_disk.parent, [*base, "--set", f"epochs={epoch + 1}", "--resume"],
                     ranks=2).wait()
    assert resumed.rc == 0, resumed.show()
    assert len(read_metrics(run / "metrics.h5")[1]["epoch"]) == epoch + 1


# ---------------------------------------------------------------------------------------------
# 2. a run removes only what it created itself

def test_a_failed_run_keeps_another_run_in_the_parent_it_made(tmp_path):
    """Run A creates parent/a (and parent); run B then holds parent/b; A's set-up fails.  Before, A
    removed parent with B's live folder, checkpoint and lock in it."""
    parent = tmp_path / "parent"
    a = RunFolder(parent / "a", resume=False)
    b = RunFolder(parent / "b", resume=False)
    (parent / "b" / "checkpoint.h5").write_bytes(b"B's checkpoint")
    a.abandon()
    assert not (parent / "a").exists(), "A's own empty folder stays behind"
    assert (parent / "b" / "checkpoint.h5").read_bytes() == b"B's checkpoint"
    with pytest.raises(InputError, match="in use by another run"):  # B's lock is still held
        RunFolder(parent / "b", resume=True)
    del b


def test_a_failed_run_keeps_another_run_inside_its_folder(tmp_path):
    outer = tmp_path / "new" / "outer"
    a = RunFolder(outer, resume=False)
    b = RunFolder(outer / "inner", resume=False)
    (outer / "inner" / "metrics.h5").write_bytes(b"B's metrics")
    a.abandon()
    assert (outer / "inner" / "metrics.h5").read_bytes() == b"B's metrics"
    del b


def test_a_failed_run_keeps_folders_it_did_not_make(tmp_path):
    (tmp_path / "mine").mkdir()
    a = RunFolder(tmp_path / "mine" / "x" / "run", resume=False)
    a.abandon()
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "x").exists()


def test_a_resume_keeps_the_temporary_files_of_a_live_writer(tmp_path):
    """A resume removes what killed writers left, never the file a live process is writing."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.h5").write_bytes(b"x")
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        (run / f".checkpoint.h5.tmp-{live.pid}").write_bytes(b"being written")
        (run / f".metrics.h5.tmp-{dead.pid}").write_bytes(b"left by a kill")
        RunFolder(run, resume=True)
        assert (run / f".checkpoint.h5.tmp-{live.pid}").exists()
        assert not (run / f".metrics.h5.tmp-{dead.pid}").exists()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------
# 3. bad values judged against their problem: one line, status 2, no run folder

def shakespeare_root(tmp_path, text):
    root = tmp_path / f"data-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    (root / "tinyshakespeare").mkdir(parents=True)
    (root / "tinyshakespeare" / "input.txt").write_text(text)
    return root


SHAKESPEARE = Path(__file__).resolve().parents[1] / "configs" / "shakespeare-small-adamw.yaml"
PINN = Path(__file__).resolve().parents[1] / "configs" / "poisson2d-adam-lbfgs.yaml"


def test_bad_values_for_their_problem_are_one_line_before_the_run_folder(tmp_path):
    tiny = shakespeare_root(tmp_path, "".join(chr(97 + (i * 7) % 26) for i in range(100)))
    mono = shakespeare_root(tmp_path, "a" * 5000)
    cases = {  # name: (args, words the line names)
        "text shorter than the context": (
            [SHAKESPEARE, "--set", f"data.root={tiny}"], ["too short for data.context=64", "641"]),
        "one-character text": (
            [SHAKESPEARE, "--set", f"data.root={mono}"], ["single distinct character"]),
        "overlap of the whole batch": (
            [CONFIG, "--set", "data.batch_size=1", "--set", "data.overlap=0.6"],
            ["data.overlap=0.6", "data.batch_size=1"]),
        "overlap of the whole batch, general": (
            [CONFIG, "--set", "data.batch_size=3", "--set", "data.overlap=0.9"],
            ["data.overlap=0.9", "data.batch_size=3"]),
        "radius beyond float32": (
            [CONFIG, "--set", "optimizer.radius=1.0e+39", "--set", "optimizer.max_radius=1.0e+39"],
            ["optimizer.radius=1e+39", "float32"]),
        "min_radius rounding to 0 in float32": (
            [CONFIG, "--set", "optimizer.min_radius=1.0e-60"], ["optimizer.min_radius=1e-60", "0"]),
        "PINN points beyond memory": (
            [PINN, "--set", "data.interior_points=10000000000"],
            ["data.interior_points=10000000000", "GiB"]),
    }
    results = run_all(tmp_path, {name: (["train", *args, "--set", "epochs=1", "--out",
                                         tmp_path / f"out-{i}"], 1)
                                 for i, (name, (args, _)) in enumerate(cases.items())})
    for i, (name, (_, words)) in enumerate(cases.items()):
        assert_one_error_line(results[name], *words)
        assert not (tmp_path / f"out-{i}").exists(), f"{name}: a run folder was made"


def test_a_float64_model_takes_a_radius_beyond_float32(tmp_path):
    """The range is the model's dtype's: float64 holds 1e39."""
    result = Launch(tmp_path, ["train", CONFIG, "--set", "model.dtype=float64", "--set", "epochs=1",
                               "--set", "optimizer.radius=1.0e+39", "--set",
                               "optimizer.max_radius=1.0e+39", "--out", tmp_path / "run"]).wait()
    assert result.rc == 0, result.show()


# ---------------------------------------------------------------------------------------------
# 4. a run killed between its first metrics and its first checkpoint; usage errors under MPI

def test_a_run_killed_after_its_first_metrics_starts_again(tmp_path):
    for name in ("plain", "resume"):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name / "metrics.h5", {"loss": [1.0]}, {"epoch": [1]}, {})
    results = run_all(tmp_path, {
        "plain": (["train", CONFIG, "--set", "epochs=1", "--out", tmp_path / "plain"], 1),
        "resume": (["train", CONFIG, "--set", "epochs=1", "--resume", "--out",
                    tmp_path / "resume"], 1)})
    for name, result in results.items():
        assert result.rc == 0, result.show()
        assert load_checkpoint(tmp_path / name / "checkpoint.h5")[0]["epoch"] == 1
        assert len(read_metrics(tmp_path / name / "metrics.h5")[1]["epoch"]) == 1
    assert "holds no checkpoint" in results["resume"].out


@pytest.mark.parametrize("argv", [["train"], ["train", "--bogus", "x.yaml"]])
def test_a_usage_error_under_python_m_mpi4py_is_two_lines_and_no_abort(tmp_path, argv):
    result = Launch(tmp_path, argv, ranks=2).wait()
    assert result.rc == 2, result.show()
    lines = result.err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: apts-mpi"), result.show()
    assert "error:" in lines[1] and "Abort" not in result.err, result.show()


# ---------------------------------------------------------------------------------------------
# 6. smaller cases

@pytest.fixture(scope="module")
def reached(tmp_path_factory):
    """A run that stops at its target accuracy before its epochs, and its resume."""
    tmp = tmp_path_factory.mktemp("reached")
    args = ["train", CONFIG, "--set", "epochs=60", "--set", "checkpoint_every=1", "--set",
            "target_accuracy=0.5", "--out", tmp / "run"]
    first = Launch(tmp, args).wait()
    before = {n: (tmp / "run" / n).read_bytes() for n in ("checkpoint.h5", "metrics.h5")}
    again = Launch(tmp, [*args, "--resume"]).wait()
    return tmp, first, before, again


def test_resuming_a_run_that_reached_its_target_trains_nothing(reached):
    tmp, first, before, again = reached
    assert first.rc == 0 and "reached the target" in first.out, first.show()
    epochs = len(read_metrics(tmp / "run" / "metrics.h5")[1]["epoch"])
    assert epochs < 60, "the run did not stop at its target"
    assert again.rc == 0 and "nothing to train" in again.out, again.show()
    assert "epoch " not in again.out.replace("at epoch", ""), again.show()
    assert {n: (tmp / "run" / n).read_bytes() for n in before} == before


def crafted(tmp_path, name, payload):
    """A checkpoint with valid digests and this config's meta, but a crafted payload."""
    run = tmp_path / name
    run.mkdir()
    cfg = configuration.load(CONFIG, ["epochs=5"])
    save_checkpoint(run / "checkpoint.h5", payload,
                    {"config_hash": configuration.digest(cfg), "world_size": 1})
    return ["train", CONFIG, "--set", "epochs=5", "--resume", "--out", run]


def test_a_crafted_checkpoint_is_one_line(tmp_path):
    cases = {
        "no epoch": (crafted(tmp_path, "no-epoch", {"model": {}}), "no epoch number"),
        "wrong model": (crafted(tmp_path, "wrong-model", {
            "epoch": 1, "seconds": 1.0, "model": {"w": torch.zeros(3)}, "optimizer": b"",
            "sampler": {}, "rng": {"torch": torch.get_rng_state()}, "iterations": {},
            "epochs": {}}), "does not fit this run"),
    }
    results = run_all(tmp_path, {k: (args, 1) for k, (args, _) in cases.items()})
    for name, (_, words) in cases.items():
        assert_one_error_line(results[name], words)


def test_plot_into_a_read_only_folder_is_one_line(tmp_path, reached):
    run = reached[0] / "run"
    ro = tmp_path / "ro"
    ro.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                           capture_output=True, text=True)
    if mount.returncode != 0:  # (as root, file modes do not stop a write: a read-only mount does)
        pytest.skip(f"cannot mount a read-only tmpfs here (needs root): {mount.stderr.strip()}")
    try:
        result = Launch(tmp_path, ["plot", run, "--out", ro / "figure.png"]).wait()
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert_one_error_line(result, "figure.png", "Read-only file system")
