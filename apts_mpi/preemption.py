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

    def install(self):
        """Handle :data:`SIGNALS` from now on (call it before the set-up, so that a signal that
        comes while the data loads is kept, not fatal).  Returns ``self``."""
        for signum in SIGNALS:
            signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame):
        self.signum = self.signum or signum

    def agreed(self, comm) -> str | None:
        """Collective over ``comm`` (a :class:`~apts_mpi.comm.Comm`): the name of the signal some
        rank received (the largest number), or None."""
        signum = comm.max_int(self.signum)
        return signal.Signals(signum).name if signum else None
