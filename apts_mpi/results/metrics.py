"""``metrics.h5``: the per-iteration and per-epoch series of one run, and its attributes.

``/iterations/<series>`` and ``/epochs/<series>``: one 1-D dataset per series, float64, int64 or
bool, equal lengths within a group.  Run attributes are root attributes, stored by the attribute
convention of :mod:`apts_mpi.results.files`.  The file is rewritten whole, atomically, by rank 0
(h5py is serial, so there is no MPI here): built in memory, written, read back and checked, then
renamed (:mod:`apts_mpi.results.files`); a failure raises ``WriteError`` and keeps the old file.

Series the report reads (:mod:`apts_mpi.results.report`)
---------------------------------------------------------
Epoch series: ``epoch``, ``loss`` (training loss), the problem's quality measure, one of
``test_accuracy`` (a fraction in [0, 1]; a run whose values exceed 1 is taken as already in
percent; higher is better), ``val_loss`` (validation loss, lower is better) and ``l2_error``
(relative L2 error against a reference solution, lower is better), and the cumulative counters since
the start of training ``seconds`` (wall time), ``accepted``, ``rejected``, ``nonfinite``,
``loss_evals``, ``grad_evals``.  Attributes: ``method``, ``subdomains``, ``seed``, ``config`` (the
resolved configuration, a dict), ``world_size``, ``device``.  Any of them may be missing.
"""
from __future__ import annotations

import hashlib
import os

import h5py
import numpy as np

from .files import (INT64_MAX, ResultsError, WriteError, atomic_write, check_name, decode_attr,
                    encode_attr, hdf5_image, write_bytes)

__all__ = ["METRICS_FILE", "write_metrics", "read_metrics"]

METRICS_FILE = "metrics.h5"


def _series_array(name: str, values, group: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"/{group}/{name}: a series must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(np.bool_, copy=False)
    if arr.dtype.kind in "iu":
        if arr.dtype == np.uint64 and arr.size and arr.max() > INT64_MAX:
            raise ValueError(f"/{group}/{name}: values exceed int64")
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64, copy=False)
    raise TypeError(f"/{group}/{name}: dtype {arr.dtype} is not numeric (float, int or bool)")


def _write_series(group: h5py.Group, name: str, arr: np.ndarray) -> None:
    group.create_dataset(name, data=arr)


def write_metrics(path, iterations: dict, epochs: dict, attrs: dict) -> None:
    """Write ``metrics.h5`` atomically: ``/iterations``, ``/epochs`` and root attributes.

    Each series becomes a 1-D dataset: integer input as int64, floating input as float64, bool
    as bool.  Attributes follow the module's attribute convention.  Raises ``ValueError`` when the
    series of one group differ in length or are not 1-D, ``TypeError`` for a value that cannot be
    stored exactly; both before any file is touched.
    """
    groups = {}
    for gname, series in (("iterations", iterations), ("epochs", epochs)):
        arrays = {check_name(k, f"/{gname}"): _series_array(k, v, gname)
                  for k, v in series.items()}
        lengths = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"/{gname}: series lengths differ: {lengths}")
        groups[gname] = arrays
    encoded = {k: encode_attr(k, v) for k, v in attrs.items()}

    with hdf5_image() as (f, image):
        for gname, arrays in groups.items():
            g = f.create_group(gname, track_order=True)
            for name, arr in arrays.items():
                _write_series(g, name, arr)
        for k, v in encoded.items():
            f.attrs[k] = v
    body = image()

    def verify(tmp):  # read back from the file system: the same bytes, a readable metrics file
        with open(tmp, "rb") as fh:
            same = hashlib.sha256(fh.read()).digest() == hashlib.sha256(body).digest()
        if not same:
            raise WriteError(f"{path}: the metrics file read back differs from the one written")
        read_metrics(tmp)

    atomic_write(path, lambda tmp: write_bytes(tmp, body), verify=verify)


def read_metrics(path):
    """Read ``metrics.h5`` -> ``(iterations, epochs, attrs)``, series as numpy arrays.

    Raises ``ResultsError`` naming the file when it is missing, not HDF5, lacks a group, or holds
    series that are not 1-D or of unequal length within a group.
    """
    path = os.fspath(path)
    try:
        with h5py.File(path, "r") as f:
            out = []
            for gname in ("iterations", "epochs"):
                g = f.get(gname)
                if not isinstance(g, h5py.Group):
                    raise ResultsError(f"{path}: metrics file has no group /{gname}")
                series = {}
                for name, ds in g.items():
                    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
                        raise ResultsError(f"{path}: /{gname}/{name} is not a 1-D dataset")
                    series[name] = np.asarray(ds[()])
                lengths = {k: v.shape[0] for k, v in series.items()}
                if len(set(lengths.values())) > 1:
                    raise ResultsError(f"{path}: /{gname} series lengths differ: {lengths}")
                out.append(series)
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
    except ResultsError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ResultsError(f"{path}: cannot read metrics file: {exc}") from exc
    return out[0], out[1], attrs
