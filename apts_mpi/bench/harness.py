"""The benchmarks' one harness: build, warm up, time, median, JSON.

Every benchmark of :mod:`apts_mpi.bench` builds its optimiser through the public constructor path
(:func:`build_apts`: :func:`apts_mpi.optimizers.build_optimizer`, as a config would), times
``warmup + iterations`` calls of one step with :func:`time_steps` (barriers between ranks, device
synchronisations around each call), keeps the median of the timed calls (:func:`median`) and
writes its rows as JSON (:func:`append_jsonl` for one row a run, :func:`write_json` for a result).
What a step did is read from the optimiser's public report, never by patching the built optimiser.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_options(path) -> dict:
    """The APTS keywords of the config file ``path`` (validated, defaults filled in), less
    ``method`` and ``subdomains`` (the benchmark's world sets those): the benchmarks take a
    config's settings from the file itself, never from a copy."""
    from ..config import load
    keywords = dict(load(path)["optimizer"])
    if keywords.pop("method") != "apts":
        raise SystemExit(f"{path}: not an APTS config")
    keywords.pop("subdomains")
    return keywords


def build_apts(model, objective, comm=None, *, seed: int = 0, example=None, **keywords):
    """APTS with ``keywords`` (those of :mod:`apts_mpi.options`), built as the training loop builds
    it.  ``comm``: an mpi4py communicator, None (one process) or a :class:`~apts_mpi.comm.Comm`
    (e.g. with ``measure_wait``; its counters are the optimiser's)."""
    from ..optimizers import build_optimizer
    return build_optimizer({"seed": seed, "optimizer": {"method": "apts", **keywords}}, model,
                           objective, comm, example=example)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU or without a device)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    """Peak device memory allocated (CUDA), else the process's peak resident set (it never falls)."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_steps(step, warmup: int, iterations: int, *, comm=None, device=None,
               barrier_after: bool = False, after=None) -> list[float]:
    """Seconds of each of ``iterations`` calls of ``step()`` that follow ``warmup`` untimed ones.

    Each call starts after a barrier of ``comm`` (a :class:`~apts_mpi.comm.Comm`; all ranks call
    this together) and is timed between synchronisations of ``device``; with ``barrier_after`` the
    time includes waiting for the slowest rank.  ``after(seconds)`` runs after each timed call
    (to read the optimiser's report of that step).
    """
    times = []
    for k in range(warmup + iterations):
        if comm is not None:
            comm.barrier()
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if comm is not None and barrier_after:
            comm.barrier()
        seconds = time.perf_counter() - start
        if k >= warmup:
            times.append(seconds)
            if after is not None:
                after(seconds)
    return times


def median(values) -> float:
    return float(statistics.median(values))


def append_jsonl(path, row: dict) -> None:
    """Append one result row (one JSON line) to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(paths) -> list[dict]:
    """The rows of JSON-lines files, in order."""
    rows = []
    for p in paths:
        with open(p) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def write_json(path, value) -> None:
    """``value`` as indented JSON in ``path``, replaced whole (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)
