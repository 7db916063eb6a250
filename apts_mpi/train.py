"""The training loop: one config, any method, any world size, results in a run folder.

Every rank loads the data, builds the model from the seed and draws the same minibatches
(apts-method.md section 5).  APTS splits the parameters over the ranks; the baselines (``sgd``,
``adam``, ``lbfgs``, ``tr``) run data-parallel: each rank computes loss and gradient on its share
of the minibatch and one Allreduce of a flat [gradient | loss] buffer sums them, so every method
uses the same resources.  Rank 0 writes ``RUN_DIR/metrics.h5`` and ``RUN_DIR/checkpoint.h5`` at every
epoch end (atomically) and logs one line per epoch.
"""
from __future__ import annotations

import io
import logging
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__, config as configuration
from .apts import APTS
from .comm import BufferSync, Comm, select_device
from .data import MinibatchSampler, load_dataset
from .decomposition import Subdomain
from .models import build_model
from .preemption import Preempted, StopRequest
from .results import CHECKPOINT_FILE, METRICS_FILE, load_checkpoint, save_checkpoint, write_metrics
from .trust_region import TrustRegion

log = logging.getLogger("apts_mpi")
ITERATION_SERIES = ("epoch", "loss", "final_loss", "radius", "rho", "accepted", "nonfinite", "step_inf",
                    "loss_evals", "grad_evals", "seconds", "seconds_local", "seconds_comm",
                    "seconds_global")


class TrainingStopped(RuntimeError):
    """A run that cannot go on (non-finite loss, stalled radius); metrics are written, all ranks raise."""


