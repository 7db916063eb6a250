"""The command line: ``apts-mpi train|report|plot|config|download|export`` (also ``python -m apts_mpi``).

    mpiexec -n 4 python -m mpi4py -m apts_mpi train configs/demo.yaml --out runs/demo
    apts-mpi report runs/*
    apts-mpi plot runs/* --out runs/figure.png

Exit statuses of ``train``:

* 0: the run ended (its epochs, or its target accuracy).
* 1: an unexpected error (a traceback; with several ranks the whole job is aborted, MPI_Abort,
  also when started by the ``apts-mpi`` console script rather than ``python -m mpi4py``).
* 2: input that cannot run (config, data files or non-finite data, output folder, checkpoint,
  device, rank count, a run folder in use by another run) is found before any work and any file
  is written; every rank takes part in the check, rank 0 prints one line ``apts-mpi: error: ...``
  and every rank exits with status 2 (no MPI abort, nothing left behind).
* 3: a run that cannot go on (a non-finite loss, a radius stuck at its minimum for
  ``stall_iterations`` iterations) writes its metrics, prints ``apts-mpi: stopped: ...`` once.
* 75 (EX_TEMPFAIL): stopped, resumable.  SIGTERM (a SLURM time limit, pre-emption, requeue,
  scancel) or SIGUSR1 (``sbatch --signal=USR1@SECONDS``) on any rank: every rank finishes its
  iteration, a checkpoint is written (mid-epoch if need be) and ``--resume`` continues the run
  bit for bit as if it had not stopped (apts_mpi/preemption.py).

A run folder is held by one run at a time: rank 0 holds an ``flock`` on the folder while the run
lives (the kernel drops it when the process dies, so a killed run never blocks the next).  An
empty run folder (a run killed before its first checkpoint) is taken up again by a plain run and
by ``--resume``.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import sys
import traceback
from pathlib import Path

from . import config as configuration
from .errors import InputError
from .preemption import EXIT_RESUMABLE, Preempted, StopRequest
from . import options
from ._version import __version__
from .results import (CHECKPOINT_FILE, METRICS_FILE, ResultsError, find_runs, load_checkpoint,
                      plot_diagnostics, plot_runs, read_metrics, report_records, report_table)

# the project's own input errors (config, data, options, checkpoint, world size, device, output
# folder): one line and exit 2; anything else is a fault of the program and keeps its traceback
USER_ERRORS = (InputError, ResultsError)
log = logging.getLogger("apts_mpi")


_held = None  # rank 0's RunFolder: its lock lasts as long as the process


class RunFolder:
    """Rank 0's hold on a run folder: created here or taken up again, and locked (``flock`` on the
    folder itself, so nothing is added to it) for the life of the process: a second run on the
    folder is refused instead of clobbering it, and a killed run's lock dies with it."""

    def __init__(self, out: Path, resume: bool):
        self.out, self.created, self.fresh = out, False, not resume
        if resume and not out.is_dir():
            raise InputError(f"--resume: no checkpoint at {out / CHECKPOINT_FILE} (no such folder)")
        # the outermost folder this run creates, removed again if the set-up fails
        self.top = next((p for p in [out, *out.parents] if p.parent.exists()), out)
        try:
            out.mkdir(parents=True)
            self.created = True
        except FileExistsError:
            if not out.is_dir():
                raise InputError(f"output {out} exists and is not a folder") from None
        except OSError as e:
            raise InputError(f"output folder {out} cannot be created: {e.strerror}") from None
        self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"run folder {out} is in use by another run (it holds the folder's "
                             "lock): wait for it to end, or choose another --out") from None
        if not os.access(out, os.W_OK | os.X_OK):
            self.abandon()
            raise InputError(f"output folder {out} is not writable")
        if not self.created:
            self._check_existing(resume)

    def _check_existing(self, resume):
        if not resume and (self.out / CHECKPOINT_FILE).exists():
            raise InputError(f"output folder {self.out} exists (pass --resume to continue it, or "
                             "choose another --out)")
        # under the lock nothing else writes here: temporary files are leftovers of a kill
        for leftover in self.out.glob(".*.tmp-*"):
            leftover.unlink()
        if not any(self.out.iterdir()):  # a run killed before its first checkpoint: start again
            self.fresh = True
        elif resume and not (self.out / CHECKPOINT_FILE).exists():
            raise InputError(f"--resume: no checkpoint at {self.out / CHECKPOINT_FILE}")
        elif not resume:
            raise InputError(f"output folder {self.out} exists (pass --resume to continue it, or "
                             "choose another --out)")

    def abandon(self):
        """Remove the folder if this run created it (a set-up step failed; nothing is left behind)."""
        if self.created:
            shutil.rmtree(self.top, ignore_errors=True)
            self.created = False


