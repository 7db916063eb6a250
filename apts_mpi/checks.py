"""Values checked against the problem they will be used in (not only against their own range),
before the run folder is made: each function raises :class:`~apts_mpi.errors.InputError` with one
line naming the key, its value and the bound, or returns.

* lengths against the context: :func:`apts_mpi.problems.language` (a text too short for
  ``data.context``);
* overlap against the batch: :func:`check_overlap`;
* values against the dtype's range: :func:`check_dtype_range`;
* sizes against memory: :func:`check_memory`.
"""
from __future__ import annotations

import math
import os

import torch

from .errors import InputError

__all__ = ["check_overlap", "check_dtype_range", "check_memory", "available_memory"]


def check_overlap(n: int, batch_size: int, overlap: float) -> None:
    """``data.overlap`` must leave at least one new sample in each minibatch of ``batch_size`` out
    of ``n`` samples (a full batch, ``batch_size >= n``, ignores the overlap)."""
    if batch_size >= n:
        return
    shared = round(overlap * batch_size)
    if shared >= batch_size:
        raise InputError(f"data.overlap={overlap} of data.batch_size={batch_size} shares "
                         f"round({overlap} * {batch_size}) = {shared} samples, the whole minibatch: "
                         f"no new sample per step (use overlap < {(batch_size - 0.5) / batch_size:.3g} "
                         "or a larger batch_size)")


def check_dtype_range(values: dict, dtype: torch.dtype, prefix: str) -> None:
    """Every float in ``values`` (a config section) must be representable in ``dtype`` (the model's
    floating dtype, which tensors built from them take): finite there, and not rounded to 0."""
    if not dtype.is_floating_point:
        return
    info = torch.finfo(dtype)
    for key, value in values.items():
        if type(value) is not float or not math.isfinite(value) or value == 0:
            continue
        if abs(value) > info.max:
            raise InputError(f"{prefix}{key}={value:g} is outside the range of the model's "
                             f"{str(dtype).removeprefix('torch.')} (largest {info.max:.4g}): it "
                             "would overflow to infinity")
        if torch.tensor(value, dtype=torch.float64).to(dtype).item() == 0:
            raise InputError(f"{prefix}{key}={value:g} is below the smallest "
                             f"{str(dtype).removeprefix('torch.')} value ({info.smallest_normal:.4g}"
                             " normal): it would round to 0")


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (the host's available memory for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(nbytes: int, what: str, device: torch.device) -> None:
    """``what`` (a key and its value) needs at least ``nbytes`` on ``device``: refuse it at once if
    that exceeds the memory available, instead of an allocator's traceback mid-way."""
    have = available_memory(device)
    if nbytes > have:
        raise InputError(f"{what} needs at least {nbytes / 2**30:.3g} GiB on {device} for its "
                         f"data alone; {have / 2**30:.3g} GiB are available")