class DataParallel:
    """A torch optimiser stepped on the ranks' shares of a minibatch, gradients summed by Allreduce."""

    def __init__(self, model, loss_fn, optimizer, comm: Comm):
        self.model, self.loss_fn, self.optimizer, self.comm = model, loss_fn, optimizer, comm
        self.sync_buffers = BufferSync(model, comm)  # batch-norm statistics
        self.whole = Subdomain.whole([p for p in model.parameters() if p.requires_grad])
        self.buffer = torch.empty(self.whole.numel + 1, dtype=self.whole.dtype, device=self.whole.device)
        self.evals = self.last_evals = 0
        self.last_accepted = -1  # TrustRegion only: whether the last step was accepted
        self.last_nonfinite = 0  # TrustRegion only: rejections of a non-finite trial in the last step

    def closure(self, inputs, targets):
        B = len(targets)
        share = slice(B * self.comm.rank // self.comm.size, B * (self.comm.rank + 1) // self.comm.size)

        def closure():
            self.optimizer.zero_grad(set_to_none=False)
            loss = self.loss_fn(self.model(inputs[share]), targets[share]) * (share.stop - share.start)
            loss.backward()
            n = self.whole.numel
            self.whole.gather(self.buffer[:n], grad=True)
            self.buffer[n] = loss.detach()
            self.comm.allreduce_(self.buffer)
            self.buffer.div_(B)
            self.whole.scatter(self.buffer[:n], grad=True)
            self.evals += 1
            return self.buffer[n].clone()
        return closure

    def step(self, inputs, targets):
        before = self.evals
        counters = getattr(self.optimizer, "counters", None)
        accepted, nonfinite = (counters.accepted, counters.nonfinite) if counters else (0, 0)
        loss = self.optimizer.step(self.closure(inputs, targets))
        if isinstance(self.optimizer, torch.optim.LBFGS):
            # torch's L-BFGS keeps its curvature pairs across minibatches; when the strong-Wolfe
            # search finds no step (t = 0) no pair is added, the stale direction stays an ascent
            # direction for every later batch and the run stalls for good: restart the memory
            state = self.optimizer.state[self.optimizer._params[0]]
            if float(state.get("t", 1.0)) == 0.0:
                state.clear()
        self.sync_buffers()
        self.last_evals = self.evals - before
        if counters:
            self.last_accepted = int(self.optimizer.counters.accepted > accepted)
            self.last_nonfinite = self.optimizer.counters.nonfinite - nonfinite
        return float(loss)


def build_optimizer(cfg: dict, model, loss_fn, comm):
    """The optimiser of ``cfg['optimizer']`` for ``model``: APTS itself, or a data-parallel wrapper."""
    opt = dict(cfg["optimizer"])
    method = opt.pop("method")
    if method == "apts":
        return APTS(model, loss_fn, comm, seed=cfg["seed"], **opt)
    params = model.parameters()
    if method == "tr":
        inner = TrustRegion(params, **opt)
    elif method == "sgd":
        inner = torch.optim.SGD(params, **opt)
    elif method == "adam":
        inner = torch.optim.Adam(params, **opt)
    else:
        inner = torch.optim.LBFGS(params, line_search_fn="strong_wolfe", **opt)
    return DataParallel(model, loss_fn, inner, Comm(comm))


def _iteration_record(optimizer, epoch, loss, seconds):
    """One row of the per-iteration series, with cumulative evaluation counts."""
    row = dict(epoch=epoch, loss=loss, final_loss=loss, radius=math.nan, rho=math.nan, accepted=-1,
               nonfinite=0,
               step_inf=math.nan, seconds=seconds, seconds_local=math.nan, seconds_comm=math.nan,
               seconds_global=math.nan)
    if isinstance(optimizer, APTS):
        r = optimizer.report
        row.update(loss=r.loss, final_loss=r.final_loss, radius=r.radius, rho=r.rho,
                   nonfinite=int(not math.isfinite(r.trial_loss)),
                   accepted=int(r.accepted), step_inf=r.step_inf, seconds_local=r.seconds_local,
                   seconds_comm=r.seconds_comm, seconds_global=r.seconds_global,
                   loss_evals=r.local_loss_evals_total + r.global_loss_evals,
                   grad_evals=r.local_grad_evals_total + r.global_grad_evals)
    elif isinstance(optimizer.optimizer, TrustRegion):
        c = optimizer.optimizer.counters
        row.update(radius=c.radius, rho=c.rho, accepted=optimizer.last_accepted,
                   nonfinite=optimizer.last_nonfinite)
    if not isinstance(optimizer, APTS):
        row.update(loss_evals=optimizer.last_evals, grad_evals=optimizer.last_evals)
    return row


@torch.no_grad()
def evaluate(model, x, y, comm: Comm, batch_size: int):
    """(mean loss, accuracy) over (x, y), each rank taking a share, summed by one Allreduce."""
    n = len(y)
    share = slice(n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        out = model(x[start:stop])
        totals[0] += float(torch.nn.functional.cross_entropy(out, y[start:stop], reduction="sum"))
        totals[1] += float((out.argmax(1) == y[start:stop]).sum())
    model.train(was_training)
    loss, correct = comm.sum_scalars(totals.tolist())
    return loss / n, correct / n


def _dumps(state) -> bytes:
    """An optimiser state (nested dicts, lists, tensors) as bytes, bit for bit."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Experiment:
    """Everything a run needs, built (and so validated) before any file is written.

    Two steps, so that a caller can agree across ranks between them: the constructor (device, data,
    model; a per-rank failure such as a missing file happens here, after the last collective) and
    :meth:`build` (the optimiser; APTS splits communicators, a collective every rank must reach).
    """

    def __init__(self, cfg: dict, comm=None):
        from mpi4py import MPI
        self.cfg, self.comm = cfg, comm if comm is not None else MPI.COMM_WORLD
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
        self.device = select_device(self.comm, cfg["device"])
        dtype = getattr(torch, cfg["model"]["dtype"])
        data = load_dataset(cfg["data"]["dataset"], cfg["data"]["root"], cfg["data"]["download"])
        self.train_x = data.train_x.to(self.device, dtype)
        self.train_y = data.train_y.to(self.device)
        self.test_x, self.test_y = data.test_x.to(self.device, dtype), data.test_y.to(self.device)
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg["model"]["name"], data.input_shape, data.classes, cfg["model"]["head"])
        self.model = model.to(self.device, dtype)
        self.optimizer = None

    def build(self):
        cfg = self.cfg
        self.optimizer = build_optimizer(cfg, self.model, torch.nn.functional.cross_entropy, self.comm)
        self.sampler = MinibatchSampler(len(self.train_y), cfg["data"]["batch_size"],
                                        cfg["data"]["overlap"], cfg["seed"])
        return self


def _save_now(checkpoint, meta, comm, model, optimizer, sampler, epoch, seconds, iterations, epochs,
              totals, stall):
    """Collective: a checkpoint of the state after the current iteration (a requested stop; the
    same payload as the epoch-end write, plus the counters a mid-epoch resume needs)."""
    opt_state = (comm.gather(optimizer.state_dict(), root=0) if isinstance(optimizer, APTS)
                 else optimizer.optimizer.state_dict())
    if comm.Get_rank() == 0:
        payload = {"model": model.state_dict(), "sampler": sampler.state_dict(),
                   "rng": {"torch": torch.get_rng_state()}, "epoch": epoch, "seconds": seconds,
                   "iterations": iterations, "epochs": epochs, "totals": dict(totals), "stall": stall,
                   "optimizer": ({str(r): _dumps(s) for r, s in enumerate(opt_state)}
                                 if isinstance(optimizer, APTS) else _dumps(opt_state))}
        save_checkpoint(checkpoint, payload, meta)


def train(cfg: dict, out_dir, comm=None, resume: bool = False, experiment: Experiment | None = None,
          stop: StopRequest | None = None):
    """Run the experiment of the resolved config ``cfg``; returns the per-epoch series (all ranks).

    With ``stop`` (its handlers installed), every iteration ends with one collective asking whether
    a rank received SIGTERM/SIGUSR1; if so every rank writes a checkpoint and raises ``Preempted``.

    Raises ConfigError / DataError / ResultsError / ValueError for input that cannot run, before any
    file is written (build ``Experiment`` first to separate the checks from the run).
    """
    ex = experiment or Experiment(cfg, comm)
    if ex.optimizer is None:
        ex.build()
    comm, world = ex.comm, Comm(ex.comm)
    rank, out_dir = world.rank, Path(out_dir)
    device, model, optimizer, sampler = ex.device, ex.model, ex.optimizer, ex.sampler
    train_x, train_y, test_x, test_y = ex.train_x, ex.train_y, ex.test_x, ex.test_y

    meta = {"config_hash": configuration.digest(cfg), "world_size": world.size}
    iterations = {k: [] for k in ITERATION_SERIES}
    epochs = {k: [] for k in ("epoch", "loss", "train_accuracy", "test_accuracy", "test_loss",
                              "seconds", "accepted", "rejected", "nonfinite", "loss_evals",
                              "grad_evals", "radius")}
    start_epoch, elapsed = 0, 0.0
    checkpoint = out_dir / CHECKPOINT_FILE
    if resume:
        payload, _ = load_checkpoint(checkpoint, expect=meta)
        model.load_state_dict(payload["model"])
        state = payload["optimizer"][str(rank)] if isinstance(optimizer, APTS) else payload["optimizer"]
        (optimizer if isinstance(optimizer, APTS) else optimizer.optimizer).load_state_dict(_loads(state))
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
             "world_size": world.size, "device": str(device), "apts_mpi": __version__,
             "torch": torch.__version__, "python": platform.python_version(),
             "subdomains": optimizer.n_subdomains if isinstance(optimizer, APTS) else None}
    totals = dict(accepted=0, rejected=0, nonfinite=0)
    if epochs["epoch"]:
        totals = {k: int(epochs[k][-1]) for k in totals}
    stall, stopped = 0, None
    row = {"radius": iterations["radius"][-1] if iterations["radius"] else math.nan}
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
            idx = batches[position]
            x, y = train_x[idx.to(device)], train_y[idx.to(device)]
            t0 = time.perf_counter()
            loss = optimizer.step(x, y)
            row = _iteration_record(optimizer, epoch + 1, loss, time.perf_counter() - t0)
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
            signal_name = stop.agreed(comm) if stop is not None else None
            if signal_name:
                sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch, "position": position + 1})
                _save_now(checkpoint, meta, comm, model, optimizer, sampler, epoch,
                          elapsed + time.perf_counter() - t_epoch, iterations, epochs, totals, stall)
                raise Preempted(f"{signal_name} received: checkpoint written in epoch {epoch + 1} after "
                                f"minibatch {position + 1} of {len(batches)}; continue with --resume")
        else:
            sampler.load_state_dict({**sampler.state_dict(), "epoch": epoch + 1, "position": 0})
        elapsed += time.perf_counter() - t_epoch
        train_loss, train_acc = evaluate(model, train_x, train_y, world, cfg["data"]["test_batch_size"])
        test_loss, test_acc = evaluate(model, test_x, test_y, world, cfg["data"]["test_batch_size"])
        loss_evals = float(np.nansum(iterations["loss_evals"]))
        grad_evals = float(np.nansum(iterations["grad_evals"]))
        radius = optimizer.radius if isinstance(optimizer, APTS) else row["radius"]
        for k, v in dict(epoch=epoch + 1, loss=train_loss, train_accuracy=train_acc,
                         test_accuracy=test_acc, test_loss=test_loss, seconds=elapsed,
                         loss_evals=loss_evals, grad_evals=grad_evals, radius=radius, **totals).items():
            epochs[k].append(float(v))
        target = cfg["target_accuracy"]
        reached = target is not None and test_acc >= target
        last = epoch + 1 == cfg["epochs"] or reached
        save = not stopped and ((epoch + 1) % cfg["checkpoint_every"] == 0 or last)
        if save:  # the same on every rank: the gather is collective
            opt_state = (comm.gather(optimizer.state_dict(), root=0) if isinstance(optimizer, APTS)
                         else optimizer.optimizer.state_dict())
        if rank == 0:
            if stopped or reached:
                attrs["stopped"] = stopped or f"reached test accuracy {test_acc:.4f} >= {target}"
            if save or stopped:  # a stopped run keeps its last complete checkpoint
                write_metrics(out_dir / METRICS_FILE, iterations, epochs, attrs)
            if save:
                payload = {"model": model.state_dict(), "sampler": sampler.state_dict(),
                           "rng": {"torch": torch.get_rng_state()}, "epoch": epoch + 1,
                           "seconds": elapsed, "iterations": iterations, "epochs": epochs,
                           "optimizer": ({str(r): _dumps(s) for r, s in enumerate(opt_state)}
                                         if isinstance(optimizer, APTS) else _dumps(opt_state))}
                save_checkpoint(checkpoint, payload, meta)
            log.info("epoch %3d  loss %.4f  test acc %6.2f%%  radius %.2e  acc/rej %d/%d  %.1f s",
                     epoch + 1, train_loss, 100 * test_acc, radius, totals["accepted"],
                     totals["rejected"], elapsed)
        if stopped:
            raise TrainingStopped(stopped)
        if reached:
            if rank == 0:
                log.info("reached the target test accuracy %.4f at epoch %d", target, epoch + 1)
            break
    return epochs
