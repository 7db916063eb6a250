"""The training loop: one config, any method, any problem, any world size, results in a run folder.

Every rank builds the problem (data), the network from the seed and the same minibatches
(docs/method.md section 5).  The loop sees only two interfaces: the problem
(:class:`~apts_mpi.problems.base.Problem`: minibatches and per-epoch metrics) and the optimiser
(:class:`~apts_mpi.optimizers.Optimizer`: ``step``, ``record``, checkpoint state).  Rank 0 writes
``RUN_DIR/metrics.h5`` and ``RUN_DIR/checkpoint.h5`` at every epoch end (atomically) and logs one
line per epoch.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import config as configuration
from ._version import __version__
from .checks import check_dtype_range, check_overlap
from .comm import Comm, local_rank, select_device
from .comm import world as launch_world
from .data import MinibatchSampler
from .errors import InputError
from .optimizers import RECORD_FIELDS, build_optimizer
from .preemption import Preempted, StopRequest
from .problems import lookup
from .progress import Heartbeat
from .provenance import provenance
from .results import (CHECKPOINT_FILE, METRICS_FILE, ResultsError, load_checkpoint, save_checkpoint,
                      write_metrics)
from .results.files import WriteError, remove_leftovers
from .watchdog import Watchdog

log = logging.getLogger("apts_mpi")
ITERATION_SERIES = ("epoch", *RECORD_FIELDS, "seconds")
# per-epoch series of every run; a problem adds its metrics (docs/method.md section 5)
EPOCH_SERIES = ("epoch", "loss", "seconds", "accepted", "rejected", "nonfinite", "loss_evals",
                "grad_evals", "radius")


class TrainingStopped(RuntimeError):
    """A run that cannot go on (non-finite loss, stalled radius); metrics are written, all ranks raise."""


EXIT_WRITE_FAILED = 74  # EX_IOERR (sysexits.h): a results file could not be written


class WriteFailed(RuntimeError):
    """Rank 0 could not write a results file (a full disk, an I/O error); every rank raises it at
    the same point.  The previous checkpoint is intact and resumable."""


def _written(world, write):
    """Collective over ``world`` (a :class:`~apts_mpi.comm.Comm`): rank 0 calls ``write()`` (other ranks do not); if it raises ``WriteError``, every
    rank raises :class:`WriteFailed` with its message."""
    error = None
    if world.rank == 0:
        try:
            write()
        except WriteError as e:
            error = str(e)
    error = world.bcast_object(error, root=0) if world.size > 1 else error
    if error is not None:
        raise WriteFailed(error)


class Experiment:
    """Everything a run needs, built (and so validated) before any file is written.

    Two steps, so that a caller can agree across ranks between them: the constructor (device, the
    problem's data, the network; a per-rank failure such as a missing file happens here, after the
    last collective) and :meth:`build` (the optimiser; APTS splits communicators, a collective
    every rank must reach).
    """

    def __init__(self, cfg: dict, comm=None):
        self.cfg = cfg
        self.world = Comm(comm) if comm is not None else launch_world()
        self.comm = self.world.comm  # the communicator the optimisers are built on
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        self.local_rank = local_rank(self.comm)  # collective: the GPU's index on a cluster node
        self.device = select_device(self.comm, cfg["device"], self.local_rank)
        self.problem = lookup(cfg["data"]["dataset"])(cfg, self.device,
                                                         getattr(torch, cfg["model"]["dtype"]))
        metric, self.target_mode = self.problem.target
        self.target, self.target_metric = cfg["target"], metric
        if cfg["target_accuracy"] is not None:
            if metric != "test_accuracy":
                raise InputError(f"target_accuracy is for classification; data set "
                                 f"{cfg['data']['dataset']!r} reports {metric}: set target instead")
            self.target = cfg["target_accuracy"] if self.target is None else self.target
        # values judged against this problem: the model's dtype, the number of samples
        check_dtype_range(cfg["optimizer"], getattr(torch, cfg["model"]["dtype"]), "optimizer.")
        check_overlap(self.problem.n_train, cfg["data"]["batch_size"], cfg["data"]["overlap"])
        torch.manual_seed(cfg["seed"])
        self.model = self.problem.build_model()
        self.optimizer = None
        self.restored = None  # (payload, iterations, epochs) of a checkpoint, after restore()

    def build(self):
        cfg = self.cfg
        example = None  # two training inputs: the cost decomposition counts FLOPs on them
        if cfg["optimizer"].get("decomposition") == "cost":
            example = self.problem.batch(torch.arange(min(2, self.problem.n_train)))[0]
        self.optimizer = build_optimizer(cfg, self.model, self.problem.objective, self.comm,
                                         example=example)
        self.sampler = MinibatchSampler(self.problem.n_train, cfg["data"]["batch_size"],
                                        cfg["data"]["overlap"], cfg["seed"])
        return self

    def restore(self, checkpoint) -> None:
        """Load ``checkpoint`` into the model, the optimiser, the sampler and torch's RNG (after
        :meth:`build`; no collective).  A checkpoint of another config or world size, or one whose
        content does not fit this run (a damaged or crafted file that still carries valid
        digests), raises ``ResultsError`` naming the file and the problem."""
        meta = {"config_hash": configuration.digest(self.cfg), "world_size": self.world.size}
        payload, _ = load_checkpoint(checkpoint, expect=meta)
        try:
            self.optimizer.load_model_state(self.model, payload["model"])
            self.optimizer.load_checkpoint_state(payload["optimizer"], self.world.rank)
            self.sampler.load_state_dict(payload["sampler"])
            torch.set_rng_state(payload["rng"]["torch"])
            if type(payload["epoch"]) is not int or not 0 <= payload["epoch"] <= self.cfg["epochs"]:
                raise ValueError(f"epoch {payload['epoch']!r} is not in [0, epochs]")
            float(payload["seconds"])
            # series added since the checkpoint was written start as zeros
            saved_iterations, saved_epochs = payload["iterations"], payload["epochs"]
            n_it, n_ep = len(saved_iterations["loss"]), len(saved_epochs["epoch"])
            iterations = {k: [float(v) for v in saved_iterations.get(k, [0.0] * n_it)]
                          for k in ITERATION_SERIES}
            epochs = {k: [float(v) for v in saved_epochs.get(k, [0.0] * n_ep)]
                      for k in dict.fromkeys(EPOCH_SERIES + tuple(self.problem.metrics))}
            if {len(v) for v in iterations.values()} != {n_it} or \
                    {len(v) for v in epochs.values()} != {n_ep}:
                raise ValueError("its series differ in length")
            if "totals" in payload and (type(payload["totals"]) is not dict
                                        or type(payload["stall"]) is not int):
                raise ValueError("its totals or stall count are not a dict and an int")
        except ResultsError:
            raise
        except Exception as e:  # anything the file holds that this run cannot take
            raise ResultsError(f"{checkpoint}: checkpoint does not fit this run: "
                               f"{type(e).__name__}: {' '.join(str(e).split())}") from None
        self.restored = payload, iterations, epochs

    def reached(self, metrics: dict) -> bool:
        """Whether the epoch's metrics reach the target (never without one)."""
        if self.target is None:
            return False
        value = metrics[self.target_metric]
        return value >= self.target if self.target_mode == "max" else value <= self.target


