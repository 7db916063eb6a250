"""APTS cases run under a real mpiexec, and their serial twins.

    mpiexec -n P python -m mpi4py tests/mpi/cases.py OUT_DIR   (P = 1, 2 or 4)

runs every case for world size P and writes ``OUT_DIR/<case>.npz`` on rank 0: the final flat
parameters, the accept sequence, and the largest difference between any rank's parameters and rank 0's.
``tests/test_mpi.py`` compares them with :func:`run_case` on one process (serial emulation).
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch

from apts_mpi import APTS

torch.set_num_threads(1)
ITERATIONS = 5
# strict acceptance constants, so that the runs mix accepted and rejected steps
CONSTANTS = dict(radius=0.1, max_radius=1.0, eta1=0.9, eta2=0.95)


def problem(seed=0, samples=240, rank=0, vary_data=False, batchnorm=False):
    """A float64 MLP and a fixed data set (different per rank when ``vary_data``)."""
    torch.manual_seed(seed)
    norm = [torch.nn.BatchNorm1d(12)] if batchnorm else []
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), *norm, torch.nn.Tanh(), torch.nn.Linear(12, 8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    g = torch.Generator().manual_seed(1000 + (rank if vary_data else 0))
    x = torch.randn(samples, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (samples,), generator=g)
    return model, x, y


def cases(world):
    """name -> (subdomains, APTS keywords) for a world of ``world`` ranks."""
    out = {}
    if world in (1, 2, 4):
        n = 2 if world == 1 else world
        for dec in ("balanced", "random-tensors", "flat"):
            for acc in ("ratio", "none", "nonmonotone"):
                out[f"N{n}-{dec}-{acc}"] = (n, dict(decomposition=dec, acceptance=acc))
        out[f"N{n}-lbfgs-local"] = (n, dict(local_model="lbfgs", global_model="lsr1"))
        out[f"N{n}-foc-half"] = (n, dict(foc=True, local_fraction=0.5, global_iters=2))
    if world == 4:
        for acc in ("ratio", "none"):
            out[f"N2x2-{acc}"] = (2, dict(replicas=2, acceptance=acc))
    return out


def run_case(kwargs, subdomains, comm=None, vary_data=False, batchnorm=False):
    rank = 0 if comm is None else comm.Get_rank()
    model, x, y = problem(rank=rank, vary_data=vary_data, batchnorm=batchnorm)
    opt = APTS(model, torch.nn.functional.cross_entropy, comm,
               subdomains=subdomains if comm is None or comm.Get_size() == 1 else None, seed=3, **CONSTANTS, **kwargs)
    accepted = []  # per iteration: APTS step accepted, global-pass steps accepted
    for _ in range(ITERATIONS):
        opt.step(x, y)
        accepted.append((opt.report.accepted, opt.report.global_accepted))
    state = list(model.parameters()) + list(model.buffers())
    flat = torch.cat([t.detach().reshape(-1).double() for t in state])
    return flat.numpy().copy(), np.array(accepted)


def main(out_dir, only=""):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    world = comm.Get_size()
    todo = cases(world)
    if world == 4:
        todo["different-data"] = (4, {})
        todo["batchnorm"] = (4, {})
    for name, (subdomains, kwargs) in todo.items():
        if only and only not in name:
            continue
        flat, accepted = run_case(kwargs, subdomains, comm, vary_data=name == "different-data",
                                  batchnorm=name == "batchnorm")
        gathered = comm.gather(flat, root=0)
        if comm.Get_rank() == 0:
            spread = max(float(np.abs(f - gathered[0]).max()) for f in gathered)
            np.savez(os.path.join(out_dir, f"{name}.npz"), flat=flat, accepted=accepted,
                     spread=spread, world=world)


if __name__ == "__main__":
    main(*sys.argv[1:])