def _fail(message, comm=None, status=2, what="error"):
    """One message from rank 0, exit ``status`` on every rank (all ranks call this together)."""
    if status == 2 and _held is not None:
        _held.abandon()
    rank = 0 if comm is None else comm.rank
    if rank == 0 and (comm is None or comm.size > 1 or _launched_rank() == 0):
        # (srun's one-rank worlds: only the launch's first task prints)
        print(f"apts-mpi: {what}: {message}", file=sys.stderr, flush=True)
    if comm is not None and comm.size > 1:
        from .comm import finalize
        comm.barrier()  # rank 0 has written its files: a launcher may kill the rest on one's exit
        finalize()  # every rank agreed on the error: leave without MPI_Abort's noise
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def _check_slurm(world_size):
    """srun without a working MPI plugin starts N one-rank worlds: a world of 1 inside a job step of
    more than one task.  (SLURM_STEP_NUM_TASKS is set inside a step only; SLURM_NTASKS is the
    allocation's, and mpirun's proxy step sets it to 1 on every rank, so it proves nothing.)"""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if world_size == 1 and tasks.isdigit() and int(tasks) > 1:
        raise InputError(f"srun started {tasks} separate one-rank MPI worlds "
                         f"(SLURM_STEP_NUM_TASKS={tasks}, world size 1): give srun the MPI plugin "
                         "of mpi4py's MPI (srun --mpi=pmi2 for MPICH, --mpi=pmix for Open MPI)")


def _flat(node, prefix=""):
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _config_difference(cfg, out):
    """The keys that set the trajectory and differ between ``cfg`` and the run in ``out`` (whose
    resolved config metrics.h5 keeps), as one phrase."""
    try:
        stored = read_metrics(out / METRICS_FILE)[2]["config"]
    except Exception:  # no readable metrics: the hash alone must do
        return "the config differs"
    mine, theirs = _flat(cfg), _flat(stored)
    ignored = set(configuration.RESUMABLE) | {"data.root", "data.download"}
    keys = sorted(k for k in set(mine) | set(theirs)
                  if k not in ignored and mine.get(k) != theirs.get(k))
    if not keys:
        return "the config differs"
    return "different " + ", ".join(f"{k} ({mine.get(k)!r} now, {theirs.get(k)!r} in the run)"
                                    for k in keys)


