"""Results I/O: metrics and checkpoints in HDF5, a summary table and a figure over run folders.

A run folder ``RUN_DIR`` holds two files, both rewritten whole by rank 0 (h5py is serial, so this
module has no MPI in it):

``metrics.h5`` (:func:`write_metrics`, :func:`read_metrics`)
    ``/iterations/<series>`` and ``/epochs/<series>``: one 1-D dataset per series, float64, int64
    or bool, equal lengths within a group.  Run attributes are root attributes.

``checkpoint.h5`` (:func:`save_checkpoint`, :func:`load_checkpoint`)
    ``/payload``: the nested payload, dicts as groups, every node tagged with its type.  Root
    attributes: the caller's ``meta``, then ``format``, ``format_version``, ``sha256`` (over the
    payload and meta) and, written last, ``complete = True``.  The first 512 bytes are an HDF5
    user block (HDF5 skips it) holding ``apts_mpi checkpoint v1``, the SHA-256 and the size of the
    rest of the file; it is checked before libhdf5 parses anything, because a damaged HDF5
    header can abort the process inside the HDF5 library instead of raising.

Every file is written atomically: into ``.<name>.tmp-<pid>`` in the same folder, closed (h5py
flushes), ``os.fsync``-ed, ``os.replace``-d over the target, then the folder is fsync-ed.  A crash
at any moment leaves the old complete file or the new complete file, and on any exception the
temporary file is removed.

Attribute convention (metrics ``attrs`` and checkpoint ``meta``)
-----------------------------------------------------------------
===================================  ============================  ============================
value given                          stored as HDF5 attribute      read back as
===================================  ============================  ============================
``bool`` / ``np.bool_``              bool                          ``bool``
``int`` in int64 range / np integer  int64                         ``int``
``float`` / np floating              float64 (NaN, Inf kept)       ``float``
``str``                              UTF-8 string                  ``str``
``dict``, ``list``, ``None``, an     ``"json:" + json.dumps(v)``   the JSON value (exact)
``int`` outside int64, a ``str``
starting with ``"json:"`` or
containing NUL
===================================  ============================  ============================

JSON values may nest dicts with ``str`` keys, lists, ``str``, ``int``, ``float`` (NaN/Inf allowed),
``bool`` and ``None`` (numpy scalars are converted to Python); tuples and non-``str`` keys are
refused with ``TypeError`` because JSON would not give them back.  A ``str`` that itself starts with
``"json:"`` is stored JSON-encoded, so every ``str`` round-trips.

Metric series convention (read by :func:`report_table` and :func:`plot_runs`)
------------------------------------------------------------------------------
Epoch series: ``epoch``, ``loss``, ``test_accuracy`` (a fraction in [0, 1]; a run whose values
exceed 1 is taken as already in percent), and the cumulative counters since the start of training
``seconds`` (wall time), ``accepted``, ``rejected``, ``loss_evals``, ``grad_evals`` (the table
shows their last value).  Attributes: ``method``, ``subdomains``, ``seed``, ``config`` (the
resolved configuration, a dict), ``world_size``, ``device``.  Any of them may be missing.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch

__all__ = [
    "ResultsError",
    "METRICS_FILE",
    "CHECKPOINT_FILE",
    "write_metrics",
    "read_metrics",
    "save_checkpoint",
    "load_checkpoint",
    "summarize_runs",
    "report_table",
    "plot_runs",
]

METRICS_FILE = "metrics.h5"
CHECKPOINT_FILE = "checkpoint.h5"

_JSON_MARKER = "json:"
_CHECKPOINT_FORMAT = "apts_mpi.checkpoint"
_CHECKPOINT_VERSION = 1
_RESERVED_META = ("complete", "sha256", "format", "format_version")
_PAYLOAD = "/payload"
_TYPE_ATTR = "apts_type"
_HEADER_SIZE = 512  # the HDF5 user block: ignored by HDF5, holds the whole-file digest
_HEADER_MAGIC = "apts_mpi checkpoint v1"
_HEADER_RE = re.compile(rb"apts_mpi checkpoint v1\nsha256 (?P<sha256>[0-9a-f]{64})\n"
                        rb"size (?P<size>[0-9]{1,20})\n\x00*")
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_NUMERIC_KINDS = "biufc"  # numpy dtype kinds HDF5 stores and gives back bit for bit


class ResultsError(RuntimeError):
    """A results file is missing, corrupt, partial, or belongs to another run configuration."""


# --------------------------------------------------------------------------------------------
# Atomic replacement
# --------------------------------------------------------------------------------------------

def _tmp_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def _fsync_dir(folder: str) -> None:
    """Make the rename durable.  Filesystems that cannot fsync a directory are tolerated."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _atomic_write(path, write) -> None:
    """Call ``write(tmp)`` to produce the complete file at ``tmp``, then make it ``path``.

    ``write`` must have closed (hence flushed) the file when it returns.  On any exception the
    temporary file is removed and ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    tmp = _tmp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


# --------------------------------------------------------------------------------------------
# Attributes
# --------------------------------------------------------------------------------------------

def _jsonable(value, where: str):
    """A copy of ``value`` that ``json.loads(json.dumps(.))`` gives back exactly, else TypeError."""
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
        value = value.item()
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if type(value) is list:
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a str; JSON would not give it back")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    raise TypeError(f"{where}: {type(value).__name__} does not round-trip through JSON "
                    "(use dict, list, str, int, float, bool or None)")


def _encode_attr(key, value):
    if not isinstance(key, str) or not key:
        raise TypeError(f"attribute name {key!r} must be a non-empty str")
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
        value = value.item()
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX:
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str) and not value.startswith(_JSON_MARKER) and "\x00" not in value:
        return str(value)
    value = _jsonable(value, f"attribute {key!r}")
    return _JSON_MARKER + json.dumps(value, separators=(",", ":"), allow_nan=True)


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        return json.loads(value[len(_JSON_MARKER):]) if value.startswith(_JSON_MARKER) else value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):  # written by another tool
        return value.tolist()
    return value


def _check_name(name, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{where}: name {name!r} must be a str")
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise ValueError(f"{where}: {name!r} is not a valid HDF5 name (empty, '.', '/' or NUL)")
    return name


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def _series_array(name: str, values, group: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"/{group}/{name}: a series must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        return arr.astype(np.bool_, copy=False)
    if arr.dtype.kind in "iu":
        if arr.dtype == np.uint64 and arr.size and arr.max() > _INT64_MAX:
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
        arrays = {_check_name(k, f"/{gname}"): _series_array(k, v, gname)
                  for k, v in series.items()}
        lengths = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"/{gname}: series lengths differ: {lengths}")
        groups[gname] = arrays
    encoded = {k: _encode_attr(k, v) for k, v in attrs.items()}

    def write(tmp):
        with h5py.File(tmp, "w", track_order=True) as f:
            for gname, arrays in groups.items():
                g = f.create_group(gname, track_order=True)
                for name, arr in arrays.items():
                    _write_series(g, name, arr)
            for k, v in encoded.items():
                f.attrs[k] = v

    _atomic_write(path, write)


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
            attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    except ResultsError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise ResultsError(f"{path}: cannot read metrics file: {exc}") from exc
    return out[0], out[1], attrs


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
#
# The payload is flattened into records (hdf5 path, type JSON, array or None for a group) in
# pre-order.  Every node carries one attribute ``apts_type``, a JSON object whose "kind" is
#   groups:  dict, ordered_dict, list, tuple            (list/tuple children are named 0, 1, ...)
#   leaves:  tensor, ndarray, numpy_scalar, none, bool, int, bigint, float, complex, str, bytes,
#            bytearray, list[int], list[float], list[bool], tuple[int], tuple[float], tuple[bool]
# plus "key": "int" on a child of a dict whose key is an int.  Every leaf is stored as a numeric
# dataset (str as UTF-8 bytes, bigint as decimal digits, None as an empty uint8 array, bool as
# uint8 0/1), so the digest reads back exactly the bytes that were hashed.  The SHA-256 covers,
# in sorted path order, each node's path, its type JSON and its array bytes (little-endian), then
# the canonical JSON of meta.

def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


def _type_json(kind: str, **extra) -> str:
    return json.dumps({"kind": kind, **extra}, separators=(",", ":"), sort_keys=True)


def _uint8(data: bytes) -> np.ndarray:
    return np.frombuffer(bytes(data), dtype=np.uint8).copy()


def _encode_tensor(t: torch.Tensor, where: str):
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"{where}: only dense tensors are supported, got layout {t.layout}")
    requires_grad = bool(t.requires_grad)
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    extra = {"dtype": str(t.dtype), "shape": list(t.shape), "requires_grad": requires_grad}
    try:
        arr = t.numpy()
        extra["raw"] = False
    except TypeError:  # bfloat16, float8, complex32: no numpy dtype; keep the raw bytes
        arr = t.reshape(-1).view(torch.uint8).numpy()
        extra["raw"] = True
    return extra, arr.copy()


def _number_list_kind(seq):
    if not seq:
        return None
    types = {type(e) for e in seq}
    if types == {float}:
        return "float", np.asarray(seq, dtype=np.float64)
    if types == {bool}:
        return "bool", np.asarray(seq, dtype=np.bool_)
    if types == {int} and all(_INT64_MIN <= e <= _INT64_MAX for e in seq):
        return "int", np.asarray(seq, dtype=np.int64)
    return None


def _encode(value, path: str, records: list, key_extra: dict) -> None:
    """Append the records of ``value`` stored at ``path`` (pre-order)."""
    def leaf(kind, arr, **extra):
        records.append((path, _type_json(kind, **key_extra, **extra), arr))

    if isinstance(value, torch.Tensor):
        extra, arr = _encode_tensor(value, path)
        leaf("tensor", arr, **extra)
    elif isinstance(value, np.ndarray):
        arr = np.array(value)  # a copy; subclasses (memmap) come back as ndarray
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{path}: numpy dtype {arr.dtype} is not supported (bool, int, "
                            "uint, float or complex)")
        leaf("ndarray", arr, dtype=arr.dtype.str, shape=list(arr.shape))
    elif value is None:
        leaf("none", np.zeros(0, np.uint8))
    elif isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_)):
        arr = np.asarray(value)
        if arr.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"{path}: numpy scalar of dtype {arr.dtype} is not supported")
        leaf("numpy_scalar", arr, dtype=arr.dtype.str)
    elif isinstance(value, bool):
        leaf("bool", np.asarray(value, dtype=np.bool_))
    elif isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            leaf("int", np.asarray(value, dtype=np.int64))
        else:
            leaf("bigint", _uint8(str(int(value)).encode("ascii")))
    elif isinstance(value, float):
        leaf("float", np.asarray(value, dtype=np.float64))
    elif isinstance(value, complex):
        leaf("complex", np.asarray(value, dtype=np.complex128))
    elif isinstance(value, str):
        leaf("str", _uint8(value.encode("utf-8", "surrogatepass")))
    elif isinstance(value, (bytes, bytearray)):
        leaf("bytearray" if isinstance(value, bytearray) else "bytes", _uint8(value))
    elif type(value) in (dict, OrderedDict):
        kind = "ordered_dict" if type(value) is OrderedDict else "dict"
        records.append((path, _type_json(kind, **key_extra), None))
        names = {}
        for k, v in value.items():
            if type(k) is int:
                name, extra = str(k), {"key": "int"}
            elif isinstance(k, str):
                name, extra = _check_name(k, path), {}
            else:
                raise TypeError(f"{path}: dict key {k!r} must be a str or an int")
            if name in names:
                raise ValueError(f"{path}: keys {names[name]!r} and {k!r} share the name {name!r}")
            names[name] = k
            _encode(v, f"{path}/{name}", records, extra)
    elif type(value) in (list, tuple):
        container = type(value).__name__
        packed = _number_list_kind(value)
        if packed is not None:
            leaf(f"{container}[{packed[0]}]", packed[1])
        else:
            records.append((path, _type_json(container, **key_extra), None))
            for i, v in enumerate(value):
                _encode(v, f"{path}/{i}", records, {})
    else:
        raise TypeError(f"{path}: cannot store a {type(value).__module__}."
                        f"{type(value).__qualname__} in a checkpoint")


def _digest(records, meta: dict) -> str:
    h = hashlib.sha256()

    def chunk(data):
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    for path, tj, arr in sorted(records, key=lambda r: r[0]):
        chunk(f"{path}\x00{tj}".encode("utf-8"))
        if arr is None:
            chunk(b"")
        else:
            little = arr.dtype.newbyteorder("<")
            arr = np.ascontiguousarray(arr, dtype=little)
            chunk(memoryview(arr.reshape(-1).view(np.uint8)))
    chunk(json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=True).encode())
    return h.hexdigest()


def _write_record(f: h5py.File, path: str, type_json: str, arr) -> None:
    if arr is not None and arr.dtype == np.bool_:
        arr = arr.view(np.uint8)  # raw 0/1 bytes: h5py's bool enum would convert on reading
    if arr is None:
        node = f.create_group(path, track_order=True)
    else:
        node = f.create_dataset(path, data=arr)
    node.attrs[_TYPE_ATTR] = type_json


def save_checkpoint(path, payload: dict, meta: dict) -> None:
    """Write ``checkpoint.h5`` atomically; :func:`load_checkpoint` returns it bit for bit.

    ``payload`` is a dict (or OrderedDict) nesting dicts with ``str`` or ``int`` keys, lists and
    tuples, with leaves: dense torch tensors of any dtype (stored from the CPU, ``requires_grad``
    kept), numpy arrays and scalars of bool/int/uint/float/complex dtype, ``int`` (any size),
    ``float``, ``bool``, ``complex``, ``str``, ``bytes``, ``bytearray`` and ``None``.  Lists and
    tuples of only floats, only ints or only bools are stored as one dataset.  ``meta`` goes to root
    attributes by the module's attribute convention; ``complete``, ``sha256``, ``format`` and
    ``format_version`` are reserved.  Raises ``TypeError``/``ValueError`` for anything that would
    not come back exactly (a dict subclass, a str key with '/', a string array), before writing.
    Tensors that share storage are stored separately; an OrderedDict's ``_metadata`` is dropped.
    """
    if type(payload) not in (dict, OrderedDict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    for key in meta:
        if key in _RESERVED_META:
            raise ValueError(f"meta key {key!r} is reserved ({', '.join(_RESERVED_META)})")
    encoded_meta = {k: _encode_attr(k, v) for k, v in meta.items()}
    records: list = []
    _encode(payload, _PAYLOAD, records, {})
    digest = _digest(records, {k: _decode_attr(v) for k, v in encoded_meta.items()})

    def write(tmp):
        with h5py.File(tmp, "w", track_order=True, userblock_size=_HEADER_SIZE) as f:
            for path_, tj, arr in records:
                _write_record(f, path_, tj, arr)
            for k, v in encoded_meta.items():
                f.attrs[k] = v
            f.attrs["format"] = _CHECKPOINT_FORMAT
            f.attrs["format_version"] = _CHECKPOINT_VERSION
            f.attrs["sha256"] = digest
            f.flush()
            f.attrs["complete"] = True  # last
        _seal(tmp)

    _atomic_write(path, write)


def _file_digest(fh, start: int) -> tuple:
    h, size = hashlib.sha256(), 0
    fh.seek(start)
    while chunk := fh.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def _seal(path) -> None:
    """Write the header into the HDF5 user block: a SHA-256 of every byte after it."""
    with open(path, "r+b") as fh:
        digest, size = _file_digest(fh, _HEADER_SIZE)
        header = f"{_HEADER_MAGIC}\nsha256 {digest}\nsize {size}\n".encode("ascii")
        fh.seek(0)
        fh.write(header.ljust(_HEADER_SIZE, b"\x00"))
        fh.flush()


def _check_seal(path: str) -> None:
    """Verify the header before libhdf5 parses anything: a damaged HDF5 superblock or object
    header can crash the HDF5 library itself (seen as a glibc abort), not just raise."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(_HEADER_SIZE)
            if len(header) < _HEADER_SIZE:
                raise ResultsError(f"{path}: checkpoint is truncated: {len(header)} bytes, "
                                   f"shorter than its {_HEADER_SIZE}-byte header")
            m = _HEADER_RE.fullmatch(header)
            if m is None:
                raise ResultsError(f"{path}: not an apts_mpi checkpoint or a damaged one (no valid "
                                   f"{_HEADER_MAGIC!r} header in the first {_HEADER_SIZE} bytes)")
            digest, size = _file_digest(fh, _HEADER_SIZE)
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read checkpoint: {exc}") from exc
    if int(m["size"]) != size:
        raise ResultsError(f"{path}: checkpoint is truncated or extended: {size} bytes after the "
                           f"header, the header records {int(m['size'])}")
    if m["sha256"].decode() != digest:
        raise ResultsError(f"{path}: corrupt checkpoint: file SHA-256 digest {digest} does not "
                           f"match the header's {m['sha256'].decode()}")


