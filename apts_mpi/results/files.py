"""Files of a run folder: atomic replacement and the HDF5 attribute convention.

Every results file is written atomically (:func:`atomic_write`): into ``.<name>.tmp-<pid>`` in the
same folder, closed (h5py flushes), ``os.fsync``-ed, ``os.replace``-d over the target, then the
folder is fsync-ed.  A crash at any moment leaves the old complete file or the new complete file,
and on any exception the temporary file is removed.

Attribute convention (metrics ``attrs`` and checkpoint ``meta``; :func:`encode_attr`,
:func:`decode_attr`)
-----------------------------------------------------------------------------------------------
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
"""
from __future__ import annotations

import contextlib
import errno
import json
import os

import numpy as np

__all__ = ["ResultsError", "atomic_write", "encode_attr", "decode_attr", "check_name",
           "INT64_MIN", "INT64_MAX"]

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_JSON_MARKER = "json:"


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


def atomic_write(path, write) -> None:
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


def encode_attr(key, value):
    if not isinstance(key, str) or not key:
        raise TypeError(f"attribute name {key!r} must be a non-empty str")
    if isinstance(value, np.generic) and not isinstance(value, (np.str_, np.bytes_, np.void)):
        value = value.item()
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and INT64_MIN <= value <= INT64_MAX:
        return np.int64(value)
    if isinstance(value, float):
        return np.float64(value)
    if isinstance(value, str) and not value.startswith(_JSON_MARKER) and "\x00" not in value:
        return str(value)
    value = _jsonable(value, f"attribute {key!r}")
    return _JSON_MARKER + json.dumps(value, separators=(",", ":"), allow_nan=True)


def decode_attr(value):
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


def check_name(name, where: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{where}: name {name!r} must be a str")
    if name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise ValueError(f"{where}: {name!r} is not a valid HDF5 name (empty, '.', '/' or NUL)")
    return name
