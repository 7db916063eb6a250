"""APTS cases run under a real mpiexec, and their serial twins.

    mpiexec -n P python -m mpi4py tests/mpi/cases.py OUT_DIR   (P = 1, 2 or 4)

runs every case for world size P and writes ``OUT_DIR/<case>.npz`` on rank 0: the final flat
parameters, the accept sequence, the largest difference between any rank's parameters (and buffers)
and rank 0's, and between any rank's per-iteration report values and rank 0's.
``tests/test_mpi.py`` compares them with :func:`run_case` on one process (serial emulation).

Case keywords that are not APTS keywords: ``batchnorm`` (a batch-norm layer in the network),
``adam_steps`` (``adam-apts``: that many data-parallel Adam steps before the APTS iterations) and
``perturb`` (on the ranks that are not their group's rank 0, every Allreduce returns a loss off by
a random 1e-2: MPI does not promise bitwise identical reductions on every rank, pmodels/mpich#6538;
exaggerated here so that a decision taken on a rank's own value would differ).
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch

from apts_mpi import APTS
from apts_mpi.optimizers import AdamThenAPTS

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


TEXT = "".join(f"line {i}: to be, or not to be, that is the question {'ABCxyz'[i % 6]}\n"
               for i in range(40))


def problem_of(name, rank=0):
    """(model, batch, objective) of one of the package's problems, tiny, float64: the PINN
    (``pinn``) or the small GPT on a synthetic text (``gpt``), through the problem interface."""
    import tempfile
    from apts_mpi.problems import PROBLEMS
    data = {"root": None, "download": False, "batch_size": 100000, "overlap": 0.0,
            "test_batch_size": 64}
    if name == "pinn":
        data.update(dataset="poisson2d", interior_points=60, boundary_points=16)
        model = "pinn-mlp"
    else:
        root = tempfile.mkdtemp(prefix=f"apts-cases-{rank}-")
        os.makedirs(os.path.join(root, "tinyshakespeare"))
        with open(os.path.join(root, "tinyshakespeare", "input.txt"), "w") as f:
            f.write(TEXT)
        data.update(dataset="tinyshakespeare", root=root, context=8)
        model = "gpt-small"
    cfg = {"seed": 0, "data": data, "model": {"name": model, "dtype": "float64"}}
    p = PROBLEMS[data["dataset"]](cfg, torch.device("cpu"), torch.float64)
    torch.manual_seed(0)
    net = p.build_model()
    return net, p.batch(torch.arange(min(p.n_train, 96))), p.objective


def cases(world):
    """name -> (subdomains, APTS keywords) for a world of ``world`` ranks."""
    out = {}
    if world in (1, 2, 4):
        n = 2 if world == 1 else world
        for dec in ("balanced", "random-tensors", "flat"):
            for acc in ("ratio", "none", "nonmonotone"):
                out[f"N{n}-{dec}-{acc}"] = (n, dict(decomposition=dec, acceptance=acc))
        out[f"N{n}-cost"] = (n, dict(decomposition="cost"))
        out[f"N{n}-lbfgs-local"] = (n, dict(local_model="lbfgs", global_model="lsr1"))
        out[f"N{n}-foc-half"] = (n, dict(foc=True, local_fraction=0.5, global_iters=2))
        # batch norm with micro-batches that cut across the ranks' shares: every evaluation of an
        # iteration must see the same cuts, the serial emulation those of the N-rank run
        out[f"N{n}-batchnorm-micro"] = (n, dict(batchnorm=True, micro_batch=23, global_iters=2))
        # the package's other problems: a PINN (input derivatives by autograd) and a GPT
        out[f"N{n}-pinn"] = (n, dict(problem="pinn", micro_batch=20))
        out[f"N{n}-gpt"] = (n, dict(problem="gpt"))
        # APTS after Adam steps: on one process the Adam steps sum the N-rank run's shares too
        out[f"N{n}-adam-apts"] = (n, dict(problem="pinn", adam_steps=3, local_model="lbfgs",
                                         global_model="lbfgs", global_iters=3))
        # stochastic local phases: each subdomain its own shard, or a seeded half of the pieces
        out[f"N{n}-shard-foc"] = (n, dict(local_batch="shard", foc=True))
        out[f"N{n}-half-pieces"] = (n, dict(local_batch=0.5, micro_batch=30, foc=True))
        # data space (APTS_D): shards of the minibatch, averaged corrections; with batch norm
        out[f"N{n}-data"] = (n, dict(space="data"))
        out[f"N{n}-data-batchnorm"] = (n, dict(space="data", batchnorm=True, micro_batch=23,
                                               local_fraction=0.5, global_iters=2))
        # local decisions on the device (branch-free, one transfer per local phase)
        out[f"N{n}-device-decisions"] = (n, dict(local_decisions="device", foc=True))
        out[f"N{n}-data-device-decisions"] = (n, dict(space="data", local_decisions="device"))
        # issue 22: the scaled trust region (with each first-order step and quasi-Newton), the
        # combined step's radius control, the damped combination, the data space's local pred
        out[f"N{n}-scaled"] = (n, dict(scaling="adam"))
        out[f"N{n}-scaled-lbfgs"] = (n, dict(scaling="adam", local_model="lbfgs", global_model="lsr1"))
        out[f"N{n}-scaled-sign-combined-damped"] = (n, dict(scaling="adam", step="sign",
                                                          radius_control="combined", damping=True))
        out[f"N{n}-adam-step-combined"] = (n, dict(step="adam", radius_control="combined", global_iters=2))
        out[f"N{n}-shard-damped"] = (n, dict(local_batch="shard", foc=True, damping=True))
        out[f"N{n}-data-local-pred"] = (n, dict(space="data", data_pred="local", damping=True))
    if world == 4:
        for acc in ("ratio", "none"):
            out[f"N2x2-{acc}"] = (2, dict(replicas=2, acceptance=acc))
        # replicas whose reductions differ take their group's rank-0 decisions: the run is the
        # unperturbed serial one
        out["N2x2-shard"] = (2, dict(replicas=2, local_batch="shard", foc=True))
        out["N2x2-perturbed"] = (2, dict(replicas=2, perturb=True, global_iters=2))
        out["N2x2-scaled-damped"] = (2, dict(replicas=2, scaling="adam", damping=True,
                                             radius_control="combined"))
    return out


REPORTED = ("loss", "trial_loss", "final_loss", "pred", "rho", "radius")


def perturb(opt, rank):
    """Every Allreduce of ``opt`` on this rank returns its last entry (the loss) off by N(0, 1e-2)."""
    noise = torch.Generator().manual_seed(rank)
    for comm in (opt.comm, opt.group):
        def allreduce_(tensor, reduce=comm.allreduce_):
            reduce(tensor)
            tensor[-1] += 1e-2 * float(torch.randn((), generator=noise, dtype=torch.float64))
            return tensor
        comm.allreduce_ = allreduce_


def run_case(kwargs, subdomains, comm=None, vary_data=False, batchnorm=False, full=False):
    """(final flat parameters, accept sequence); with ``full`` also the flat buffers and the
    per-iteration report values REPORTED."""
    kwargs = dict(kwargs)
    batchnorm = kwargs.pop("batchnorm", batchnorm)
    perturbed = kwargs.pop("perturb", False)
    rank = 0 if comm is None else comm.Get_rank()
    if "problem" in kwargs:
        model, batch, objective = problem_of(kwargs.pop("problem"), rank)
    else:
        model, x, y = problem(rank=rank, vary_data=vary_data, batchnorm=batchnorm)
        batch, objective = (x, y), torch.nn.functional.cross_entropy
    adam_steps = kwargs.pop("adam_steps", 0)
    kwargs.update(subdomains=subdomains if comm is None or comm.Get_size() == 1 else None, seed=3)
    if adam_steps:
        both = AdamThenAPTS(model, objective, comm, lr=1e-2, adam_steps=adam_steps, **CONSTANTS, **kwargs)
        for _ in range(adam_steps):
            both.step(batch)
        opt = both.apts
    else:
        opt = APTS(model, objective, comm, **CONSTANTS, **kwargs)
    if perturbed and comm is not None and opt.group.rank != 0:
        perturb(opt, rank)
    accepted, reported = [], []  # per iteration: APTS step accepted, global-pass steps accepted
    for _ in range(ITERATIONS):
        opt.step(batch)
        accepted.append((opt.report.accepted, opt.report.global_accepted))
        reported.append([getattr(opt.report, k) for k in REPORTED])
    # the parameters follow the serial emulation; batch-norm running statistics are the
    # coordinator's (broadcast), which the serial emulation's forward passes do not reproduce
    flat = torch.cat([t.detach().reshape(-1).double() for t in model.parameters()])
    if not full:
        return flat.numpy().copy(), np.array(accepted)
    buffers = [t.detach().reshape(-1).double() for t in model.buffers()]
    buffers = torch.cat(buffers).numpy().copy() if buffers else np.zeros(0)
    return flat.numpy().copy(), np.array(accepted), buffers, np.array(reported)


def data_fault(comm):
    """Rank 1's copy of the minibatch has a NaN in a sample of rank 0's share: rank 1 alone sees
    it, in its local phase.  Returns this rank's (report.loss, record()) after one iteration."""
    model, x, y = problem()
    if comm.Get_rank() == 1:
        x[0, 0] = float("nan")
    opt = APTS(model, torch.nn.functional.cross_entropy, comm, seed=3, **CONSTANTS)
    opt.step(x, y)
    row = opt.record()
    return [opt.report.loss, row["accepted"], row["nonfinite"]]


def spread(values):
    """The largest difference to rank 0's values (NaN where rank 0's is NaN counts as equal)."""
    worst = 0.0
    for v in values[1:]:
        same_nan = np.isnan(v) & np.isnan(values[0])
        diff = np.where(same_nan, 0.0, np.abs(v - values[0]))
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
    return worst


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
        flat, accepted, buffers, reported = run_case(
            kwargs, subdomains, comm, vary_data=name == "different-data",
            batchnorm=name == "batchnorm", full=True)
        gathered = comm.gather((np.concatenate([flat, buffers]), reported), root=0)
        if comm.Get_rank() == 0:
            np.savez(os.path.join(out_dir, f"{name}.npz"), flat=flat, accepted=accepted,
                     spread=spread([g[0] for g in gathered]),
                     report_spread=spread([g[1] for g in gathered]), world=world)
    if world > 1 and (not only or only in "data-fault"):
        rows = comm.gather(data_fault(comm), root=0)
        if comm.Get_rank() == 0:
            np.savez(os.path.join(out_dir, "data-fault.npz"), rows=np.array(rows), world=world)


if __name__ == "__main__":
    main(*sys.argv[1:])
