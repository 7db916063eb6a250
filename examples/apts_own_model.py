"""APTS on your own network and your own data loop.

    mpiexec -n 2 python -m mpi4py examples/apts_own_model.py

Each rank is one parameter subdomain (here 2).  Every rank must pass the same minibatch to
``opt.step``: the data and the shuffling below come from a seed every rank shares.  APTS copies rank
0's parameters and buffers to every rank when it is built, as DistributedDataParallel does, so the
model's initial weights need no common seed.  On one process (``python examples/apts_own_model.py``)
the same program trains with one subdomain.
"""
import torch
from mpi4py import MPI

from apts_mpi import APTS

comm = MPI.COMM_WORLD
torch.manual_seed(0)

# data: two noisy rings (class 0 inside, class 1 outside), 2000 points, the same on every rank
# (generated from a shared seed)
g = torch.Generator().manual_seed(1)
y = torch.randint(0, 2, (2000,), generator=g)
angle = torch.rand(2000, generator=g) * 2 * torch.pi
r = 0.5 + 0.5 * y + 0.15 * torch.randn(2000, generator=g)
x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)

model = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32),
                            torch.nn.Tanh(), torch.nn.Linear(32, 2))
opt = APTS(model, torch.nn.functional.cross_entropy, comm, local_iters=5, global_iters=1)

shuffle = torch.Generator().manual_seed(2)  # the same minibatches on every rank
for epoch in range(10):
    order = torch.randperm(len(y), generator=shuffle)
    for batch in order.split(500):
        loss = opt.step(x[batch], y[batch])
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    if comm.rank == 0:
        print(f"epoch {epoch + 1}  loss {loss:.4f}  accuracy {accuracy:.3f}  "
              f"radius {opt.report.radius:.2e}  accepted {opt.report.accepted}")

# every rank holds the same parameters, bit for bit
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
spread = comm.allreduce(float((flat - torch.from_numpy(comm.bcast(flat.numpy()))).abs().max()), op=MPI.MAX)
if comm.rank == 0:
    print(f"ranks {comm.size}  subdomains {opt.n_subdomains}  final loss {loss:.4f}  "
          f"accuracy {accuracy:.3f}  largest difference between ranks {spread:g}")
