"""The communication layer: an mpi4py communicator, seen through torch tensors.

Buffer methods only (``Allreduce``, ``Allgatherv``, ``Bcast``) on flat, preallocated tensors; never
one message per parameter tensor.  Host tensors are handed to MPI as NumPy views (no copy).  CUDA
tensors go to MPI directly when the library is CUDA-aware (detected, or forced with
``APTS_CUDA_AWARE=1``/``0``), else through a reusable pinned host buffer; either way the device is
synchronised before the MPI call, since MPI cannot see the CUDA stream.

Run on several ranks as ``mpiexec -n 4 python -m mpi4py -m apts_mpi ...`` so that an exception on
one rank aborts the whole job.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from mpi4py import MPI

from .errors import InputError


def cuda_aware() -> bool:
    """Whether the MPI library accepts CUDA device buffers (``APTS_CUDA_AWARE`` overrides)."""
    forced = os.environ.get("APTS_CUDA_AWARE")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    query = getattr(MPI, "Query_cuda_support", None)
    try:
        return bool(query()) if query is not None else False
    except Exception:  # an MPI without the MPIX extension
        return False


def node_local_rank(comm) -> tuple[int, int]:
    """(rank, size) among the ranks of ``comm`` that share this node (``COMM_TYPE_SHARED``)."""
    comm = comm.comm if isinstance(comm, Comm) else comm
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def local_rank(comm) -> int:
    """Collective: this rank's node-local rank, the index of its GPU on a cluster; ``comm`` is a
    :class:`Comm` or an mpi4py communicator.

    ``SLURM_LOCALID`` where srun started every rank as one task of its step (SLURM's own count of
    the tasks on each node; ``SLURM_STEP_NUM_TASKS`` equal to the world size on every rank); else,
    e.g. under mpiexec, or mpirun inside an allocation (its proxies are the step's tasks, one per
    node), this rank's place among the ranks of ``comm`` that share its node.
    """
    comm = comm.comm if isinstance(comm, Comm) else comm
    tasks, local = os.environ.get("SLURM_STEP_NUM_TASKS", ""), os.environ.get("SLURM_LOCALID", "")
    from_slurm = tasks.isdigit() and int(tasks) == comm.Get_size() and local.isdigit()
    if comm.allreduce(int(from_slurm), op=MPI.MIN):  # the same branch on every rank
        return int(local)
    return node_local_rank(comm)[0]


def select_device(comm, request: str = "auto", local: int | None = None) -> torch.device:
    """The device of this rank: ``cpu``, ``cuda`` (GPU = node-local rank mod GPU count) or ``auto``;
    ``comm`` is a :class:`Comm` or an mpi4py communicator.  ``local``: the node-local rank
    (:func:`local_rank`), found here when not given.

    Raises InputError (a ValueError) when CUDA is asked for and there is none.
    """
    if request not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda'; got {request!r}")
    if request == "cpu" or (request == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for, but torch finds no CUDA device on this node")
    local = local_rank(comm) if local is None else local
    return torch.device("cuda", local % torch.cuda.device_count())


class Traffic:
    """What the collectives of a communicator cost: seconds in them, seconds waiting, bytes passed."""

    def __init__(self):
        self.seconds = self.waiting = 0.0
        self.bytes = 0


class Comm:
    """Collectives on torch tensors over one mpi4py communicator.

    ``seconds`` and ``bytes`` accumulate the time in, and the payload passed to, every collective.
    With ``measure_wait`` (benchmarks only: it adds a barrier per collective) the time spent waiting
    for the slowest rank is counted apart, in ``waiting``.

    ``comm`` is an mpi4py communicator, None (``COMM_SELF``), or a ``Comm``: then this is a second
    handle on the same communicator with the same counters and the same ``measure_wait``, so that
    a benchmark that hands an optimiser its ``Comm`` reads what the optimiser moved.
    """

    def __init__(self, comm=None, measure_wait: bool = False):
        if isinstance(comm, Comm):
            self.traffic, measure_wait = comm.traffic, measure_wait or comm.measure_wait
            comm = comm.comm
        else:
            self.traffic = Traffic()
        self.comm = comm if comm is not None else MPI.COMM_SELF
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.cuda_aware = cuda_aware()
        self.measure_wait = measure_wait
        self._host = {}

    seconds = property(lambda self: self.traffic.seconds,
                       lambda self, v: setattr(self.traffic, "seconds", v))
    waiting = property(lambda self: self.traffic.waiting,
                       lambda self, v: setattr(self.traffic, "waiting", v))
    bytes = property(lambda self: self.traffic.bytes, lambda self, v: setattr(self.traffic, "bytes", v))

    def _wait(self):
        if self.measure_wait:
            start = time.perf_counter()
            self.comm.Barrier()
            self.waiting += time.perf_counter() - start

    def _buffer(self, tensor: torch.Tensor):
        """(MPI buffer, copy-back tensor or None) for a contiguous tensor."""
        if tensor.device.type == "cpu":
            return tensor.numpy(), None
        torch.cuda.synchronize(tensor.device)  # MPI reads the buffer outside the CUDA stream
        if self.cuda_aware:
            return tensor, None
        key = (tensor.numel(), tensor.dtype)
        host = self._host.get(key)
        if host is None:
            host = self._host[key] = torch.empty(key[0], dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor.view(-1))
        return host.numpy(), host

    def _timed(self, fn, tensor):
        self._wait()
        start = time.perf_counter()
        buf, host = self._buffer(tensor)
        fn(buf)
        if host is not None:
            tensor.view(-1).copy_(host)
        self.seconds += time.perf_counter() - start
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def allreduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor <- sum over ranks, in place."""
        if self.size == 1:
            return tensor
        return self._timed(lambda buf: self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), tensor)

    def reduce_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """tensor <- sum over ranks on ``root``, in place; the other ranks' tensors are unspecified
        afterwards (follow with ``bcast_`` to give every rank the root's bits)."""
        if self.size == 1:
            return tensor

        def reduce(buf):
            if self.rank == root:
                self.comm.Reduce(MPI.IN_PLACE, buf, op=MPI.SUM, root=root)
            else:
                self.comm.Reduce(buf, None, op=MPI.SUM, root=root)
        return self._timed(reduce, tensor)

    def allgatherv_(self, tensor: torch.Tensor, counts, displs) -> torch.Tensor:
        """Rank p contributes ``tensor[displs[p]:displs[p]+counts[p]]``; every rank gets all, in place."""
        if self.size == 1:
            return tensor
        return self._timed(
            lambda buf: self.comm.Allgatherv(MPI.IN_PLACE, [buf, (counts, displs)]), tensor)

    def bcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """tensor <- root's tensor, in place."""
        if self.size == 1:
            return tensor
        return self._timed(lambda buf: self.comm.Bcast(buf, root=root), tensor)

    def _scalars(self, fn, values) -> list[float]:
        array = np.asarray(values, dtype=np.float64)
        if self.size > 1:
            self._wait()
            start = time.perf_counter()
            fn(array)
            self.seconds += time.perf_counter() - start
        return array.tolist()

    def bcast(self, values, root: int = 0) -> list[float]:
        """Broadcast a few float64 scalars from ``root`` (the coordinator's decisions)."""
        return self._scalars(lambda a: self.comm.Bcast(a, root=root), values)

    def sum_scalars(self, values) -> list[float]:
        """Element-wise sum over ranks of a few float64 scalars."""
        return self._scalars(lambda a: self.comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM), values)

    # -- Everything else the package asks of MPI: small pickled control messages (a few per run or
    # per iteration, never tensors), the communicator's structure, point-to-point.  A second
    # backend (torch.distributed) implements these and the buffer methods above, nothing more.

    def allgather_object(self, value) -> list:
        """Every rank's ``value`` (picklable, small), in rank order, on every rank."""
        return [value] if self.size == 1 else self.comm.allgather(value)

    def gather_object(self, value, root: int = 0) -> list | None:
        """Every rank's ``value`` in rank order on ``root``; None elsewhere."""
        return [value] if self.size == 1 else self.comm.gather(value, root=root)

    def bcast_object(self, value, root: int = 0):
        """``root``'s ``value`` (picklable, small) on every rank."""
        return value if self.size == 1 else self.comm.bcast(value, root=root)

    def max_int(self, value: int) -> int:
        """The largest of the ranks' integers, on every rank."""
        return int(value) if self.size == 1 else int(self.comm.allreduce(int(value), op=MPI.MAX))

    def barrier(self) -> None:
        """Wait until every rank of the communicator reaches this call."""
        if self.size > 1:
            self.comm.Barrier()

    def split(self, color: int, key: int = 0) -> "Comm":
        """Collective: a Comm over the ranks that pass the same ``color``, ordered by ``key``
        (MPI_Comm_split).  ``free`` it when done."""
        return Comm(self.comm.Split(color, key), measure_wait=self.measure_wait)

    def free(self) -> None:
        """Release a communicator made by :meth:`split` (never the world or COMM_SELF)."""
        if self.comm not in (MPI.COMM_WORLD, MPI.COMM_SELF):
            self.comm.Free()

    def send(self, value, dest: int, tag: int = 0) -> None:
        """Point-to-point: a small picklable ``value`` to rank ``dest``."""
        self.comm.send(value, dest=dest, tag=tag)

    def recv(self, source: int, tag: int = 0):
        """Point-to-point: the small picklable value that rank ``source`` sent."""
        return self.comm.recv(source=source, tag=tag)

    def send_(self, tensor: torch.Tensor, dest: int, tag: int = 0) -> torch.Tensor:
        """Point-to-point, buffer: a contiguous host tensor to rank ``dest`` (not counted in
        ``seconds`` and ``bytes``: the pipe counts its own)."""
        self.comm.Send(tensor.numpy(), dest=dest, tag=tag)
        return tensor

    def recv_(self, tensor: torch.Tensor, source: int, tag: int = 0) -> torch.Tensor:
        """Point-to-point, buffer: fill the contiguous host ``tensor`` with what ``source`` sent."""
        self.comm.Recv(tensor.numpy(), source=source, tag=tag)
        return tensor

    def abort(self, status: int = 1) -> None:
        """End every rank of the job at once (MPI_Abort): for a fault on one rank only, which would
        leave the others waiting in a collective."""
        self.comm.Abort(status)