class _Corrupt(Exception):
    pass


def _read_array(ds: h5py.Dataset) -> np.ndarray:
    return np.array(ds[()])


def _decode_leaf(info: dict, arr: np.ndarray, node: str):
    kind = info["kind"]
    if kind == "tensor":
        dtype = _torch_dtype(info["dtype"])
        shape = tuple(info["shape"])
        if info.get("raw"):
            t = torch.from_numpy(arr.astype(np.uint8, copy=False).reshape(-1)).view(dtype)
        else:
            if dtype == torch.bool and arr.dtype == np.uint8:
                arr = arr.view(np.bool_)
            t = torch.from_numpy(arr)
            if t.dtype != dtype:
                raise _Corrupt(f"{node}: tensor dtype {t.dtype} read, {dtype} recorded")
        t = t.reshape(shape)
        if info.get("requires_grad"):
            t.requires_grad_(True)
        return t
    if kind in ("ndarray", "numpy_scalar"):
        dtype = np.dtype(info["dtype"])
        if dtype == np.bool_ and arr.dtype == np.uint8:
            arr = arr.view(np.bool_)
        if arr.dtype != dtype:
            if arr.dtype.kind != dtype.kind or arr.dtype.itemsize != dtype.itemsize:
                raise _Corrupt(f"{node}: array dtype {arr.dtype} read, {dtype} recorded")
            arr = arr.astype(dtype)
        if kind == "numpy_scalar":
            return arr[()]
        if list(arr.shape) != info["shape"]:
            raise _Corrupt(f"{node}: array shape {arr.shape} read, {info['shape']} recorded")
        return arr
    if kind == "none":
        return None
    if kind == "bool":
        return bool(arr[()])
    if kind == "int":
        return int(arr[()])
    if kind == "bigint":
        return int(arr.tobytes().decode("ascii"))
    if kind == "float":
        return float(arr[()])
    if kind == "complex":
        return complex(arr[()])
    if kind == "str":
        return arr.tobytes().decode("utf-8", "surrogatepass")
    if kind == "bytes":
        return arr.tobytes()
    if kind == "bytearray":
        return bytearray(arr.tobytes())
    m = re.fullmatch(r"(list|tuple)\[(int|float|bool)\]", kind)
    if m:
        items = [{"int": int, "float": float, "bool": bool}[m.group(2)](x) for x in arr.tolist()]
        return items if m.group(1) == "list" else tuple(items)
    raise _Corrupt(f"{node}: unknown kind {kind!r}")


