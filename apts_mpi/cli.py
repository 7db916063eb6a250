"""The command line: ``apts-mpi train|report|plot`` (also ``python -m apts_mpi``).

    mpiexec -n 4 python -m mpi4py -m apts_mpi train configs/demo.yaml --out runs/demo
    apts-mpi report runs/*
    apts-mpi plot runs/* --out runs/figure.png

Input that cannot run (config, data files, output folder, checkpoint, device, rank count) is found
before any work and any file is written; every rank takes part in the check, rank 0 prints one
line ``apts-mpi: error: ...`` and every rank exits with status 2 (no MPI abort, nothing left behind).
A run that cannot go on (a non-finite loss, a radius stuck at its minimum for ``stall_iterations``
iterations) writes its metrics, prints ``apts-mpi: stopped: ...`` once and exits with status 3.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import config as configuration
from .errors import InputError
from .results import CHECKPOINT_FILE, ResultsError, load_checkpoint, plot_runs, report_table

# the project's own input errors (config, data, options, checkpoint, world size, device, output
# folder): one line and exit 2; anything else is a fault of the program and keeps its traceback
USER_ERRORS = (InputError, ResultsError)
log = logging.getLogger("apts_mpi")


def _fail(message, comm=None, status=2, what="error"):
    """One message from rank 0, exit ``status`` on every rank (all ranks call this together)."""
    if comm is None or comm.Get_rank() == 0:
        print(f"apts-mpi: {what}: {message}", file=sys.stderr, flush=True)
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI
        MPI.Finalize()  # every rank agreed on the error: leave without MPI_Abort's noise
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def _check_slurm(world_size):
    ntasks = os.environ.get("SLURM_NTASKS")
    if ntasks is not None and ntasks.isdigit() and int(ntasks) != world_size:
        raise InputError(f"the MPI world has {world_size} rank(s) but SLURM_NTASKS={ntasks}: the "
                         "launcher started separate one-rank jobs (use srun with an MPI-enabled "
                         "mpi4py, or mpirun)")


def _prepare(args, comm):
    """Validate everything that can be checked before training; returns the resolved config."""
    cfg = configuration.load(args.config, args.set)
    _check_slurm(comm.Get_size())
    out = Path(args.out or Path("runs") / cfg["name"])
    opt = cfg["optimizer"]
    if opt["method"] == "apts":
        replicas = opt["replicas"]
        if comm.Get_size() % replicas:
            raise InputError(f"world size {comm.Get_size()} is not divisible by "
                             f"optimizer.replicas={replicas}")
        if comm.Get_size() > 1 and opt["subdomains"] not in (None, comm.Get_size() // replicas):
            raise InputError(f"optimizer.subdomains={opt['subdomains']} needs "
                             f"{opt['subdomains'] * replicas} ranks, the world has {comm.Get_size()}")
    if cfg["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' was asked for, but torch finds no CUDA device")
    if comm.Get_rank() == 0:
        if args.resume:
            if not (out / CHECKPOINT_FILE).exists():
                raise InputError(f"--resume: no checkpoint at {out / CHECKPOINT_FILE}")
            payload, _ = load_checkpoint(out / CHECKPOINT_FILE,
                                         expect={"config_hash": configuration.digest(cfg),
                                                 "world_size": comm.Get_size()})
            if payload["epoch"] > cfg["epochs"]:  # else the run would end at once, silently
                raise InputError(f"--resume: the checkpoint in {out} is at epoch {payload['epoch']}, "
                                 f"past epochs={cfg['epochs']}")
        else:
            if out.exists():
                raise InputError(f"output folder {out} exists (pass --resume to continue it, or "
                                 "choose another --out)")
            parent = next((p for p in out.absolute().parents if p.exists()), None)
            if parent is None or not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"output folder {out} cannot be created: {parent} is not writable")
    return cfg, out


def _agreed(comm, step):
    """Run ``step`` on every rank; if it fails on any, every rank learns the first error and exits 2
    (rank 0 prints it).  Called by all ranks together, between collectives."""
    result, error = None, None
    try:
        result = step()
    except USER_ERRORS as e:
        error = str(e)
    errors = comm.allgather(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        rank = errors.index(first)
        _fail(first if rank == 0 else f"rank {rank}: {first}", comm)
    return result


def _cmd_train(args):
    from mpi4py import MPI
    from .train import Experiment, TrainingStopped, train

    comm = MPI.COMM_WORLD
    cfg, out = _agreed(comm, lambda: _prepare(args, comm))
    experiment = _agreed(comm, lambda: Experiment(cfg, comm))  # device, data, model
    _agreed(comm, experiment.build)  # the optimiser (APTS splits communicators: all ranks here)
    if comm.Get_rank() == 0:
        log.info("run %s: %s on %d rank(s) -> %s", cfg["name"], cfg["optimizer"]["method"],
                 comm.Get_size(), out)
    try:
        train(cfg, out, comm, resume=args.resume, experiment=experiment)
    except TrainingStopped as e:  # raised on every rank at the same iteration
        _fail(str(e), comm, status=3, what="stopped")


def _cmd_report(args):
    print(report_table(args.runs))


def _cmd_plot(args):
    plot_runs(args.runs, args.out)
    print(f"wrote {args.out}")


def parser():
    p = argparse.ArgumentParser(prog="apts-mpi", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train from a YAML config (under mpiexec for several ranks)")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.radius=0.05 (repeatable)")
    t.add_argument("--out", help="run folder (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.set_defaults(func=_cmd_train)
    r = sub.add_parser("report", help="table of final/best accuracy, loss, time, evaluations")
    r.add_argument("runs", nargs="+")
    r.set_defaults(func=_cmd_report)
    f = sub.add_parser("plot", help="the main metric (accuracy, validation loss or L2 error) and the "
                                    "loss against epochs, seconds and gradient evaluations")
    f.add_argument("runs", nargs="+")
    f.add_argument("--out", required=True)
    f.set_defaults(func=_cmd_plot)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    rank = 0
    if args.command == "train":
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stdout)
    if args.command != "train":
        try:
            return args.func(args)
        except USER_ERRORS as e:
            _fail(e)
    return args.func(args)


if __name__ == "__main__":
    main()
