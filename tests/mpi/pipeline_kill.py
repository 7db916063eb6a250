"""Rank 1 of a model-parallel APTS run is killed (SIGKILL) in the middle of a local phase, while
rank 0 blocks in the pipe; the launch must end.

    mpiexec -n 2 python -m mpi4py tests/mpi/pipeline_kill.py STAMP_FILE

Rank 1 writes the time of the kill into STAMP_FILE first.
"""
import os
import signal
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch
from mpi4py import MPI

from apts_mpi import APTS

torch.set_num_threads(1)
comm = MPI.COMM_WORLD
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
calls = 0


def loss_fn(out, target):
    global calls
    calls += 1
    if comm.Get_rank() == 1 and calls == 7:  # the second iteration's local phase
        with open(sys.argv[1], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.nn.functional.cross_entropy(out, target)


opt = APTS(model, loss_fn, comm, decomposition="stages", model_parallel=True)
for _ in range(1000):
    opt.step(x, y)