def _read_tree(obj, records: list):
    """Read the node at ``obj`` and below as ``(name, type JSON, array or children)`` without
    decoding; append its records for the digest.  Children are ``[(key, subtree)]`` in order."""
    tj = obj.attrs.get(_TYPE_ATTR)
    if tj is None:
        raise _Corrupt(f"{obj.name}: node has no {_TYPE_ATTR} attribute")
    tj = tj.decode() if isinstance(tj, bytes) else str(tj)
    if isinstance(obj, h5py.Dataset):
        arr = _read_array(obj)
        records.append((obj.name, tj, arr))
        return obj.name, tj, arr
    records.append((obj.name, tj, None))
    return obj.name, tj, [(name, _read_tree(child, records)) for name, child in obj.items()]


def _build(tree):
    """Decode a tree from :func:`_read_tree` (after its digest was checked) into the payload."""
    name, tj, content = tree
    info = json.loads(tj)
    kind = info["kind"]
    if isinstance(content, np.ndarray):
        return _decode_leaf(info, content, name)
    if kind in ("dict", "ordered_dict"):
        out = OrderedDict() if kind == "ordered_dict" else {}
        for key, sub in content:
            is_int = json.loads(sub[1]).get("key") == "int"
            out[int(key) if is_int else key] = _build(sub)
        return out
    if kind in ("list", "tuple"):
        if [key for key, _ in content] != [str(i) for i in range(len(content))]:
            raise _Corrupt(f"{name}: {kind} items are not numbered 0..{len(content) - 1}")
        items = [_build(sub) for _, sub in content]
        return items if kind == "list" else tuple(items)
    raise _Corrupt(f"{name}: unknown group kind {kind!r}")


