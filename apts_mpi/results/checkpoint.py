"""``checkpoint.h5``: a nested payload (model, optimiser and RNG states) that loads back bit for bit.

``/payload``: the nested payload, dicts as groups, every node tagged with its type.  Root
attributes: the caller's ``meta`` (attribute convention of :mod:`apts_mpi.results.files`), then
``format``, ``format_version``, ``sha256`` (over the payload and meta) and, written last,
``complete = True``.  The first 512 bytes are an HDF5 user block (HDF5 skips it) holding
``apts_mpi checkpoint v1``, the SHA-256 and the size of the rest of the file; it is checked before
libhdf5 parses anything, because a damaged HDF5 header can abort the process inside the HDF5
library instead of raising.  The file is written atomically by rank 0: the HDF5 image is built in
memory (no HDF5 library call touches the disk, so a full disk cannot leave HDF5 half-written or
print "Exception ignored" and go on), written with plain ``os.write`` calls (any error raises
:class:`~apts_mpi.results.files.WriteError`), fsync-ed, read back and verified (its SHA-256 and
every node's), and only then renamed over the previous checkpoint, which stays in place otherwise.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict

import h5py
import numpy as np
import torch

from .files import (INT64_MAX, INT64_MIN, ResultsError, WriteError, atomic_write, check_name,
                    decode_attr, encode_attr, hdf5_image, write_bytes)

__all__ = ["CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint"]

CHECKPOINT_FILE = "checkpoint.h5"

_CHECKPOINT_FORMAT = "apts_mpi.checkpoint"
_CHECKPOINT_VERSION = 1
_RESERVED_META = ("complete", "sha256", "format", "format_version")
_PAYLOAD = "/payload"
_TYPE_ATTR = "apts_type"
_HEADER_SIZE = 512  # the HDF5 user block: ignored by HDF5, holds the whole-file digest
_HEADER_MAGIC = "apts_mpi checkpoint v1"
_HEADER_RE = re.compile(rb"apts_mpi checkpoint v1\nsha256 (?P<sha256>[0-9a-f]{64})\n"
                        rb"size (?P<size>[0-9]{1,20})\n\x00*")
_NUMERIC_KINDS = "biufc"  # numpy dtype kinds HDF5 stores and gives back bit for bit

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
    if types == {int} and all(INT64_MIN <= e <= INT64_MAX for e in seq):
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
        if INT64_MIN <= value <= INT64_MAX:
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
                name, extra = check_name(k, path), {}
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
    encoded_meta = {k: encode_attr(k, v) for k, v in meta.items()}
    records: list = []
    _encode(payload, _PAYLOAD, records, {})
    digest = _digest(records, {k: decode_attr(v) for k, v in encoded_meta.items()})

    with hdf5_image(userblock_size=_HEADER_SIZE) as (f, image):
        for path_, tj, arr in records:
            _write_record(f, path_, tj, arr)
        for k, v in encoded_meta.items():
            f.attrs[k] = v
        f.attrs["format"] = _CHECKPOINT_FORMAT
        f.attrs["format_version"] = _CHECKPOINT_VERSION
        f.attrs["sha256"] = digest
        f.attrs["complete"] = True  # last
    body = image()
    file_digest = hashlib.sha256(body).hexdigest()
    header = f"{_HEADER_MAGIC}\nsha256 {file_digest}\nsize {len(body)}\n".encode("ascii")

    def verify(tmp):  # read back from the file system: the whole file's hash, then every node's
        try:
            if _check_seal(tmp) != file_digest:
                raise ResultsError("its SHA-256 differs from that of the bytes written")
            load_checkpoint(tmp)
        except ResultsError as exc:
            raise WriteError(f"{path}: the checkpoint read back is not the one written ({exc})") \
                from exc

    atomic_write(path, lambda tmp: write_bytes(tmp, header.ljust(_HEADER_SIZE, b"\x00"), body),
                 verify=verify)


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


def _check_seal(path: str) -> str:
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
    return digest


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
            attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
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
