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
from .comm import Comm, local_rank, select_device
from .comm import world as launch_world
from .data import MinibatchSampler
from .errors import InputError
from .optimizers import RECORD_FIELDS, build_optimizer
from .preemption import Preempted, StopRequest
from .problems import PROBLEMS
from .results import CHECKPOINT_FILE, METRICS_FILE, load_checkpoint, save_checkpoint, write_metrics
from .watchdog import Watchdog

log = logging.getLogger("apts_mpi")
ITERATION_SERIES = ("epoch", *RECORD_FIELDS, "seconds")
# per-epoch series of every run; a problem adds its metrics (docs/method.md section 5)
EPOCH_SERIES = ("epoch", "loss", "seconds", "accepted", "rejected", "nonfinite", "loss_evals",
                "grad_evals", "radius")


class TrainingStopped(RuntimeError):
    """A run that cannot go on (non-finite loss, stalled radius); metrics are written, all ranks raise."""


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
        self.problem = PROBLEMS[cfg["data"]["dataset"]](cfg, self.device,
                                                         getattr(torch, cfg["model"]["dtype"]))
        metric, self.target_mode = self.problem.target
        self.target, self.target_metric = cfg["target"], metric
        if cfg["target_accuracy"] is not None:
            if metric != "test_accuracy":
                raise InputError(f"target_accuracy is for classification; data set "
                                 f"{cfg['data']['dataset']!r} reports {metric}: set target instead")
            self.target = cfg["target_accuracy"] if self.target is None else self.target
        torch.manual_seed(cfg["seed"])
        self.model = self.problem.build_model()
        self.optimizer = None

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
    if ex.world.rank == 0:
        payload = {"model": model_state, "sampler": ex.sampler.state_dict(),
                   "rng": {"torch": torch.get_rng_state()}, "epoch": epoch, "seconds": seconds,
                   "iterations": iterations, "epochs": epochs, "optimizer": opt_state, **extra}
        with watchdog.writing() if watchdog is not None else _nothing():
            save_checkpoint(path, payload, meta)


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
        payload, _ = load_checkpoint(checkpoint, expect=meta)
        optimizer.load_model_state(model, payload["model"])
        optimizer.load_checkpoint_state(payload["optimizer"], rank)
        sampler.load_state_dict(payload["sampler"])
        torch.set_rng_state(payload["rng"]["torch"])
        # series added since the checkpoint was written start as zeros
        saved_iterations, saved_epochs = payload["iterations"], payload["epochs"]
        iterations = {k: list(saved_iterations.get(k, [0.0] * len(saved_iterations["loss"])))
                      for k in iterations}
        epochs = {k: list(saved_epochs.get(k, [0.0] * len(saved_epochs["epoch"]))) for k in epochs}
        start_epoch, elapsed = int(payload["epoch"]), float(payload["seconds"])
    elif rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # the CLI creates and locks it beforehand

    attrs = {"method": cfg["optimizer"]["method"], "seed": cfg["seed"], "config": cfg,
             "world_size": world.size, "device": str(ex.device), "apts_mpi": __version__,
             "torch": torch.__version__, "python": platform.python_version(),
             "subdomains": optimizer.n_subdomains, "n_train": problem.n_train,
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
        for leftover in out_dir.glob(".*.tmp-*"):
            leftover.unlink()
    min_radius = cfg["optimizer"].get("min_radius")
    for epoch in range(start_epoch, cfg["epochs"]):
        t_epoch = time.perf_counter()
        batches = sampler.epoch_batches(epoch)
        # a mid-epoch resume starts past the minibatches done (the sampler's state says the next
        # epoch when the stop came after the last one)
        first = sampler.position if sampler.epoch == epoch else len(batches)
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
            if save or stopped:  # a stopped run keeps its last complete checkpoint
                with watchdog.writing():
                    write_metrics(out_dir / METRICS_FILE, iterations, epochs, attrs)
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
