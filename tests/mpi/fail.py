"""Rank 1 fails in its second APTS iteration; the launch must end (non-zero) instead of hanging.

    mpiexec -n 2 python -m mpi4py tests/mpi/fail.py                  # rank 1 raises (APTS)
    mpiexec -n 2 python -m mpi4py tests/mpi/fail.py --kill STAMP     # rank 1 is SIGKILLed in a local
                                                                     # phase of model-parallel APTS,
                                                                     # while rank 0 blocks in the pipe

With ``--kill`` rank 1 writes the time of the kill into STAMP first.
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
kill = sys.argv[1:2] == ["--kill"]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
calls = 0


def loss_fn(out, target):
    global calls
    calls += 1
    if comm.Get_rank() == 1 and calls == (7 if kill else 9):  # the second iteration's local phase
        if not kill:
            raise RuntimeError("injected failure on rank 1")
        with open(sys.argv[2], "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.nn.functional.cross_entropy(out, target)


opt = APTS(model, loss_fn, comm, **(dict(decomposition="stages", model_parallel=True) if kill else {}))
for _ in range(1000):
    opt.step(x, y)
print("finished without failure", flush=True)