def load_checkpoint(path, expect: dict | None = None):
    """Read ``checkpoint.h5`` -> ``(payload, meta)`` after checking it end to end.

    Checks, in order: the user-block header is intact and the size and SHA-256 of the rest of the
    file match it (before HDF5 reads a byte); the file opens as HDF5, is a checkpoint of this
    format and has ``complete`` set; the SHA-256 over all nodes and meta matches the ``sha256``
    attribute; every node decodes to its recorded type; each ``expect[key]`` equals
    ``meta[key]``.  Any failure raises ``ResultsError`` naming the file and
    the problem (for ``expect``, the key and both values).  Tensors come back on the CPU.
    """
    path = os.fspath(path)
    _check_seal(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
            if attrs.get("format") != _CHECKPOINT_FORMAT:
                raise ResultsError(f"{path}: not an apts_mpi checkpoint "
                                   f"(format attribute {attrs.get('format')!r})")
            if attrs.get("format_version") != _CHECKPOINT_VERSION:
                raise ResultsError(f"{path}: checkpoint format_version "
                                   f"{attrs.get('format_version')!r}, "
                                   f"expected {_CHECKPOINT_VERSION}")
            if attrs.get("complete") is not True:
                raise ResultsError(f"{path}: checkpoint is partial: attribute 'complete' is "
                                   f"{attrs.get('complete', 'missing')!r}, expected True")
            if _PAYLOAD not in f:
                raise ResultsError(f"{path}: checkpoint has no {_PAYLOAD} group")
            records: list = []
            tree = _read_tree(f[_PAYLOAD], records)
        meta = {k: v for k, v in attrs.items() if k not in _RESERVED_META}
        digest = _digest(records, meta)
        if digest != attrs.get("sha256"):
            raise ResultsError(f"{path}: corrupt checkpoint: SHA-256 digest {digest} does not "
                               f"match the stored {attrs.get('sha256')!r}")
        payload = _build(tree)
    except ResultsError:
        raise
    except _Corrupt as exc:
        raise ResultsError(f"{path}: corrupt checkpoint: {exc}") from exc
    except Exception as exc:  # h5py reports damaged files through many exception types
        raise ResultsError(f"{path}: cannot read checkpoint: {type(exc).__name__}: {exc}") from exc
    for key, want in (expect or {}).items():
        if key not in meta:
            raise ResultsError(f"{path}: checkpoint meta has no key {key!r} (expected {want!r})")
        if meta[key] != want:
            raise ResultsError(f"{path}: checkpoint meta {key!r} is {meta[key]!r}, "
                               f"expected {want!r}")
    return payload, meta


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

_SUMMARY_KEYS = ("epochs", "final_test_acc", "best_test_acc", "final_loss", "seconds",
                 "loss_evals", "grad_evals", "accepted", "rejected", "nonfinite")


def _metrics_path(run_dir) -> Path:
    p = Path(run_dir)
    return p if p.is_file() else p / METRICS_FILE


def _run_name(run_dir) -> str:
    p = Path(run_dir)
    return (p.parent if p.is_file() else p).resolve().name


def _accuracy_percent(acc: np.ndarray) -> np.ndarray:
    acc = np.asarray(acc, dtype=np.float64)
    finite = acc[np.isfinite(acc)]
    return acc if finite.size and finite.max() > 1.0 else 100.0 * acc


def _without_seed(value):
    if isinstance(value, dict):
        return {k: _without_seed(v) for k, v in value.items() if k != "seed"}
    if isinstance(value, list):
        return [_without_seed(v) for v in value]
    return value


def _run_values(epochs: dict) -> dict:
    def last(name):
        s = epochs.get(name)
        return float(s[-1]) if s is not None and len(s) else None

    acc = epochs.get("test_accuracy")
    acc = _accuracy_percent(acc) if acc is not None and len(acc) else None
    best = None
    if acc is not None:
        best = float(np.nanmax(acc)) if np.isfinite(acc).any() else float("nan")
    return {"epochs": last("epoch"),
            "final_test_acc": None if acc is None else float(acc[-1]),
            "best_test_acc": best, "final_loss": last("loss"), "seconds": last("seconds"),
            "loss_evals": last("loss_evals"), "grad_evals": last("grad_evals"),
            "accepted": last("accepted"), "rejected": last("rejected"),
            "nonfinite": last("nonfinite")}


def _short_name(names: list) -> str:
    stripped = [re.sub(r"(?i)[_\-.]?seed[_\-=]?\d+", "", n) or n for n in names]
    if len(set(stripped)) == 1:
        return stripped[0]
    return os.path.commonprefix(stripped).rstrip("_-. ") or stripped[0]


def summarize_runs(run_dirs: list) -> list:
    """Group runs that differ only in seed and summarise each group; the numbers behind the table.

    The group key is the run's ``method``, ``subdomains``, ``world_size``, ``device`` and
    ``config`` with every key named ``seed`` removed at any depth; a run without ``config`` is a
    group of its own.  Returns one dict per group in order of first appearance: ``label``,
    ``runs`` (paths), ``seeds``, ``n``, ``values`` (per summary key, the per-run values present),
    ``mean`` and ``std`` (sample standard deviation, ``ddof=1``; NaN for one run; ``None`` when no
    run has the series).  Summary keys: epochs, final_test_acc and best_test_acc (percent),
    final_loss, seconds, loss_evals, grad_evals, accepted, rejected (last values).
    """
    groups: dict = {}
    for run_dir in run_dirs:
        _, epochs, attrs = read_metrics(_metrics_path(run_dir))
        config = attrs.get("config")
        if isinstance(config, str):
            with contextlib.suppress(ValueError):
                config = json.loads(config)
        if config is None:
            key = json.dumps({"run": str(Path(run_dir).resolve())})
        else:
            key = json.dumps({"config": _without_seed(config), "method": attrs.get("method"),
                              "subdomains": attrs.get("subdomains"),
                              "world_size": attrs.get("world_size"),
                              "device": attrs.get("device")}, sort_keys=True, default=str)
        g = groups.setdefault(key, {"key": key, "runs": [], "seeds": [], "names": [], "per_run": [],
                                    "method": attrs.get("method"),
                                    "subdomains": attrs.get("subdomains")})
        g["runs"].append(str(run_dir))
        g["seeds"].append(attrs.get("seed"))
        g["names"].append(_run_name(run_dir))
        g["per_run"].append(_run_values(epochs))

    rows = []
    for g in groups.values():
        method = g["method"] if g["method"] is not None else "?"
        n_sub = f" N={g['subdomains']}" if g["subdomains"] is not None else ""
        row = {"label": f"{method}{n_sub} {_short_name(g['names'])}", "key": g["key"],
               "runs": g["runs"], "seeds": g["seeds"], "n": len(g["runs"]),
               "values": {}, "mean": {}, "std": {}}
        for name in _SUMMARY_KEYS:
            vals = np.array([r[name] for r in g["per_run"] if r[name] is not None], dtype=float)
            row["values"][name] = vals
            if vals.size == 0:
                row["mean"][name] = row["std"][name] = None
            else:
                row["mean"][name] = float(np.mean(vals))
                row["std"][name] = float(np.std(vals, ddof=1)) if vals.size > 1 else float("nan")
        rows.append(row)
    labels = [r["label"] for r in rows]
    for r in rows:
        if labels.count(r["label"]) > 1:
            r["label"] += f" [{hashlib.sha256(r['key'].encode()).hexdigest()[:6]}]"
    return rows


def _fmt(row: dict, name: str, spec: str) -> str:
    mean, std = row["mean"][name], row["std"][name]
    if mean is None:
        return ""
    if row["values"][name].size < 2 or math.isnan(std):
        return format(mean, spec)
    return f"{format(mean, spec)} +- {format(std, spec)}"


def report_table(run_dirs: list) -> str:
    """A plain-text table, one row per group of runs differing only in seed (see summarize_runs).

    Columns: run (method, N, short folder name), seeds, epochs, final and best test accuracy %,
    final loss, wall time s, loss/grad evals, accepted/rejected, rejections of a non-finite trial
    (``nonfinite``); a group of several seeds shows
    ``mean +- std``.  A missing series leaves its cell blank ('-' for half of a pair cell).
    Raises ``ResultsError`` for an unreadable metrics file.
    """
    header = ["run", "seeds", "epochs", "final test acc %", "best test acc %", "final loss",
              "wall time s", "loss/grad evals", "accepted/rejected", "non-finite"]
    table = [header]
    for row in summarize_runs(run_dirs):
        ep = row["values"]["epochs"]
        if ep.size and np.all(ep == ep[0]):
            epochs = format(ep[0], "g")
        else:
            epochs = _fmt(row, "epochs", ".1f")

        def pair(a, b):
            x, y = _fmt(row, a, ".0f"), _fmt(row, b, ".0f")
            return f"{x or '-'} / {y or '-'}" if (x or y) else ""

        table.append([row["label"], str(row["n"]), epochs,
                      _fmt(row, "final_test_acc", ".2f"), _fmt(row, "best_test_acc", ".2f"),
                      _fmt(row, "final_loss", ".4g"), _fmt(row, "seconds", ".1f"),
                      pair("loss_evals", "grad_evals"), pair("accepted", "rejected"),
                      _fmt(row, "nonfinite", ".0f")])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in table[1:]]) + "\n"


