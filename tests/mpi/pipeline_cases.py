"""Model-parallel APTS cases run under a real mpiexec, and their serial twins.

    mpiexec -n P python -m mpi4py tests/mpi/pipeline_cases.py OUT_DIR   (P = 2 or 4)

runs every case of :func:`cases` with ``model_parallel=True`` (rank d holds block d only) and writes
``OUT_DIR/<case>.npz`` on rank 0: the final flat parameters (gathered block by block), the
per-iteration report values, the accept sequences, the parameters each rank held and the bytes it
sent down the pipe.  ``tests/test_model_parallel.py`` compares them with :func:`run_serial` on one
process (the serial emulation with ``decomposition="stages"``).
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch

from apts_mpi import APTS

torch.set_num_threads(1)
ITERATIONS = 5
CONSTANTS = dict(radius=0.1, max_radius=1.0, eta1=0.9, eta2=0.95)  # mixes accepts and rejects
REPORTED = ("loss", "trial_loss", "final_loss", "pred", "rho", "radius")


def network(kind):
    """A float64 nn.Sequential: ``mlp`` (uneven layers, Flatten and activations between them),
    ``deep`` (a uniform deep MLP: 16 equal layers) or ``bn`` (batch norm inside a block)."""
    L, T = torch.nn.Linear, torch.nn.Tanh
    if kind == "deep":  # 16 equal layers 16 -> 16 (targets are classes 0..3 of 16)
        layers = [torch.nn.Flatten()]
        for _ in range(16):
            layers += [L(16, 16), T()]
        layers = layers[:-1]
    elif kind == "bn":
        layers = [L(16, 12), torch.nn.BatchNorm1d(12), T(), L(12, 12), T(), L(12, 8), T(), L(8, 4)]
    else:
        layers = [torch.nn.Flatten(), L(16, 20), T(), L(20, 12), T(), L(12, 8), T(), L(8, 4)]
    return torch.nn.Sequential(*layers).double()


def problem(kind, seed=0, samples=120):
    torch.manual_seed(seed)
    model = network(kind)
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(samples, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (samples,), generator=g)
    return model, x, y


def cases(world):
    """name -> (network kind, APTS keywords) for a world of ``world`` ranks."""
    base = dict(CONSTANTS, decomposition="stages", local_iters=3)
    return {
        "default": ("mlp", dict(base)),
        "micro-batch": ("mlp", dict(base, micro_batch=25)),
        "no-global": ("deep", dict(base, global_iters=0, local_iters=4)),
        "lsr1-two-global": ("deep", dict(base, local_model="lsr1", global_iters=2)),
        "nonmonotone-sign": ("mlp", dict(base, acceptance="nonmonotone", step="sign")),
        "batchnorm": ("bn", dict(base, micro_batch=40)),
    }


def run(kind, kwargs, comm=None, subdomains=None, optimizer=APTS):
    """ITERATIONS steps on a fixed batch; (optimizer, per-iteration report values, accepted)."""
    model, x, y = problem(kind)
    opt = optimizer(model, torch.nn.functional.cross_entropy, comm, subdomains=subdomains, **kwargs)
    reports, accepted = [], []
    for _ in range(ITERATIONS):
        opt.step(x, y)
        reports.append([getattr(opt.report, k) for k in REPORTED])
        accepted.append([opt.report.accepted, opt.report.global_accepted])
    return opt, np.array(reports), np.array(accepted)


def run_serial(kind, kwargs, subdomains, optimizer=APTS):
    """The serial emulation: (flat parameters, report values, accepted)."""
    opt, reports, accepted = run(kind, kwargs, subdomains=subdomains, optimizer=optimizer)
    flat = torch.cat([p.detach().reshape(-1) for p in opt.model.parameters()])
    return flat.numpy(), reports, accepted


class Coupled(APTS):
    """Negative control: a serial emulation whose local phases see the blocks before them at their
    local iterates (a coupling through the other blocks' current iterates), not at theta_k."""

    def _local_phase(self, d, core, batch, theta):
        result = super()._local_phase(d, core, batch, theta)
        a, b = self.offsets[d], self.offsets[d + 1]
        core.subdomain.add_(self.correction[a:b])
        if d == len(self.local) - 1:
            self.whole.scatter(theta)  # theta_k again before the combination
        return result


def main(out_dir):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    for name, (kind, kwargs) in cases(comm.Get_size()).items():
        opt, reports, accepted = run(kind, dict(kwargs, model_parallel=True), comm)
        block = opt.sub.gather(torch.empty(opt.sub.numel, dtype=torch.float64))
        blocks = comm.gather(block.numpy(), root=0)
        materialised = sum(p.numel() for p in opt.model.parameters())  # the released blocks: 0
        held = comm.gather((opt.params_held, materialised), root=0)
        sent = comm.gather(opt.pipe.bytes_down, root=0)
        everyone = comm.gather(reports, root=0)
        if comm.Get_rank() == 0:
            spread = sum(not np.array_equal(r, reports, equal_nan=True) for r in everyone)
            np.savez(os.path.join(out_dir, f"{name}.npz"), flat=np.concatenate(blocks),
                     reports=reports, accepted=accepted, held=np.array(held),
                     total=sum(p.numel() for p in network(kind).parameters()),
                     sent=np.array(sent), differing_reports=spread)


if __name__ == "__main__":
    main(sys.argv[1])