def _save_checkpoint(path, meta, comm, ex, epoch, seconds, iterations, epochs, watchdog=None, **extra):
    """Collective (the optimiser's state is gathered): the run's state into ``path`` (rank 0), never
    cut short by the ``watchdog``."""
    opt_state = ex.optimizer.checkpoint_state(comm)
    model_state = ex.optimizer.model_state(ex.model, comm)  # gathered where ranks hold blocks
    def write():
        payload = {"model": model_state, "sampler": ex.sampler.state_dict(),
                   "rng": {"torch": torch.get_rng_state()}, "epoch": epoch, "seconds": seconds,
                   "iterations": iterations, "epochs": epochs, "optimizer": opt_state, **extra}
        with watchdog.writing() if watchdog is not None else _nothing():
            save_checkpoint(path, payload, meta)
    _written(ex.world, write)


def train(cfg: dict, out_dir, comm=None, resume: bool = False, experiment: Experiment | None = None,
          stop: StopRequest | None = None):
    """Run the experiment of the resolved config ``cfg``; returns the per-epoch series (all ranks).

    With ``stop`` (its handlers installed), every iteration ends with one collective asking whether
    a rank received SIGTERM/SIGUSR1; if so every rank writes a checkpoint (mid-epoch: the sampler's
    position, the counters) and raises ``Preempted``.

    Raises InputError (config, data, options) or ResultsError for input that cannot run, before any
    file is written (build ``Experiment`` first to separate the checks from the run).
    """
    ex = experiment or Experiment(cfg, comm)
    if ex.optimizer is None:
        ex.build()
    # a collective that never returns (a lost node or link) ends the run for a requeue
    watchdog = Watchdog(cfg.get("watchdog_s") if ex.world.size > 1 else 0, ex.world.rank,
                        signals=stop.delivered if stop is not None else (lambda: 0)).start()
    try:
        return _train(cfg, out_dir, ex, resume, stop, watchdog)
    finally:
        watchdog.stop()