# --------------------------------------------------------------------------------------------
# Figure
# --------------------------------------------------------------------------------------------

def plot_runs(run_dirs: list, out) -> None:
    """Plot every run (not grouped) into a 2x2 figure written atomically to ``out``.

    Panels: test accuracy % vs epoch, loss vs epoch (log y), test accuracy % vs seconds, loss vs
    seconds; one line per run labelled method, N, seed and folder, one legend for the figure.
    The format follows ``out``'s extension (png, pdf, or any other matplotlib writes); uses the
    Agg canvas without touching pyplot's global backend.  Raises ``ValueError`` for no runs or an
    unknown extension, ``ResultsError`` for an unreadable metrics file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not run_dirs:
        raise ValueError("plot_runs: no runs to plot")
    out = os.fspath(out)
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    fig = Figure(figsize=(13, 8), dpi=100)
    canvas = FigureCanvasAgg(fig)
    if fmt not in canvas.get_supported_filetypes():
        raise ValueError(f"{out}: unsupported figure format {fmt!r}; "
                         f"use one of {sorted(canvas.get_supported_filetypes())}")
    axes = fig.subplots(2, 2)
    (ax_acc_e, ax_loss_e), (ax_acc_s, ax_loss_s) = axes
    handles = {}
    for i, run_dir in enumerate(run_dirs):
        _, ep, attrs = read_metrics(_metrics_path(run_dir))
        parts = [str(attrs.get("method", "?"))]
        if attrs.get("subdomains") is not None:
            parts.append(f"N={attrs['subdomains']}")
        if attrs.get("seed") is not None:
            parts.append(f"seed={attrs['seed']}")
        parts.append(_run_name(run_dir))
        label = " ".join(parts)
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4],
                 "marker": ".", "markersize": 4, "label": label}
        n = max((len(v) for v in ep.values()), default=0)
        epoch = ep.get("epoch", np.arange(n))
        seconds = ep.get("seconds")
        acc = ep.get("test_accuracy")
        acc = _accuracy_percent(acc) if acc is not None else None
        loss = ep.get("loss")
        for ax, x, y in ((ax_acc_e, epoch, acc), (ax_loss_e, epoch, loss),
                         (ax_acc_s, seconds, acc), (ax_loss_s, seconds, loss)):
            if x is not None and y is not None and len(y):
                (h,) = ax.plot(x, y, **style)
                handles.setdefault(label, h)
    for ax, ylabel, xlabel in ((ax_acc_e, "test accuracy %", "epoch"),
                               (ax_loss_e, "loss", "epoch"),
                               (ax_acc_s, "test accuracy %", "wall time s"),
                               (ax_loss_s, "loss", "wall time s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in (ax_acc_e, ax_loss_e):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss_e, ax_loss_s):
        if any(np.any(np.asarray(line.get_ydata(), dtype=float) > 0) for line in ax.lines):
            ax.set_yscale("log")
    fig.subplots_adjust(left=0.06, right=0.74, bottom=0.07, top=0.97, wspace=0.25, hspace=0.25)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left",
                   bbox_to_anchor=(0.755, 0.5), fontsize="small", frameon=False)

    def write(tmp):
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt)
            fh.flush()

    _atomic_write(out, write)
