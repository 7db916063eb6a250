"""Joining the ranks: the launch check and rank 0's model, at an optimiser's construction.

Two failures a Python user of :class:`~apts_mpi.APTS` would otherwise never see:

* a launcher that started several processes, each of which sees an MPI world of one (``torchrun``,
  ``srun`` without the MPI plugin of mpi4py's MPI, one MPI's ``mpiexec`` with another MPI's
  mpi4py): each process would train alone, one subdomain, and say nothing;
* ranks whose models start from different weights (no common seed): the iterates are assembled
  from pieces of different models.

:func:`join` refuses the first with one line and removes the second the way
``torch.nn.parallel.DistributedDataParallel`` does: every parameter and buffer is broadcast from
rank 0 of the communicator (one ``Bcast`` per dtype).  Called once by every data-parallel optimiser
constructor (all ranks of ``comm``, in the same order: a collective).
"""
from __future__ import annotations

import os

import torch

from .comm import Comm, world
from .errors import InputError

# the number of processes a launcher started, by the variable each launcher sets in every process
LAUNCHER_SIZES = (
    ("WORLD_SIZE", "torchrun / torch.distributed"),
    ("SLURM_STEP_NUM_TASKS", "srun"),  # set inside a job step only (SLURM_NTASKS is the allocation's)
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "MPICH's mpiexec (Hydra) or a PMI launcher"),
    ("PMIX_SIZE", "a PMIx launcher"),
)


def launcher_size(environ=None) -> tuple[int, str, str] | None:
    """(processes, variable, launcher) of the first launcher variable that says more than one
    process, or None."""
    environ = os.environ if environ is None else environ
    for name, launcher in LAUNCHER_SIZES:
        value = environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return int(value), name, launcher
    return None


def check_launch(world_size: int | None = None, environ=None) -> None:
    """Refuse an MPI world of one process when the launcher started several (InputError, one line).

    ``world_size``: MPI.COMM_WORLD's size (read here by default).
    """
    if world_size is None:
        world_size = world().size
    said = launcher_size(environ)
    if world_size == 1 and said is not None:
        n, name, launcher = said
        raise InputError(f"{name}={n}: {launcher} started {n} processes, but each is an MPI world of "
                         f"1 rank, so each would train alone: launch with mpi4py's own MPI "
                         f"(mpiexec -n {n} python -m mpi4py ..., srun --mpi=pmi2 for MPICH, "
                         "--mpi=pmix for Open MPI)")


@torch.no_grad()
def broadcast_model(model: torch.nn.Module, comm) -> None:
    """Every parameter and buffer of ``model`` <- rank 0's (as DistributedDataParallel does at
    construction); collective over ``comm`` (a Comm or an mpi4py communicator), one Bcast per
    dtype; nothing on one rank."""
    comm = Comm(comm.comm if isinstance(comm, Comm) else comm)  # its own traffic counters
    if comm.size == 1:
        return
    from .decomposition import Subdomain
    by_dtype = {}
    for t in [*model.parameters(), *model.buffers()]:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), tensors in by_dtype.items():  # the model's order: the same on every rank
        whole = Subdomain.whole(tensors)
        flat = whole.gather(torch.empty(whole.numel, dtype=dtype, device=device))
        comm.bcast_(flat)
        whole.scatter(flat)


def join(model: torch.nn.Module, comm) -> None:
    """Before an optimiser over ``comm`` builds anything: :func:`check_launch`, then
    :func:`broadcast_model` (collective)."""
    check_launch()
    broadcast_model(model, comm)