def world() -> Comm:
    """The Comm of every rank of the launch (MPI_COMM_WORLD; initialises MPI)."""
    return Comm(MPI.COMM_WORLD)


def finalize() -> None:
    """End MPI on this rank (every rank calls it, after its last collective)."""
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def running_world_size() -> int:
    """The number of ranks of the launch while MPI runs on this rank; 0 before Init, after Finalize."""
    return MPI.COMM_WORLD.Get_size() if MPI.Is_initialized() and not MPI.Is_finalized() else 0


def abort_world(status: int = 1) -> None:
    """MPI_Abort on the world: every rank of the job ends at once."""
    MPI.COMM_WORLD.Abort(status)


def library_version() -> str:
    """The first line of the MPI library's version string (which library mpi4py is bound to)."""
    lines = MPI.Get_library_version().strip().splitlines()
    return lines[0].strip() if lines else ""


def mpi4py_version() -> str:
    import mpi4py
    return mpi4py.__version__


class BufferSync:
    """Broadcast a model's buffers (batch-norm running statistics and counters) from rank 0.

    They change with every forward pass, differently on every rank; calling this once per iteration
    keeps every rank's model identical.  One flat, preallocated buffer per dtype.
    """

    def __init__(self, model: torch.nn.Module, comm: Comm):
        from .decomposition import Subdomain
        self.comm = comm
        by_dtype = {}
        for b in model.buffers() if comm.size > 1 else []:
            by_dtype.setdefault(b.dtype, []).append(b)
        self.groups = [(Subdomain.whole(group), torch.empty(sum(b.numel() for b in group), dtype=dtype,
                                                            device=group[0].device))
                       for dtype, group in by_dtype.items()]

    def __call__(self):
        for buffers, flat in self.groups:
            self.comm.bcast_(buffers.gather(flat))
            buffers.scatter(flat)