@contextmanager
def _nothing():
    yield


def _train(cfg, out_dir, ex, resume, stop, watchdog):
    comm, world = ex.comm, ex.world
    rank, out_dir = world.rank, Path(out_dir)
    problem, model, optimizer, sampler = ex.problem, ex.model, ex.optimizer, ex.sampler

    meta = {"config_hash": configuration.digest(cfg), "world_size": world.size}
    iterations = {k: [] for k in ITERATION_SERIES}
    epochs = {k: [] for k in dict.fromkeys(EPOCH_SERIES + tuple(problem.metrics))}
    start_epoch, elapsed = 0, 0.0
    checkpoint = out_dir / CHECKPOINT_FILE
    if resume:
        if ex.restored is None:
            ex.restore(checkpoint)
        payload, iterations, epochs = ex.restored
        start_epoch, elapsed = int(payload["epoch"]), float(payload["seconds"])
        if epochs["epoch"] and ex.reached({ex.target_metric: epochs[ex.target_metric][-1]}):
            if rank == 0:  # resuming a finished run: nothing to train (not one epoch more)
                log.info("the run in %s reached its target at epoch %d: nothing to train", out_dir,
                         start_epoch)
            return epochs
        if rank == 0:
            log.info("resumed from epoch %d (%d iterations done, %.1f s)", start_epoch,
                     len(iterations["loss"]), elapsed)
    elif rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # the CLI creates and locks it beforehand

    attrs = {"method": cfg["optimizer"]["method"], "seed": cfg["seed"], "config": cfg,
             "world_size": world.size, "device": str(ex.device), "apts_mpi": __version__,
             "torch": torch.__version__, "python": platform.python_version(),
             "subdomains": optimizer.n_subdomains, "n_train": problem.n_train,
             **(provenance() if rank == 0 else {}),
             # each rank's host and node-local rank (SLURM_LOCALID under srun: its GPU's index)
             "hosts": world.allgather_object(platform.node()),
             "local_ranks": world.allgather_object(ex.local_rank),
             # parameter scalars each rank holds (model-parallel APTS: its block only)
             "params_held": world.allgather_object(int(optimizer.params_held if optimizer.params_held is not None
                                               else sum(p.numel() for p in model.parameters())))}
    totals = dict(accepted=0, rejected=0, nonfinite=0)
    if epochs["epoch"]:
        totals = {k: int(epochs[k][-1]) for k in totals}
    stall, stopped = 0, None
    if resume and "totals" in payload:  # a mid-epoch checkpoint (a requested stop)
        totals, stall = {k: int(v) for k, v in payload["totals"].items()}, int(payload["stall"])
    if resume and rank == 0:  # temporary files of a write that a kill interrupted
        remove_leftovers(out_dir)  # (not those of a process still alive)
    min_radius = cfg["optimizer"].get("min_radius")
    for epoch in range(start_epoch, cfg["epochs"]):
        t_epoch = time.perf_counter()
        batches = sampler.epoch_batches(epoch)
        # a mid-epoch resume starts past the minibatches done (the sampler's state says the next
        # epoch when the stop came after the last one)
        first = sampler.position if sampler.epoch == epoch else len(batches)
        heartbeat = Heartbeat(cfg["log_interval_s"], epoch + 1, cfg["epochs"], len(batches), rank == 0)
        for position in range(first, len(batches)):
            watchdog.beat(len(iterations["loss"]) + 1, f"epoch {epoch + 1}, minibatch {position + 1} "
                          f"of {len(batches)}")
            batch = problem.batch(batches[position])
            t0 = time.perf_counter()
            optimizer.step(batch)
            row = dict(optimizer.record(), epoch=epoch + 1, seconds=time.perf_counter() - t0)
            for k in ITERATION_SERIES:
                iterations[k].append(float(row[k]))
            totals["accepted"] += row["accepted"] == 1
            totals["rejected"] += row["accepted"] == 0
            totals["nonfinite"] += int(row["nonfinite"])
            heartbeat.tick(position + 1, row["radius"], row["accepted"])
            # faults: every value below is shared by all ranks (reduced or broadcast), so every
            # rank stops at the same iteration
            at_floor = min_radius is not None and row["radius"] <= min_radius
            stall = stall + 1 if at_floor and row["accepted"] != 1 else 0
            if not math.isfinite(row["loss"]):
                stopped = (f"the loss at the start of iteration {len(iterations['loss'])} is "
                           f"{row['loss']}: check the data and the model (nothing to optimise)")
            elif stall >= cfg["stall_iterations"]:
                stopped = (f"{stall} steps in a row rejected at min_radius={min_radius} (last rho "
                           f"{row['rho']:.3g}): no progress, stopping")
            if stopped:
                break
            # requested stop (apts_mpi/preemption.py): one collective, the same answer on every rank
            signal_name = stop.agreed(world) if stop is not None else None
            if signal_name:
                sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch, "position": position + 1})
                _save_checkpoint(checkpoint, meta, comm, ex, epoch, elapsed + time.perf_counter() - t_epoch,
                                 iterations, epochs, watchdog, totals=dict(totals), stall=stall)
                raise Preempted(f"{signal_name} received: checkpoint written in epoch {epoch + 1} after "
                                f"minibatch {position + 1} of {len(batches)}; continue with --resume")
        else:
            sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch + 1, "position": 0})
        elapsed += time.perf_counter() - t_epoch
        watchdog.beat(len(iterations["loss"]), f"the evaluation and checkpoint of epoch {epoch + 1}")
        optimizer.eval_mode()
        metrics = problem.evaluate(*optimizer.evaluation(model, world))
        optimizer.train_mode()
        if "loss" not in metrics:  # a problem without its own: the mean loss of the epoch's iterates
            of_epoch = np.asarray(iterations["epoch"]) == epoch + 1
            metrics["loss"] = float(np.mean(np.asarray(iterations["final_loss"])[of_epoch])) \
                if of_epoch.any() else math.nan
        loss_evals = float(np.nansum(iterations["loss_evals"]))
        grad_evals = float(np.nansum(iterations["grad_evals"]))
        for k, v in dict(metrics, epoch=epoch + 1, seconds=elapsed, loss_evals=loss_evals,
                         grad_evals=grad_evals, radius=optimizer.radius, **totals).items():
            epochs[k].append(float(v))
        reached = ex.reached(metrics)
        last = epoch + 1 == cfg["epochs"] or reached
        save = not stopped and ((epoch + 1) % cfg["checkpoint_every"] == 0 or last)
        if (last or stopped) and rank == 0 and optimizer.params_held is None:  # a whole model
            with torch.random.fork_rng(devices=[ex.device] if ex.device.type == "cuda" else []):
                attrs.update(problem.artifacts(model))  # the run's random state stays untouched
        if rank == 0:
            if stopped or reached:
                attrs["stopped"] = stopped or (f"reached {_metric_name(ex.target_metric)} "
                                               f"{metrics[ex.target_metric]:.4f} "
                                               f"{'>=' if ex.target_mode == 'max' else '<='} {ex.target}")
        # every epoch, whatever checkpoint_every (a running job's report is at most an epoch old)
        def write():
            with watchdog.writing():
                write_metrics(out_dir / METRICS_FILE, iterations, epochs, attrs)
        _written(world, write)
        if save:  # the same on every rank: the gather is collective
            _save_checkpoint(checkpoint, meta, comm, ex, epoch + 1, elapsed, iterations, epochs, watchdog)
        if rank == 0:
            log.info("epoch %3d  loss %.4f  %s  radius %.2e  acc/rej %d/%d  %.1f s", epoch + 1,
                     metrics["loss"], _headline(ex.target_metric, metrics), optimizer.radius,
                     totals["accepted"], totals["rejected"], elapsed)
        if stopped:
            raise TrainingStopped(stopped)
        if reached:
            if rank == 0:
                log.info("reached the target %s %.4f at epoch %d", _metric_name(ex.target_metric),
                         ex.target, epoch + 1)
            break
    return epochs


def _metric_name(metric: str) -> str:
    return metric.replace("_", " ")


def _headline(metric: str, metrics: dict) -> str:
    """The problem's main metric for the log line (accuracies in percent)."""
    value = metrics[metric]
    if metric.endswith("accuracy"):
        return f"{_metric_name(metric).replace('accuracy', 'acc')} {100 * value:6.2f}%"
    return f"{_metric_name(metric)} {value:.4g}"
