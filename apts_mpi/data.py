"""Data sets and the overlapping minibatch sampler (method notes, section 5).

Every data set is loaded whole into memory as torch tensors: ``float32`` inputs of shape
``(n, *input_shape)``, already normalised, and ``int64`` class labels.  The files are read in their
standard on-disk formats, with nothing but numpy and the standard library:

==================  ======================================  ===================================
name                files looked for                        normalisation of ``x / 255``
==================  ======================================  ===================================
``digits``          scikit-learn's bundled ``load_digits``  ``x / 16``, then train mean / std
``mnist``           ``ROOT/MNIST/raw/*-ubyte[.gz]``         mean 0.1307, std 0.3081
``fashion-mnist``   ``ROOT/FashionMNIST/raw/*-ubyte[.gz]``  mean 0.2860, std 0.3530
``cifar10``         ``ROOT/cifar-10-batches-py/*_batch*``   per channel, see ``CIFAR10_MEAN``
==================  ======================================  ===================================

``ROOT`` is :func:`data_root`.  A missing, truncated or malformed file raises :class:`DataError`
naming the file, the folder, and what is wrong.  ``download=True`` fetches missing files from the
usual public mirrors (``SOURCES``) over ``urllib`` and verifies their MD5 before they are kept.

:class:`MinibatchSampler` draws the minibatches of an epoch from a permutation seeded by
``(seed, epoch)``; consecutive minibatches share a fraction ``overlap`` of their samples (the
authors used 5% on MNIST and 1% on CIFAR-10), and its state round-trips so that a resumed run sees
the identical minibatch sequence.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "DataError", "Dataset", "data_root", "load_dataset", "download_dataset", "DATASETS",
    "SOURCES", "MinibatchSampler", "read_idx",
]

DATASETS = {
    "digits": "scikit-learn's 8x8 handwritten digits, 1437 train / 360 test, no download",
    "mnist": "MNIST, 60000 train / 10000 test 28x28 grey images (IDX files)",
    "fashion-mnist": "Fashion-MNIST, 60000 train / 10000 test 28x28 grey images (IDX files)",
    "cifar10": "CIFAR-10, 50000 train / 10000 test 32x32 colour images (python batches)",
}

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

# Standard IDX file names (without ``.gz``) of the MNIST-like sets, per split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_NORMALISATION = {
    "mnist": (MNIST_MEAN, MNIST_STD),
    "fashion-mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
}

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"

_MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

# Public mirrors and the MD5 of the file as published (the compressed file, not its contents).
# ``SOURCES[name]`` maps the file name saved in the data set's folder to ``(url, md5)``; for
# CIFAR-10 the one entry is the archive, saved in ROOT and extracted there.
SOURCES: dict[str, dict[str, tuple[str, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (_MNIST_MIRROR + "train-images-idx3-ubyte.gz",
                                       "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        "train-labels-idx1-ubyte.gz": (_MNIST_MIRROR + "train-labels-idx1-ubyte.gz",
                                       "d53e105ee54ea40749a09fcbcd1e9432"),
        "t10k-images-idx3-ubyte.gz": (_MNIST_MIRROR + "t10k-images-idx3-ubyte.gz",
                                      "9fb629c4189551a2d022fa330f9573f3"),
        "t10k-labels-idx1-ubyte.gz": (_MNIST_MIRROR + "t10k-labels-idx1-ubyte.gz",
                                      "ec29112dd5afa0611ce80d1b7f02629c"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (_FASHION_MIRROR + "train-images-idx3-ubyte.gz",
                                       "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        "train-labels-idx1-ubyte.gz": (_FASHION_MIRROR + "train-labels-idx1-ubyte.gz",
                                       "25c81989df183df01b3e8a0aad5dffbe"),
        "t10k-images-idx3-ubyte.gz": (_FASHION_MIRROR + "t10k-images-idx3-ubyte.gz",
                                      "bef4ecab320f06d8554ea6380940ec79"),
        "t10k-labels-idx1-ubyte.gz": (_FASHION_MIRROR + "t10k-labels-idx1-ubyte.gz",
                                      "bb300cfdad3c16e7a12a480ee83cd310"),
    },
    "cifar10": {
        CIFAR10_ARCHIVE: ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          "c58f30108f718f92721af3b95e74349a"),
    },
}

_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class DataError(InputError):
    """A data file is missing, truncated or malformed, or the data set name is unknown."""


@dataclass
class Dataset:
    """One data set in memory: normalised ``float32`` inputs ``(n, *input_shape)``, ``int64``
    labels in ``[0, classes)``."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple
    classes: int