def _prepare(args, comm):
    """Validate everything that can be checked before training; returns the resolved config, the
    run folder and whether the run resumes a checkpoint."""
    global _held
    cfg = configuration.load(args.config, args.set)
    _check_slurm(comm.size)
    if args.out is not None and not args.out.strip():
        raise InputError("--out is empty: give the run folder")
    out = Path(args.out or Path("runs") / cfg["name"])
    opt = cfg["optimizer"]
    if "replicas" in opt:  # APTS, alone or after Adam
        replicas = opt["replicas"]
        if comm.size % replicas:
            raise InputError(f"world size {comm.size} is not divisible by "
                             f"optimizer.replicas={replicas}")
        if comm.size > 1 and opt["subdomains"] not in (None, comm.size // replicas):
            raise InputError(f"optimizer.subdomains={opt['subdomains']} needs "
                             f"{opt['subdomains'] * replicas} ranks, the world has {comm.size}")
    if cfg["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' was asked for, but torch finds no CUDA device")
    resume = args.resume
    if comm.rank == 0:
        _held = RunFolder(out, args.resume)  # created or locked, or refused with one line
        resume = not _held.fresh
        if resume:
            path = out / CHECKPOINT_FILE
            payload, meta = load_checkpoint(path)
            if meta.get("config_hash") != configuration.digest(cfg):
                raise InputError(f"--resume: {out} was written with another config: "
                                 f"{_config_difference(cfg, out)} (config_hash "
                                 f"{meta.get('config_hash')!r}, this config's is "
                                 f"{configuration.digest(cfg)!r})")
            if meta.get("world_size") != comm.size:
                raise InputError(f"{path}: checkpoint meta 'world_size' is {meta.get('world_size')!r}, "
                                 f"expected {comm.size!r}")
            if payload["epoch"] > cfg["epochs"]:  # else the run would end at once, silently
                raise InputError(f"--resume: the checkpoint in {out} is at epoch {payload['epoch']}, "
                                 f"past epochs={cfg['epochs']}")
        elif args.resume:
            log.info("%s holds no checkpoint (the run was stopped before its first): starting "
                     "from epoch 0", out)
    return cfg, out, resume


def _agreed(comm, step):
    """Run ``step`` on every rank; if it fails on any, every rank learns the first error and exits 2
    (rank 0 prints it).  Called by all ranks together, between collectives."""
    result, error = None, None
    try:
        result = step()
    except USER_ERRORS as e:
        error = str(e)
    errors = comm.allgather_object(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        rank = errors.index(first)
        _fail(first if rank == 0 else f"rank {rank}: {first}", comm)
    return result


def _cmd_train(args):
    from .comm import world
    from .train import Experiment, TrainingStopped, train

    comm = world()
    stop = StopRequest().install()  # from here a SIGTERM/SIGUSR1 stops the run resumably
    cfg, out, resume = _agreed(comm, lambda: _prepare(args, comm))
    resume = comm.bcast_object(resume, root=0)  # rank 0 looked at the folder
    experiment = _agreed(comm, lambda: Experiment(cfg, comm))  # device, data, model
    _agreed(comm, experiment.problem.check_finite)  # a damaged file, a fault on one node
    _agreed(comm, experiment.build)  # the optimiser (APTS splits communicators: all ranks here)
    if comm.rank == 0:
        log.info("run %s: %s on %d rank(s) -> %s", cfg["name"], cfg["optimizer"]["method"],
                 comm.size, out)
    try:
        train(cfg, out, comm, resume=resume, experiment=experiment, stop=stop)
    except TrainingStopped as e:  # raised on every rank at the same iteration
        _fail(str(e), comm, status=3, what="stopped")
    except Preempted as e:  # raised on every rank at the same iteration
        _fail(str(e), comm, status=EXIT_RESUMABLE, what="stopped")


def _runs(paths):
    """The run folders among ``paths``; one note on stderr per path that is not a run."""
    runs, skipped = find_runs(paths)
    for line in skipped:
        print(f"apts-mpi: note: skipped {line}", file=sys.stderr)
    return runs


REPORT_FORMATS = {"plain": "plain", "md": "markdown", "csv": "csv", "json": "json"}


def _cmd_report(args):
    if args.format not in REPORT_FORMATS:
        raise InputError(f"--format {args.format!r}: use one of {', '.join(REPORT_FORMATS)}")
    runs = _runs(args.runs)
    if args.format == "json":
        import json
        print(json.dumps(report_records(runs), indent=1, allow_nan=False))
    else:
        print(report_table(runs, REPORT_FORMATS[args.format]), end="\n" if args.format == "md" else "")


def _cmd_plot(args):
    from .results.figure import check_format, has_diagnostics
    out = Path(args.out)
    diagnostics = Path(args.diagnostics) if args.diagnostics else \
        out.with_name(f"{out.stem}-diagnostics{out.suffix}")
    for path in (out, diagnostics):
        try:
            check_format(path)  # before any run is read or any file written
        except ValueError as e:
            raise InputError(str(e)) from None
    runs = _runs(args.runs)
    plot_runs(runs, out)
    print(f"wrote {out}")
    if has_diagnostics(runs):
        plot_diagnostics(runs, diagnostics)
        print(f"wrote {diagnostics}")
    else:
        print("no trust-region diagnostics: no run has a radius (baselines only)")


def _cmd_config(args):
    if args.config is None and not args.keys:
        raise InputError("config: give a CONFIG file, or --keys to list every key")
    cfg = configuration.load(args.config, args.set) if args.config is not None else None
    if not args.keys:
        print(configuration.dump(cfg), end="")
        return
    rows = [("key", "default", "rule")]
    rows += [(k, "null" if d is None else str(d).lower() if isinstance(d, bool) else str(d), rule)
             for k, d, rule in configuration.keys(cfg)]
    widths = [max(len(r[i]) for r in rows) for i in (0, 1)]
    for k, d, rule in rows:
        print(f"{k.ljust(widths[0])}  {d.ljust(widths[1])}  {rule}")
    if cfg is None:
        print("(the data.* keys of other data sets and the optimizer.* keys of other methods: "
              "apts-mpi config CONFIG --keys, or --set data.dataset=... / optimizer.method=...)")


def _cmd_download(args):
    from .data import SOURCES, DataError, download_dataset
    if args.dataset == "digits":
        print("digits: nothing to download (scikit-learn bundles it)")
        return
    if args.dataset not in SOURCES:
        raise InputError(f"download: unknown data set {args.dataset!r}"
                         f"{options.did_you_mean(args.dataset, SOURCES)}; data sets with files to "
                         f"fetch: {', '.join(SOURCES)} (tinyshakespeare: put input.txt under "
                         "DIR/tinyshakespeare/)")
    sources = None
    if args.mirror:  # the same file names and checksums, from another server
        base = args.mirror.rstrip("/") + "/"
        sources = {name: (base + url.rsplit("/", 1)[1], md5)
                   for name, (url, md5) in SOURCES[args.dataset].items()}
    try:
        written = download_dataset(args.dataset, args.root, sources=sources)
    except DataError as e:
        raise InputError(str(e)) from None
    for path in written:
        print(f"wrote {path}")
    print(f"{args.dataset}: {'downloaded, MD5 checked' if written else 'already present'} under "
          f"{args.root}")


def _cmd_export(args):
    import torch
    from .results.files import atomic_write
    run = Path(args.run)
    path = run if run.is_file() else run / CHECKPOINT_FILE
    if not path.is_file():
        raise InputError(f"export: no checkpoint at {path} (a run folder holds {CHECKPOINT_FILE} "
                         "after its first checkpoint)")
    payload, meta = load_checkpoint(path)
    state = payload.get("model")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"export: {path} holds no whole-model state dict")
    state = {k: v.detach().cpu().clone() for k, v in state.items()}

    def write(tmp):
        with open(tmp, "wb") as fh:
            torch.save(state, fh)

    try:
        atomic_write(args.out, write)
    except OSError as e:
        raise InputError(f"export: cannot write {args.out}: {e.strerror or e}") from None
    cfg = _run_config(run if run.is_dir() else run.parent)
    network = cfg.get("model", {}).get("name", "?") if cfg else "?"
    count = sum(v.numel() for v in state.values() if v.is_floating_point())
    print(f"wrote {args.out}: the state dict of {network} ({len(state)} tensors, {count} floating "
          f"point values) at epoch {payload.get('epoch')}; load it with "
          f"model.load_state_dict(torch.load({str(args.out)!r}, weights_only=True))")


def _run_config(run):
    try:
        return read_metrics(run / METRICS_FILE)[2].get("config")
    except ResultsError:
        return None


class _Parser(argparse.ArgumentParser):
    """Usage errors printed by rank 0 only when several ranks were launched."""

    def error(self, message):
        if _launched_rank() != 0:
            sys.exit(2)
        super().error(message)


def _launched_rank():
    """This process's rank in an MPI launch, from the launcher's environment (MPICH/Hydra, Open MPI,
    PMIx, srun), without initialising MPI; 0 outside a launch."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


EPILOG = """\
launch:
  mpiexec -n 4 python -m mpi4py -m apts_mpi train configs/demo.yaml --out runs/demo-n4
  (python -m mpi4py: a rank that raises aborts the whole job; under SLURM: srun --mpi=pmi2 ...,
  see jobs/*.sbatch)

exit statuses:
  0   done (the run's epochs, or its target)
  1   an unexpected error (a traceback; several ranks: the job is aborted)
  2   input that cannot run (config, data, folder, checkpoint, rank count, a bad --format or
      extension): one line "apts-mpi: error: ...", nothing written
  3   the run cannot go on (non-finite loss, radius stuck at its minimum): metrics written
  75  stopped by SIGTERM/SIGUSR1 with a checkpoint: continue with --resume

environment:
  APTS_DATA            data root when the config has no data.root (default ./data)
  OMP_NUM_THREADS      torch threads per rank (set it to 1 when ranks share cores)
  SLURM_STEP_NUM_TASKS srun's task count: a world of 1 inside a step of more tasks is refused
  PMI_RANK, OMPI_COMM_WORLD_RANK, PMIX_RANK, SLURM_PROCID
                       the launcher's rank: only rank 0 prints usage errors
"""


def parser():
    p = _Parser(prog="apts-mpi", description=__doc__.split("\n")[0], epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"apts-mpi {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, func):
        c = sub.add_parser(name, help=help, description=help, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.set_defaults(func=func)
        return c

    t = command("train", "train from a YAML config (under mpiexec for several ranks)", _cmd_train)
    t.add_argument("config", help="the experiment's YAML file (configs/*.yaml; "
                                  "apts-mpi config --keys lists the keys)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optimizer.radius=0.05 (repeatable)")
    t.add_argument("--out", help="run folder (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r = command("report", "table of final/best accuracy, loss, time, evaluations (one row per "
                          "group of runs differing only in seed)", _cmd_report)
    r.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders, or folders holding run folders (one level deeper); other "
                        "paths are skipped with a note")
    r.add_argument("--format", default="plain", metavar="FORMAT",
                   help="plain (aligned text, the default), md (Markdown), csv or json")
    f = command("plot", "the main metric (accuracy, validation loss or L2 error) and the loss "
                        "against epochs, seconds and gradient evaluations (mean and band over "
                        "seeds), and the trust-region diagnostics (radius, rho, accepted, ||s||)",
                _cmd_plot)
    f.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders, or folders holding run folders (one level deeper); other "
                        "paths are skipped with a note")
    f.add_argument("--out", required=True,
                   help="the curves' figure; the extension picks the format (png, pdf, svg, ...)")
    f.add_argument("--diagnostics", metavar="PATH",
                   help="the diagnostics figure (default: OUT's name with -diagnostics added)")
    c = command("config", "print the resolved config (every default filled in) as YAML, or "
                          "list every key with its default and rule", _cmd_config)
    c.add_argument("config", nargs="?", help="the YAML file (optional with --keys)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as for train (repeatable)")
    c.add_argument("--keys", action="store_true",
                   help="list every key (of the config's data set and method) with its default "
                        "and rule")
    d = command("download", "fetch a data set's files (MD5-checked) into DIR, e.g. on a login "
                            "node before a job", _cmd_download)
    d.add_argument("dataset", metavar="DATASET", help="mnist, fashion-mnist or cifar10")
    d.add_argument("--root", required=True, metavar="DIR",
                   help="the data root (what APTS_DATA or data.root names in a run)")
    d.add_argument("--mirror", metavar="URL",
                   help="another server with the same file names (http://, https:// or file://)")
    e = command("export", "write a run's trained model as a torch state dict", _cmd_export)
    e.add_argument("run", metavar="RUN", help="run folder (its checkpoint.h5), or the checkpoint")
    e.add_argument("--out", required=True,
                   help="the file to write (e.g. model.pt): "
                        "model.load_state_dict(torch.load(OUT, weights_only=True))")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    rank = 0
    if args.command == "train":
        from .comm import world
        rank = world().rank
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stdout)
    if args.command != "train":
        try:
            return args.func(args)
        except USER_ERRORS as e:
            _fail(e)
    try:
        return args.func(args)
    except Exception:
        # an uncaught error on one rank would leave the others waiting in a collective for ever:
        # abort the whole job, as `python -m mpi4py` does (the console script is not run by it)
        from .comm import abort_world, running_world_size
        if running_world_size() > 1:
            traceback.print_exc()
            sys.stderr.flush()
            abort_world(1)
        raise


if __name__ == "__main__":
    main()
