"""Stopping a run on request, resumably: SIGTERM and SIGUSR1.

SLURM sends SIGTERM to every task of a job step at the time limit, on ``scancel``, on a
pre-emption and on ``scontrol requeue`` (then SIGKILL after ``KillWait``, 30 s by default), and
SIGUSR1 ahead of the time limit when the job asks for it (``sbatch --signal=USR1@SECONDS``).  The
handler only records the signal; the training loop asks :meth:`StopRequest.agreed` at the end of
every iteration, one Allreduce that gives every rank the same answer, so that all ranks finish the
same iteration, write one checkpoint (mid-epoch: the sampler's position is in it) and raise
:class:`Preempted`.  The command line then exits with :data:`EXIT_RESUMABLE`.
"""
from __future__ import annotations

import os
import signal

EXIT_RESUMABLE = getattr(os, "EX_TEMPFAIL", 75)  # "stopped, resumable": 75, as sysexits.h says
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """Raised on every rank after the checkpoint of a requested stop is written."""


class StopRequest:
    """The first of :data:`SIGNALS` this process received (0: none), and the ranks' agreement on it."""

    def __init__(self):
        self.signum = 0
        self._wakeup, self._delivered = None, 0

    def install(self):
        """Handle :data:`SIGNALS` from now on (call it before the set-up, so that a signal that
        comes while the data loads is kept, not fatal).  Returns ``self``."""
        for signum in SIGNALS:
            signal.signal(signum, self._record)
        # the signals also as bytes on a pipe, written as they arrive: the Python handler runs only
        # once the main thread is back from its MPI call, which a stalled collective never is
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        try:
            signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = read
        except ValueError:  # not the main thread: no pipe
            os.close(read)
            os.close(write)
        return self

    def _record(self, signum, frame):
        self.signum = self.signum or signum

    def delivered(self) -> int:
        """How many signals with a Python handler reached this process so far, counted as they
        arrive, also while the main thread waits in a collective (for the watchdog's thread)."""
        if self._wakeup is None:
            return int(self.signum != 0)
        try:
            while data := os.read(self._wakeup, 512):
                self._delivered += len(data)
        except BlockingIOError:
            pass
        return self._delivered

    def agreed(self, comm) -> str | None:
        """Collective over ``comm`` (a :class:`~apts_mpi.comm.Comm`): the name of the signal some
        rank received (the largest number), or None."""
        signum = comm.max_int(self.signum)
        return signal.Signals(signum).name if signum else None