def data_root(root=None) -> Path:
    """The data folder: ``root`` if given, else the environment variable ``APTS_DATA``, else
    ``./data`` (relative to the current directory)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("APTS_DATA")
    if env:
        return Path(env).expanduser()
    return Path("data")


def load_dataset(name: str, root=None, download: bool = False,
                 sources: Mapping[str, tuple[str, str]] | None = None) -> Dataset:
    """Load the data set ``name`` (one of ``DATASETS``) from :func:`data_root` ``(root)``.

    ``download=True`` first fetches the files that are missing (never those present) from
    ``sources``, a mapping ``file name -> (url, md5)`` that defaults to ``SOURCES[name]``.
    Raises :class:`DataError` for an unknown name and for a missing, truncated or malformed file.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if name == "digits":
        return _load_digits()
    base = data_root(root)
    if download:
        download_dataset(name, base, sources=sources)
    if name == "cifar10":
        return _load_cifar10(base)
    return _load_idx_dataset(name, base)


# ---------------------------------------------------------------------------------------------
# digits (scikit-learn)

def _load_digits() -> Dataset:
    """1797 8x8 digits, split 1437 / 360 stratified with a fixed seed; pixels 0..16 are scaled to
    [0, 1], then standardised with the scalar mean and std of the training pixels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y)
    mean, std = train_x.mean(), train_x.std()

    def prepare(a):
        return torch.from_numpy(((a - mean) / std).astype(np.float32).reshape(-1, 1, 8, 8))

    return Dataset("digits", prepare(train_x), torch.from_numpy(train_y),
                   prepare(test_x), torch.from_numpy(test_y), (1, 8, 8), 10)


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX files)

def read_idx(path, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain, or gzip if the name ends in ``.gz``).

    Format: a big-endian ``uint32`` magic number ``0x000008DD`` (``DD`` = number of dimensions),
    ``DD`` big-endian ``uint32`` sizes, then the ``prod(sizes)`` bytes of the array in C order.
    Raises :class:`DataError` for a magic number other than ``magic``, a zero size, or a payload
    shorter (truncated) or longer than the header announces.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e} (truncated or corrupt file?)") from e
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, no IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"bad IDX magic number 0x{found:08x} in {path} (expected 0x{magic:08x})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, the IDX header needs {header}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if any(d == 0 for d in shape):
        raise DataError(f"{path} has an empty dimension in its IDX header: shape {shape}")
    payload = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header < payload:
        raise DataError(f"{path} is truncated: header announces shape {shape} = {payload} bytes, "
                        f"file holds {len(raw) - header}")
    if len(raw) - header > payload:
        raise DataError(f"{path} is malformed: {len(raw) - header - payload} bytes after the "
                        f"{payload} announced by its header (shape {shape})")
    # copy: frombuffer over bytes is read-only, and torch tensors need a writable array
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_file(folder: Path, name: str, dataset: str) -> Path:
    """``folder/name`` or else ``folder/name.gz``; DataError naming both if neither exists."""
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"missing {name} (or {name}.gz) for {dataset!r} in {folder}: put the standard files "
        f"there (or set root= / APTS_DATA to the folder that holds them), or pass download=True")


def _load_idx_split(name: str, folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_name, labels_name = IDX_FILES[split]
    images_path = _find_file(folder, images_name, name)
    labels_path = _find_file(folder, labels_name, name)
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds images of size {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images in {images_path} but {len(labels)} labels in "
                        f"{labels_path}")
    if labels.max() > 9:
        raise DataError(f"{labels_path} has label {int(labels.max())} outside 0..9")
    mean, std = _IDX_NORMALISATION[name]
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x.unsqueeze_(1), torch.from_numpy(labels.astype(np.int64))


def _load_idx_dataset(name: str, root: Path) -> Dataset:
    folder = root / _IDX_FOLDERS[name] / "raw"
    train_x, train_y = _load_idx_split(name, folder, "train")
    test_x, test_y = _load_idx_split(name, folder, "test")
    return Dataset(name, train_x, train_y, test_x, test_y, (1, 28, 28), 10)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a data file cannot run code."""

    # what pickles of uint8 arrays and bytes refer to: Python 2 (the published CIFAR-10 files),
    # Python 3 protocol 2 (bytes as _codecs.encode) and protocol 5 (numpy's _frombuffer)
    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed numpy.core
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: a pickled dict with ``b"data"`` uint8 (n, 3072), rows holding the red,
    green then blue 32x32 planes, and ``b"labels"``, n ints in 0..9."""
    if not path.is_file():
        raise DataError(
            f"missing {path.name} for 'cifar10' in {path.parent}: put the standard CIFAR-10 "
            f"python batches there (extract {CIFAR10_ARCHIVE} in {path.parent.parent}), or pass "
            f"download=True")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a truncated or foreign file
        raise DataError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, expected a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} lacks the keys b'data' and b'labels' (has {sorted(batch)})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 (n, 3072)")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but labels of shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path} has labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data, labels.astype(np.int64)


def _load_cifar_split(folder: Path, files) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [_read_cifar_batch(folder / f) for f in files]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(data).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x, torch.from_numpy(labels)


def _load_cifar10(root: Path) -> Dataset:
    folder = root / CIFAR10_FOLDER
    train_x, train_y = _load_cifar_split(folder, CIFAR10_TRAIN_FILES)
    test_x, test_y = _load_cifar_split(folder, CIFAR10_TEST_FILES)
    return Dataset("cifar10", train_x, train_y, test_x, test_y, (3, 32, 32), 10)


# ---------------------------------------------------------------------------------------------
# download (opt-in)

def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, dest: Path, md5: str) -> Path:
    """Download ``url`` to a temporary file beside ``dest``; rename it to ``dest`` only once its
    MD5 equals ``md5``.  On any failure the temporary file is deleted and DataError raised."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        log.info("downloading %s to %s", url, dest)
        with os.fdopen(fd, "wb") as out, \
                urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5.lower():
            raise DataError(f"checksum mismatch for {url}: MD5 {h.hexdigest()}, expected {md5}; "
                            f"{dest} was not written")
        os.replace(tmp, dest)
    except DataError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} to {dest.parent}: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _extract(archive: Path, into: Path) -> None:
    """Extract a tar archive, refusing members that would land outside ``into``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:  # Python < 3.11.4: check the member paths ourselves
                top = into.resolve()
                for member in tar.getmembers():
                    target = (into / member.name).resolve()
                    if top not in target.parents and target != top:
                        raise DataError(f"{archive} has a member outside {into}: {member.name}")
                    if not (member.isfile() or member.isdir()):
                        raise DataError(f"{archive} has a link or device member: {member.name}")
                tar.extractall(into)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot extract {archive} into {into}: {e}") from e


def download_dataset(name: str, root=None,
                     sources: Mapping[str, tuple[str, str]] | None = None) -> list[Path]:
    """Fetch the files of ``name`` that are missing under :func:`data_root` ``(root)``.

    ``sources`` maps each file name to ``(url, md5)`` and defaults to ``SOURCES[name]``.  A file
    already present (plain or ``.gz`` for the IDX sets) is neither fetched nor checked.  Returns
    the paths written.  Raises DataError for a failed download or a checksum mismatch (the partial
    file is deleted).
    """
    if name == "digits":
        return []
    if name not in SOURCES:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    sources = dict(SOURCES[name] if sources is None else sources)
    base = data_root(root)
    written = []
    if name == "cifar10":
        folder = base / CIFAR10_FOLDER
        if all((folder / f).is_file() for f in CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES):
            return []
        url, md5 = sources[CIFAR10_ARCHIVE]
        archive = base / CIFAR10_ARCHIVE
        if not (archive.is_file() and _md5(archive) == md5.lower()):
            written.append(_fetch(url, archive, md5))
        _extract(archive, base)
        written.append(folder)
        return written
    folder = base / _IDX_FOLDERS[name] / "raw"
    for file_name, (url, md5) in sources.items():
        plain = file_name[:-3] if file_name.endswith(".gz") else file_name
        if (folder / plain).is_file() or (folder / (plain + ".gz")).is_file():
            continue
        written.append(_fetch(url, folder / file_name, md5))
    return written


# ---------------------------------------------------------------------------------------------
# minibatches

class MinibatchSampler:
    """Minibatch indices per epoch, with a fraction ``overlap`` shared by consecutive minibatches.

    Epoch ``e`` takes a permutation ``p`` of ``range(n)`` from a ``torch.Generator`` seeded by
    ``(seed, e)`` alone, so any epoch can be regenerated on its own.  With ``s =
    round(overlap * batch_size)`` (Python's ``round``) and stride ``batch_size - s``, minibatch
    ``i`` is ``p[i * stride : i * stride + batch_size]``: the first ``s`` indices of minibatch
    ``i + 1`` are the last ``s`` of minibatch ``i``.  The epoch ends with the first minibatch that
    reaches the end of ``p``, which may be shorter than ``batch_size`` (it still holds at least
    one new sample), so every sample is visited at least once per epoch.  ``batch_size >= n``
    means full batch: one minibatch, ``arange(n)``, per epoch, and ``overlap`` is ignored.

    Iterating yields the remaining minibatches of the current epoch, then moves to the next epoch;
    ``state_dict()`` records ``(epoch, position)`` so that ``load_state_dict`` resumes the
    identical sequence.  Raises ValueError for ``n < 1``, ``batch_size < 1``, an overlap outside
    ``[0, 1)``, or one that rounds to the whole minibatch.
    """

    def __init__(self, n: int, batch_size: int, overlap: float = 0.0, seed: int = 0):
        if int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must satisfy 0 <= overlap < 1, got {overlap!r}")
        self.n, self.batch_size, self.overlap, self.seed = int(n), int(batch_size), overlap, seed
        self.full_batch = self.batch_size >= self.n
        self.shared = 0 if self.full_batch else round(overlap * self.batch_size)
        if self.shared >= self.batch_size:
            raise ValueError(f"overlap {overlap} of batch_size {batch_size} shares "
                             f"{self.shared} samples, leaving none new in each minibatch")
        self.stride = self.batch_size - self.shared
        if self.full_batch:
            self.batches_per_epoch = 1
        else:  # fewest m with (m - 1) * stride + batch_size >= n
            self.batches_per_epoch = 1 + -(-(self.n - self.batch_size) // self.stride)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _generator(self, epoch: int) -> torch.Generator:
        words = np.random.SeedSequence([int(self.seed), int(epoch)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed((int(words[0]) << 31) ^ int(words[1]))

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """All minibatches (int64 index tensors) of ``epoch``, independent of the sampler state."""
        if self.full_batch:
            return [torch.arange(self.n, dtype=torch.int64)]
        perm = torch.randperm(self.n, generator=self._generator(epoch), dtype=torch.int64)
        return [perm[i * self.stride: i * self.stride + self.batch_size]
                for i in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            i = self.position
            self.position += 1  # a checkpoint taken while batch i is in use resumes at i + 1
            yield batches[i]
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        """``epoch`` and ``position`` (next minibatch), plus the settings they refer to."""
        epoch, position = self.epoch, self.position
        if position >= self.batches_per_epoch:
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "n": self.n,
                "batch_size": self.batch_size, "overlap": self.overlap, "seed": self.seed}

    def load_state_dict(self, state: Mapping) -> None:
        """Resume at ``state["epoch"]``, minibatch ``state["position"]``; ValueError if the state
        came from a sampler with other settings or the position is out of range."""
        for key in ("n", "batch_size", "overlap", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler "
                                 f"{key}={getattr(self, key)!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"sampler state epoch={epoch}, position={position} out of range "
                             f"(0..{self.batches_per_epoch} minibatches per epoch)")
        self.epoch, self.position = epoch, position
