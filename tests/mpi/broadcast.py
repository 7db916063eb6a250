"""Optimisers built on ranks whose models start from different weights.

    mpiexec -n 2 python -m mpi4py tests/mpi/broadcast.py OUT_DIR

Rank r seeds torch with 100 + r before building a network with batch norm, builds an optimiser
over COMM_WORLD (``apts``, ``apts-model-parallel``, ``adam``: data-parallel), and writes the model
state right after construction to ``OUT_DIR/<name>-rank<r>.npz``.  ``tests/test_api.py`` compares
every rank's with a network built on one process with seed 100 (rank 0's).
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch
from mpi4py import MPI

from apts_mpi import APTS
from apts_mpi.comm import Comm
from apts_mpi.optimizers import DataParallel


def network(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3))
    with torch.no_grad():  # running statistics that differ per seed too
        model[1].running_mean.normal_()
        model[1].num_batches_tracked += seed
    return model


def main(out):
    comm = MPI.COMM_WORLD
    loss = torch.nn.functional.cross_entropy
    builders = {
        "apts": lambda m: APTS(m, loss, comm),
        "apts-model-parallel": lambda m: APTS(m, loss, comm, model_parallel=True, decomposition="stages"),
        "adam": lambda m: DataParallel(m, loss, torch.optim.Adam(m.parameters()), Comm(comm)),
    }
    for name, build in builders.items():
        model = network(100 + comm.rank)
        build(model)
        # model-parallel APTS empties the blocks a rank does not hold: the state it keeps
        state = {k: v for k, v in model.state_dict().items() if v.numel()}
        np.savez(os.path.join(out, f"{name}-rank{comm.rank}.npz"),
                 **{k: v.detach().numpy() for k, v in state.items()})


if __name__ == "__main__":
    main(sys.argv[1])
