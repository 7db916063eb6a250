"""Reference runs of every APTS mode, stored bit for bit (issue 21: the refactor into parts must
give the iterates main gave before it).

    python tests/reference/runs.py write                              serial emulation (N = 2, 4)
    mpiexec -n P python -m mpi4py tests/reference/runs.py write       P = 2 or 4
    mpiexec -n P python -m mpi4py tests/reference/runs.py check OUT   compare, write OUT on rank 0

``write`` stores ``tests/reference/world<P>.npz`` (P = 1: the serial emulation) from rank 0: for
each case, the final flat parameters (model parallel: gathered block by block), every value of
:meth:`record` but the timings, the report's values and the accept sequences (the APTS step's and
the global pass's), ``ITERATIONS`` iterations each, float64, on a small MLP.  ``check`` runs the
same cases and writes ``OUT`` (JSON, rank 0): case -> the names of the arrays that differ from the
stored ones in any bit (empty: bitwise equal).  tests/test_reference.py runs both checks.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch

from apts_mpi import APTS
from apts_mpi.optimizers import AdamThenAPTS

torch.set_num_threads(1)
HERE = Path(__file__).parent
ITERATIONS = 4
# strict acceptance constants, so that the runs mix accepted and rejected steps
CONSTANTS = dict(radius=0.1, max_radius=1.0, eta1=0.9, eta2=0.95)
REPORT = ("loss", "trial_loss", "final_loss", "pred", "rho", "radius", "step_inf",
          "local_loss_evals", "local_grad_evals", "local_loss_evals_total",
          "local_grad_evals_total", "global_loss_evals", "global_grad_evals", "global_accepted",
          "global_rejected")


def modes():
    """name -> APTS keywords (and the case keywords ``batchnorm``, ``adam_steps``)."""
    return {
        "default": {},
        "global": dict(global_iters=2),
        "acceptance-none": dict(acceptance="none", global_iters=1),
        "nonmonotone": dict(acceptance="nonmonotone", window=2, global_iters=1),
        "sign": dict(step="sign", norm="inf"),
        "norm2": dict(norm="2", global_iters=1),
        "foc": dict(foc=True, local_fraction=0.5, global_iters=2),
        "shard": dict(local_batch="shard", foc=True),
        "shard-global": dict(local_batch="shard", global_iters=2),
        "fraction": dict(local_batch=0.5, micro_batch=30, foc=True, global_iters=1),
        "data": dict(space="data", global_iters=1),
        "data-batchnorm": dict(space="data", batchnorm=True, micro_batch=23, local_fraction=0.5),
        "bf16": dict(autocast="bf16", global_iters=1),
        "bf16-shard": dict(autocast="bf16", local_batch="shard", global_iters=1),
        "device": dict(local_decisions="device", foc=True, global_iters=1),
        "device-data": dict(space="data", local_decisions="device"),
        "qn-local": dict(local_model="lbfgs", global_model="lsr1", global_iters=2),
        "qn-lsr1": dict(local_model="lsr1", local_iters=4, global_model="lbfgs", global_iters=1),
        "cost": dict(decomposition="cost", global_iters=1),
        "random-tensors": dict(decomposition="random-tensors"),
        "batchnorm-micro": dict(batchnorm=True, micro_batch=23, global_iters=2),
        "adam-apts": dict(adam_steps=3, local_model="lbfgs", global_model="lbfgs", global_iters=2),
    }


def cases(world):
    """name -> (subdomains, keywords, model_parallel) for a world of ``world`` ranks (1: the
    serial emulations of N = 2 and 4)."""
    out = {}
    for n in ((2, 4) if world == 1 else (world,)):
        for name, kw in modes().items():
            out[f"N{n}-{name}"] = (n, kw, False)
        stages = dict(decomposition="stages", local_iters=3)
        out[f"N{n}-stages"] = (n, dict(stages), world > 1)
        out[f"N{n}-stages-lsr1"] = (n, dict(stages, local_model="lsr1", global_iters=2), world > 1)
        out[f"N{n}-stages-micro"] = (n, dict(stages, micro_batch=25, acceptance="nonmonotone"),
                                     world > 1)
    if world == 4:
        out["N2x2"] = (2, dict(replicas=2, global_iters=1), False)
        out["N2x2-none"] = (2, dict(replicas=2, acceptance="none"), False)
        out["N2x2-shard"] = (2, dict(replicas=2, local_batch="shard", foc=True), False)
        out["N2x2-fraction"] = (2, dict(replicas=2, local_batch=0.5, micro_batch=30), False)
    return out


def problem(batchnorm=False, stages=False):
    """A float64 MLP (an uneven nn.Sequential) and a fixed minibatch of 120 samples."""
    torch.manual_seed(0)
    L, T = torch.nn.Linear, torch.nn.Tanh
    norm = [torch.nn.BatchNorm1d(12)] if batchnorm else []
    layers = [L(16, 12), *norm, T(), L(12, 8), T(), L(8, 4)]
    if stages:
        layers = [L(16, 20), T(), L(20, 12), T(), L(12, 8), T(), L(8, 4)]
    model = torch.nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(1000)
    x = torch.randn(120, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (120,), generator=g)
    return model, x, y


def run(subdomains, keywords, model_parallel, comm=None):
    """ITERATIONS steps; the arrays stored for the case (rank 0's; None elsewhere)."""
    kw = dict(keywords)
    adam_steps = kw.pop("adam_steps", 0)
    model, x, y = problem(kw.pop("batchnorm", False), kw.get("decomposition") == "stages")
    world = 1 if comm is None else comm.Get_size()
    kw.update(CONSTANTS, subdomains=subdomains if world == 1 else None, seed=3)
    loss_fn = torch.nn.functional.cross_entropy
    if adam_steps:
        both = AdamThenAPTS(model, loss_fn, comm, lr=1e-2, adam_steps=adam_steps, **kw)
        for _ in range(adam_steps):
            both.step(x, y)
        opt = both.apts
    else:
        opt = APTS(model, loss_fn, comm, model_parallel=model_parallel, **kw)
    records, reports, returned, accepted = [], [], [], []
    for _ in range(ITERATIONS):
        returned.append(opt.step(x, y))
        row = opt.record()
        # "damped" was added to the record after the references were stored (never 1 without
        # damping, which no reference case uses; tests/test_scaled.py checks it)
        records.append([row[k] for k in sorted(row) if not k.startswith("seconds") and k != "damped"])
        reports.append([float(getattr(opt.report, k)) for k in REPORT])
        accepted.append([int(opt.report.accepted), int(opt.report.global_accepted)])
    if model_parallel:
        block = opt.sub.gather(torch.empty(opt.sub.numel, dtype=torch.float64)).numpy()
        blocks = comm.gather(block, root=0)
        if comm.Get_rank() != 0:
            return None
        flat = np.concatenate(blocks)
    else:
        if comm is not None and comm.Get_rank() != 0:
            return None
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
    return dict(flat=flat, record=np.array(records, dtype=np.float64),
                report=np.array(reports, dtype=np.float64),
                returned=np.array([float(v) for v in returned]),
                accepted=np.array(accepted, dtype=np.int64))


def all_runs(comm, only=""):
    world = 1 if comm is None else comm.Get_size()
    out = {}
    for name, (n, kw, mp) in cases(world).items():
        if only and only not in name:
            continue
        arrays = run(n, kw, mp, comm)
        if arrays is not None:
            out.update({f"{name}/{k}": v for k, v in arrays.items()})
    return out


def reference_path(world):
    return HERE / f"world{world}.npz"


def compare(stored, fresh) -> dict:
    """case -> names of the arrays that differ in any bit (NaN equal to NaN of the same bits)."""
    differ = {}
    for key in sorted(set(stored) | set(fresh)):
        case, array = key.split("/")
        same = key in stored and key in fresh and stored[key].shape == fresh[key].shape and \
            stored[key].tobytes() == np.ascontiguousarray(fresh[key], stored[key].dtype).tobytes()
        differ.setdefault(case, [])
        if not same:
            differ[case].append(array)
    return differ


def main(what, out=None, only=""):
    comm = None
    if "mpi4py" in sys.modules or os.environ.get("PMI_RANK") is not None:
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_size() > 1:
            comm = MPI.COMM_WORLD
    world = 1 if comm is None else comm.Get_size()
    runs = all_runs(comm, only)
    if comm is not None and comm.Get_rank() != 0:
        return
    if what == "write":
        np.savez_compressed(reference_path(world), **runs)
    else:
        stored = dict(np.load(reference_path(world)))
        if only:
            stored = {k: v for k, v in stored.items() if only in k.split("/")[0]}
        Path(out).write_text(json.dumps(compare(stored, runs), indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
