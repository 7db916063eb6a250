"""What a run was made with, for ``metrics.h5``'s attributes: library versions, the source's git
commit and the SLURM job.  Rank 0 only (no MPI collective)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from .comm import library_version, mpi4py_version


def git_commit(path=None) -> str:
    """The commit of the git checkout holding ``path`` (this package by default), with ``-dirty``
    when tracked files differ from it; ``""`` outside a checkout or without git."""
    where = Path(path or __file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def provenance() -> dict:
    """``mpi4py``, ``mpi_library`` (MPI.Get_library_version(), first line), ``numpy``,
    ``git_commit``, ``slurm_job_id`` (``""`` outside SLURM; an array task's job id is
    ``ARRAYJOB_TASK``)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"mpi4py": mpi4py_version(), "mpi_library": library_version(),
            "numpy": np.__version__, "git_commit": git_commit(), "slurm_job_id": job}
