"""The communication layer's object collectives, structure and point-to-point on the world:
every rank checks what it received against what each rank sent (values built from the rank
numbers alone), rank 0 writes OUT/comm.json.

    mpiexec -n N python -m mpi4py tests/mpi/comm_cases.py OUT
"""
import json
import sys
from pathlib import Path

import torch

from apts_mpi.comm import Comm, world

comm = world()
rank, size = comm.rank, comm.size
checks = {}
checks["allgather_object"] = comm.allgather_object({"rank": rank}) == [{"rank": p} for p in range(size)]
gathered = comm.gather_object(rank * 10, root=0)
checks["gather_object"] = gathered == [10 * p for p in range(size)] if rank == 0 else gathered is None
checks["bcast_object"] = comm.bcast_object(("from", rank), root=size - 1) == ("from", size - 1)
checks["max_int"] = comm.max_int(3 * rank) == 3 * (size - 1)
comm.barrier()
half = comm.split(rank % 2, key=-rank)  # even and odd ranks, in reverse order
members = half.allgather_object(rank)
checks["split"] = members == sorted((p for p in range(size) if p % 2 == rank % 2), reverse=True)
half.free()
if size > 1:  # a ring: each rank sends a header and a tensor to the next, receives from the previous
    nxt, prev = (rank + 1) % size, (rank - 1) % size
    if rank % 2 == 0:
        comm.send({"n": 4, "from": rank}, dest=nxt)
        comm.send_(torch.arange(4, dtype=torch.float64) + rank, dest=nxt)
        header = comm.recv(source=prev)
        got = comm.recv_(torch.empty(header["n"], dtype=torch.float64), source=prev)
    else:
        header = comm.recv(source=prev)
        got = comm.recv_(torch.empty(header["n"], dtype=torch.float64), source=prev)
        comm.send({"n": 4, "from": rank}, dest=nxt)
        comm.send_(torch.arange(4, dtype=torch.float64) + rank, dest=nxt)
    checks["send_recv"] = header == {"n": 4, "from": prev} and got.tolist() == [prev + k for k in range(4)]
second = Comm(comm)  # a second handle: the same counters
checks["shared_counters"] = second.bytes == comm.bytes and second.traffic is comm.traffic
every = comm.allgather_object(checks)
if rank == 0:
    Path(sys.argv[1], "comm.json").write_text(json.dumps({"size": size, "checks": every}))
