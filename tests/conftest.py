"""Helpers shared by the test files (import them with ``from conftest import ...``; pytest puts
this folder on the path), and the ``slow`` marker's option.

* :func:`problem`, :func:`flat`: a small float64 MLP with a fixed data set, the parameters as one
  vector (the APTS tests);
* :class:`PartComm`: one rank of an evaluation split over ``size`` ranks, without MPI (the
  problems' metric tests);
* :func:`core_at`, :func:`solve`: an engine at a given gradient (float64) and its local solver's
  step for a radius (the solver tests);
* :data:`MPIEXEC`, :data:`ENV`, :func:`mpirun`: a real mpiexec launch with a timeout, so that a
  rank that fails makes the test fail rather than hang.

Tests marked ``slow`` (setup.cfg) run by default; ``-m "not slow"`` leaves them out.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apts_mpi.decomposition import Subdomain
from apts_mpi.trust_region import TrustRegionConfig, TrustRegionCore

TESTS = Path(__file__).parent
# the venv's mpiexec first (the mpich extra), then the system's
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def mpirun(n, *args, timeout=240, env=None):
    """``mpiexec -n n python -m mpi4py ARGS`` (an exception on one rank aborts the job), its output
    captured; fails the test when there is no mpiexec, raises TimeoutExpired past ``timeout`` s."""
    if MPIEXEC is None:
        pytest.fail("mpiexec not found: install the project with the 'mpich' extra or a system MPI")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=ENV if env is None else env)


def problem(seed=0, dtype=torch.float64):
    """A 10-8-6-3 tanh MLP (seeded) and 120 samples of 3 classes."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6),
                                torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(120, 10, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (120,), generator=g)
    return model, x, y


def flat(model):
    """The model's parameters as one detached vector."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


class PartComm:
    """One rank of ``size``: records what evaluate() would sum, returns its own part."""

    def __init__(self, rank, size):
        self.rank, self.size, self.values = rank, size, None

    def sum_scalars(self, values):
        self.values = list(values)
        return list(values)


def core_at(g, **keywords):
    x = torch.zeros(len(g), dtype=torch.float64, requires_grad=True)
    core = TrustRegionCore(Subdomain.whole([x]), TrustRegionConfig(**keywords))
    core.set_gradient(torch.tensor(g, dtype=torch.float64))
    return core


def solve(core, radius):
    g = core.grad
    norms = [float(torch.linalg.vector_norm(g, math.inf)), float(g.dot(g)), float(g.abs().sum())]
    return core.solver.solve(core, radius, *norms)
