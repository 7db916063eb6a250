"""Progress inside an epoch: a heartbeat line on rank 0 every ``log_interval_s`` seconds.

One plain line per beat, no carriage returns (SLURM writes stdout to a file)::

    epoch 2/10  iteration 37/120  0.214 s/it  ETA epoch 18 s, run 4.6 min  radius 1.23e-02  accepted 35/37 (95%)

Seconds per iteration: the mean over this epoch's iterations so far (since a resume, in a resumed
epoch).  ETAs: the iterations left in the epoch, and in the run (the epochs left times the
iterations of this one), at that pace; the per-epoch evaluation is not counted.  Accepted: the
steps of this epoch accepted, of those with an accept/reject decision (``-`` for a method
without one).  Rank 0 only, no collective: a heartbeat never changes what the ranks compute.
"""
from __future__ import annotations

import logging
import math
import time

log = logging.getLogger("apts_mpi")


def duration(seconds: float) -> str:
    """``42 s``, ``4.6 min``, ``2.3 h``."""
    if not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def heartbeat_line(epoch: int, epochs: int, iteration: int, iterations: int, seconds_per_iteration: float,
                   radius: float, accepted: int, decided: int) -> str:
    """The heartbeat of iteration ``iteration`` of ``iterations`` in epoch ``epoch`` of ``epochs``
    (1-based); ``accepted`` of ``decided`` steps of this epoch accepted."""
    left_epoch = (iterations - iteration) * seconds_per_iteration
    left_run = left_epoch + (epochs - epoch) * iterations * seconds_per_iteration
    rate = f"{accepted}/{decided} ({100 * accepted / decided:.0f}%)" if decided else "-"
    radius_text = f"{radius:.2e}" if math.isfinite(radius) else "-"
    return (f"epoch {epoch}/{epochs}  iteration {iteration}/{iterations}  {seconds_per_iteration:.3g} s/it  "
            f"ETA epoch {duration(left_epoch)}, run {duration(left_run)}  radius {radius_text}  "
            f"accepted {rate}")


class Heartbeat:
    """Rank 0's clock for one epoch: :meth:`tick` after every iteration logs a line once
    ``interval`` seconds have passed since the last one (0: every iteration)."""

    def __init__(self, interval: float, epoch: int, epochs: int, iterations: int, enabled: bool):
        self.interval, self.epoch, self.epochs, self.iterations = interval, epoch, epochs, iterations
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.done = self.accepted = self.decided = 0

    def tick(self, iteration: int, radius: float, accepted: int) -> None:
        """After iteration ``iteration`` (1-based) of the epoch; ``accepted``: 1, 0 or -1 (none)."""
        self.done += 1
        self.accepted += accepted == 1
        self.decided += accepted in (0, 1)
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        log.info(heartbeat_line(self.epoch, self.epochs, iteration, self.iterations,
                                (now - self.start) / self.done, radius, self.accepted, self.decided))
