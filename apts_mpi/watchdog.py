"""Ending a run whose collective never returns: the watchdog.

MPI has no timeout: a rank whose peer's node died, or whose link was cut, waits in its collective
for ever, and the job holds its nodes until its time limit.  (``torch.distributed`` gives its users
a timeout per collective; this is the same for apts_mpi.)  A :class:`Watchdog` is a daemon thread
that the training loop feeds with :meth:`~Watchdog.beat` at the start of every iteration and
epoch end.  When no beat comes for ``limit`` seconds it prints one line naming the iteration that
stalled and its rank, and ends the process with :data:`~apts_mpi.preemption.EXIT_RESUMABLE` (75),
the status the job scripts requeue on, so that the job resumes from its last checkpoint.

* ``watchdog_s`` (config): ``null`` (default) sets the limit to ``FACTOR`` times the slowest
  iteration seen so far, and never below ``MINIMUM_S``; a number of seconds fixes it; ``0`` turns
  the watchdog off.
* The checkpoint stays intact: rank 0 writes its files while holding :meth:`Watchdog.writing`, and
  the watchdog takes that lock before it ends the process, so it never ends one inside a write
  (the writes are atomic besides: a temporary file renamed into place).
* One line: every rank stalls, and rank 0 reports first; the other ranks wait ``GRACE_S`` more,
  so that the launcher, which ends the job's other ranks once one exits with a non-zero status
  (``srun --kill-on-bad-exit``, ``mpiexec``), ends them before they print: with SIGKILL, or with
  SIGTERM (``signals``: the count of signals delivered, :meth:`StopRequest.delivered`), on which
  they exit 75 at once and say nothing.  Where rank 0 itself is lost, the survivors report.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

from .preemption import EXIT_RESUMABLE

MINIMUM_S = 300.0  # the automatic limit's floor: five minutes
FACTOR = 10.0      # the automatic limit: this many times the slowest iteration seen
GRACE_S = 10.0     # how much later than rank 0 the other ranks report


class Watchdog:
    """A daemon thread that ends this process when :meth:`beat` is not called for ``limit`` s.

    ``seconds``: the config's ``watchdog_s`` (None: automatic, 0: off).  ``rank``: this process's
    rank (named in the line).  ``exit`` and ``stream``: how the process ends and where the line goes.
    """

    def __init__(self, seconds: float | None, rank: int = 0, *, signals=lambda: 0, exit=os._exit,
                 stream=None):
        self.fixed = None if seconds is None else float(seconds)
        self.rank, self._signals = rank, signals
        self._exit, self._stream = exit, stream
        self.slowest = 0.0
        self.iteration = 0  # the iteration being run (1-based; 0: before the first)
        self.where = "before the first iteration"
        self._last = time.monotonic()
        self._write = threading.Lock()
        self._done = threading.Event()
        self._thread = None

    @property
    def enabled(self) -> bool:
        return self.fixed != 0

    @property
    def limit(self) -> float:
        """Seconds without a beat after which the process ends."""
        if self.fixed is not None:
            return self.fixed
        return max(MINIMUM_S, FACTOR * self.slowest)

    def start(self):
        """Start watching (nothing where the watchdog is off).  Returns ``self``."""
        if self.enabled and self._thread is None:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="apts-mpi watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self):
        """Stop watching (the run ended, or stopped in an orderly way)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def beat(self, iteration: int, where: str):
        """Progress: the iteration (1-based) about to run, or the last one run, and where (words)."""
        now = time.monotonic()
        self.slowest = max(self.slowest, now - self._last)
        self._last, self.iteration, self.where = now, iteration, where

    @contextmanager
    def writing(self):
        """Held while rank 0 writes a file: the watchdog never ends the process inside it."""
        with self._write:
            yield

    def _watch(self):
        while not self._done.wait(min(1.0, max(0.05, self.limit / 20))):
            waited = time.monotonic() - self._last
            if waited <= self.limit:
                continue
            if self.rank != 0:  # rank 0 reports; a launcher ends this rank meanwhile
                before, grace_end = self._signals(), time.monotonic() + GRACE_S
                while time.monotonic() < grace_end and self._signals() == before:
                    if self._done.wait(0.1):
                        return
                if self._signals() != before:  # the launcher ends the job: quietly
                    with self._write:
                        self._exit(EXIT_RESUMABLE)
                        return
            with self._write:  # not inside a file write; the lock is never given back
                stream = sys.stderr if self._stream is None else self._stream
                print(f"apts-mpi: error: watchdog: iteration {self.iteration} ({self.where}) made no "
                      f"progress on rank {self.rank} for {waited:.1f} s (watchdog_s "
                      f"{self.limit:g}): a collective that never returned (a lost node or link?); "
                      f"exiting {EXIT_RESUMABLE} to be requeued, the last checkpoint is kept",
                      file=stream, flush=True)
                sys.stdout.flush()
                self._exit(EXIT_RESUMABLE)
                return
