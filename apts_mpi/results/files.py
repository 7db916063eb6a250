"""Files of a run folder: atomic replacement and the HDF5 attribute convention.

Every results file is written atomically (:func:`atomic_write`): built in memory
(:func:`hdf5_image`), written into ``.<name>.tmp-<pid>`` in the same folder with plain ``os.write``
(:func:`write_bytes`), ``os.fsync``-ed, read back and checked, ``os.replace``-d over the target,
then the folder is fsync-ed.  Any failure (a full disk included) raises :class:`WriteError`.  A crash at any moment leaves the old complete file or the new complete file,
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
import sys

import h5py
import numpy as np

__all__ = ["ResultsError", "WriteError", "atomic_write", "write_bytes", "hdf5_image",
           "remove_leftovers", "encode_attr", "decode_attr", "check_name", "INT64_MIN", "INT64_MAX"]

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
_JSON_MARKER = "json:"


class ResultsError(RuntimeError):
    """A results file is missing, corrupt, partial, or belongs to another run configuration."""


class WriteError(ResultsError):
    """A results file could not be written (a full disk, an I/O error, a read-back that differs);
    the file it was to replace is untouched."""


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


def atomic_write(path, write, verify=None) -> None:
    """Call ``write(tmp)`` to produce the complete file at ``tmp``, then make it ``path``.

    ``write`` must have closed (hence flushed) the file when it returns; the file is then fsync-ed
    and ``verify(tmp)``, if given, reads it back (raising to refuse it) before the rename.  On any
    exception the temporary file is removed and ``path`` is untouched; an ``OSError`` (a full
    disk, an I/O error) is raised as :class:`WriteError` naming ``path`` and the reason.
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
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def remove_leftovers(folder) -> list:
    """Remove the temporary files (``.<name>.tmp-<pid>``) that killed writers left in ``folder``;
    the file of a process still alive on this host, or of this process, stays.  Returns the
    paths removed."""
    removed = []
    for entry in sorted(os.listdir(folder)):
        head, sep, pid = entry.rpartition(".tmp-")
        if not (entry.startswith(".") and sep and head and pid.isdigit()):
            continue
        if int(pid) == os.getpid() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
    return removed


def write_bytes(path, *chunks) -> None:
    """Write ``chunks`` to a new file ``path`` with plain ``os.write`` calls: a full disk raises
    ``OSError`` here and now (not later, in a close nobody checks)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view:
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)


@contextlib.contextmanager
def hdf5_image(**kwargs):
    """``with hdf5_image() as (f, image):`` an HDF5 file ``f`` built in memory (the core driver
    without a backing store: nothing reaches the disk); after the block ``image()`` gives its
    bytes (without the user block, which the caller writes in front of them).

    An error that HDF5 reports only through a destructor (h5py prints "Exception ignored" and goes
    on) is made fatal: it is raised as :class:`WriteError` when the block ends."""
    ignored = []
    previous = sys.unraisablehook

    def hook(unraisable):
        if "h5py" in str(unraisable.object):
            ignored.append(unraisable.exc_value)
        else:
            previous(unraisable)

    result = []
    sys.unraisablehook = hook
    try:
        with h5py.File("apts_mpi-image", "w", driver="core", backing_store=False,
                       track_order=True, **kwargs) as f:
            yield f, lambda: result[0]
            f.flush()
            result.append(f.id.get_file_image())
    finally:
        sys.unraisablehook = previous
    if ignored:
        raise WriteError(f"HDF5 failed while building a results file: {ignored[0]}")


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
