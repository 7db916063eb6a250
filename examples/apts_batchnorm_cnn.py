"""APTS on a small CNN with batch norm, ranks started from different weights on purpose.

    mpiexec -n 2 python -m mpi4py examples/apts_batchnorm_cnn.py

Each rank seeds torch with its own rank, so the networks differ before APTS is built; APTS
broadcasts rank 0's parameters and buffers (batch-norm running statistics included) at
construction, as DistributedDataParallel does, and keeps the buffers equal after every iteration.
The data (8x8 images of a bright bar, horizontal or vertical) come from a shared seed.
"""
import torch
from mpi4py import MPI

from apts_mpi import APTS

comm = MPI.COMM_WORLD
torch.manual_seed(comm.rank)  # different initial weights on every rank: APTS takes rank 0's

g = torch.Generator().manual_seed(0)
n = 1024
y = torch.randint(0, 2, (n,), generator=g)
where = torch.randint(0, 8, (n,), generator=g)
x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
for i in range(n):
    if y[i]:
        x[i, 0, :, where[i]] += 1.0
    else:
        x[i, 0, where[i], :] += 1.0

model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 2))
first = torch.cat([p.detach().flatten() for p in model.parameters()])
opt = APTS(model, torch.nn.functional.cross_entropy, comm, local_iters=3, global_iters=1)
rank0 = torch.from_numpy(comm.bcast(first.numpy()))
started_equal = torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), rank0)

shuffle = torch.Generator().manual_seed(1)
for epoch in range(5):
    for batch in torch.randperm(n, generator=shuffle).split(256):
        loss = opt.step(x[batch], y[batch])
model.eval()
with torch.no_grad():
    accuracy = (model(x).argmax(1) == y).double().mean().item()
state = torch.cat([t.detach().double().flatten() for t in [*model.parameters(), *model.buffers()]])
spread = comm.allreduce(float((state - torch.from_numpy(comm.bcast(state.numpy()))).abs().max()),
                        op=MPI.MAX)
every_rank_started_equal = comm.allreduce(started_equal, op=MPI.LAND)
if comm.rank == 0:
    print(f"ranks {comm.size}  started from rank 0's weights {every_rank_started_equal}  "
          f"final loss {loss:.4f}  accuracy {accuracy:.3f}  largest difference between ranks {spread:g}")
