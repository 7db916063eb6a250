"""The watchdog (apts_mpi/watchdog.py): a rank that makes no progress ends the run for a requeue.

The thread alone (a fake exit, a fixed limit of a fraction of a second), and a real two-rank
mpiexec launch on the digits demo in which one rank is stopped (SIGSTOP) inside the training loop:
the other waits in its collective for ever, as behind a lost node or a cut link, until its
watchdog ends the launch with one line and exit status 75, and the last checkpoint still loads.
"""
import os
import signal
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest

from apts_mpi.config import ConfigError, load
from apts_mpi.preemption import EXIT_RESUMABLE
from apts_mpi.results import load_checkpoint
from apts_mpi.watchdog import FACTOR, MINIMUM_S, Watchdog
from test_cli import CONFIG, SMALL_BATCH, Launch, _kill, alive

pytestmark = pytest.mark.timeout(300)


class Exited(list):
    """Records the exit statuses the watchdog asked for (instead of ending the test process)."""

    def __call__(self, status):
        self.append((status, time.monotonic()))


class Lines(list):
    def write(self, text):
        self.extend(line for line in text.splitlines() if line)

    def flush(self):
        pass


def test_no_beat_for_the_limit_ends_with_one_line_and_the_requeue_status():
    exited, lines = Exited(), Lines()
    dog = Watchdog(0.3, rank=0, exit=exited, stream=lines).start()
    for iteration in range(1, 6):  # progress: no exit
        time.sleep(0.1)
        dog.beat(iteration, f"minibatch {iteration}")
        started = time.monotonic()
    assert not exited
    deadline = started + 5
    while not exited and time.monotonic() < deadline:
        time.sleep(0.02)
    dog.stop()
    assert [status for status, _ in exited] == [EXIT_RESUMABLE], lines
    assert 0.3 <= exited[0][1] - started < 1.5
    assert len(lines) == 1 and lines[0].startswith("apts-mpi: error: watchdog: iteration 5 "), lines
    assert "(minibatch 5)" in lines[0] and "on rank 0" in lines[0], lines


def test_never_ends_the_process_inside_a_file_write():
    exited, lines = Exited(), Lines()
    dog = Watchdog(0.2, rank=0, exit=exited, stream=lines).start()
    with dog.writing():
        time.sleep(0.8)  # the limit passes inside the write
        assert not exited
        released = time.monotonic()
    deadline = released + 5
    while not exited and time.monotonic() < deadline:
        time.sleep(0.02)
    dog.stop()
    assert len(exited) == 1 and exited[0][1] >= released, exited


def test_other_ranks_wait_for_rank_zero_to_report():
    exited, lines = Exited(), Lines()
    dog = Watchdog(0.2, rank=1, exit=exited, stream=lines).start()
    time.sleep(1.5)  # past the limit, within the grace the other ranks give rank 0
    dog.stop()  # a launcher that ended this rank meanwhile
    assert not exited and not lines


def test_automatic_limit_and_off():
    dog = Watchdog(None)
    assert dog.limit == MINIMUM_S  # before any iteration: the floor
    dog.slowest = MINIMUM_S  # a slow iteration: a multiple of it
    assert dog.limit == FACTOR * MINIMUM_S
    off = Watchdog(0).start()
    assert not off.enabled and off._thread is None and threading.active_count() >= 1
    off.stop()


def test_config_key(tmp_path):
    assert load(CONFIG)["watchdog_s"] is None
    assert load(CONFIG, ["watchdog_s=45"])["watchdog_s"] == 45
    with pytest.raises(ConfigError, match="watchdog_s"):
        load(CONFIG, ["watchdog_s=-1"])


def _rank_of(pid):
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"PMI_RANK="))


@pytest.mark.mpi
def test_a_stopped_rank_ends_the_launch_for_a_requeue(tmp_path):
    """Rank 1 stopped (SIGSTOP) after the first checkpoint: rank 0 waits in its next collective.
    Within watchdog_s (3 s) and a few seconds more the launch ends: one line from rank 0 naming the
    iteration, exit status 75, and the checkpoint loads."""
    run = tmp_path / "run"
    launch = Launch(tmp_path, ["train", CONFIG, *SMALL_BATCH, "--set", "epochs=1000",
                               "--set", "watchdog_s=3", "--out", run], ranks=2)
    stopped = []
    try:
        launch.wait_for(run / "checkpoint.h5")
        ranks = {_rank_of(pid): pid for pid in launch.rank_pids()}
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGSTOP)
        stopped.append(ranks[1])
        at = time.monotonic()
        result = launch.wait(timeout=60)
        took = time.monotonic() - at
    finally:
        for pid in stopped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _kill(alive(stopped, wait=5))
    lines = [line for line in result.err.splitlines() if line.startswith("apts-mpi:")]
    assert len(lines) == 1 and lines[0].startswith("apts-mpi: error: watchdog: iteration "), result.show()
    assert "on rank 0 for " in lines[0], lines[0]
    assert result.rc == EXIT_RESUMABLE, result.show()
    assert 3 <= took < 20, f"the launch ended {took:.1f} s after rank 1 stopped"
    payload, meta = load_checkpoint(run / "checkpoint.h5")
    assert payload["epoch"] >= 1 and meta["world_size"] == 2


def test_other_ranks_end_quietly_when_the_launcher_signals():
    """srun --kill-on-bad-exit sends SIGTERM to the other ranks once rank 0 exited: they end at
    once with the requeue status and print nothing."""
    exited, lines, signals = Exited(), Lines(), [0]
    dog = Watchdog(0.2, rank=1, signals=lambda: signals[0], exit=exited, stream=lines).start()
    time.sleep(0.6)  # past the limit: waiting for rank 0's report
    signals[0] += 1
    deadline = time.monotonic() + 3
    while not exited and time.monotonic() < deadline:
        time.sleep(0.02)
    dog.stop()
    assert [status for status, _ in exited] == [EXIT_RESUMABLE] and not lines, (exited, lines)
