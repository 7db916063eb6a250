"""Rank 1 raises in its second APTS iteration; under ``python -m mpi4py`` the launch must abort.

    mpiexec -n 2 python -m mpi4py tests/mpi/fail.py
"""
import os

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
    if comm.Get_rank() == 1 and calls == 9:
        raise RuntimeError("injected failure on rank 1")
    return torch.nn.functional.cross_entropy(out, target)


opt = APTS(model, loss_fn, comm)
for _ in range(1000):
    opt.step(x, y)
print("finished without failure", flush=True)
