"""apts_mpi.data: loaders on small files written in the real formats, the sampler, downloads."""
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from apts_mpi.data import (
    DataError, MinibatchSampler, data_root, download_dataset, load_dataset,
)

# the real MNIST, where the data folder the user named ($APTS_DATA, as for a run) holds it
REAL_DATA = os.environ.get("APTS_DATA")
REAL_MNIST = Path(REAL_DATA or "data").expanduser() / "MNIST" / "raw"

# the documented normalisations, restated here rather than imported
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616])


# ---------------------------------------------------------------------------------------------
# writers of the on-disk formats

def idx_bytes(array, magic=None):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x00000800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_file(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_idx_set(root, name="mnist", n_train=6, n_test=4, gz=True, seed=0):
    """Write the four IDX files of a tiny MNIST-like set; return the arrays written."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / FOLDER[name] / "raw"
    ext = ".gz" if gz else ""
    arrays = {}
    for split, n, prefix in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_file(folder / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(images))
        write_file(folder / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(labels))
        arrays[split] = (images, labels)
    return folder, arrays


def cifar_batch(n, rng, label_offset=0):
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = [int(v) for v in (np.arange(n) + label_offset) % 10]
    batch = {b"batch_label": b"testing batch", b"labels": labels,
             b"data": images.reshape(n, 3072), b"filenames": [b"img%d.png" % i for i in range(n)]}
    return batch, images, np.array(labels)


def make_cifar(folder, sizes=(2, 3, 2, 1, 2), n_test=3, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for i, n in enumerate(sizes, start=1):
        batch, images, labels = cifar_batch(n, rng, label_offset=i)
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
        train_images.append(images), train_labels.append(labels)
    batch, test_images, test_labels = cifar_batch(n_test, rng)
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    return (np.concatenate(train_images), np.concatenate(train_labels)), (test_images, test_labels)


def normalised(images, mean, std):
    return (images.astype(np.float64) / 255.0 - mean) / std


# ---------------------------------------------------------------------------------------------
# data_root

def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("APTS_DATA", raising=False)
    assert data_root() == Path("data")
    monkeypatch.setenv("APTS_DATA", str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root(str(tmp_path)) == tmp_path


def test_root_from_environment(monkeypatch, tmp_path):
    _, arrays = make_idx_set(tmp_path)
    monkeypatch.setenv("APTS_DATA", str(tmp_path))
    data = load_dataset("mnist")
    np.testing.assert_array_equal(data.train_y.numpy(), arrays["train"][1])


# ---------------------------------------------------------------------------------------------
# IDX sets

@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_round_trip(tmp_path, name, gz):
    _, arrays = make_idx_set(tmp_path, name, gz=gz)
    data = load_dataset(name, root=tmp_path)
    mean, std = NORMALISATION[name]
    assert data.name == name and data.input_shape == (1, 28, 28) and data.classes == 10
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        images, labels = arrays[split]
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(images), 1, 28, 28)
        np.testing.assert_allclose(x.numpy()[:, 0], normalised(images, mean, std), atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), labels)


def test_idx_mixed_plain_and_gz(tmp_path):
    folder, arrays = make_idx_set(tmp_path, gz=True)
    gz_file = folder / "train-images-idx3-ubyte.gz"
    (folder / "train-images-idx3-ubyte").write_bytes(gzip.decompress(gz_file.read_bytes()))
    gz_file.unlink()
    data = load_dataset("mnist", root=tmp_path)
    np.testing.assert_allclose(data.train_x.numpy()[:, 0],
                               normalised(arrays["train"][0], 0.1307, 0.3081), atol=1e-5)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_truncated_idx_file(tmp_path, gz):
    folder, _ = make_idx_set(tmp_path, gz=gz)
    path = folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)


def test_header_announcing_more_than_the_payload(tmp_path):
    folder, arrays = make_idx_set(tmp_path, gz=False)
    path = folder / "t10k-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">II", 0x801, 5) + arrays["test"][1].tobytes())  # 4 labels, says 5
    with pytest.raises(DataError, match="truncated.*5 bytes, file holds 4") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(err.value)


def test_bad_magic_number(tmp_path):
    folder, arrays = make_idx_set(tmp_path, gz=True)
    path = folder / "train-images-idx3-ubyte.gz"
    write_file(path, idx_bytes(arrays["train"][0], magic=0x00000804))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", root=tmp_path)
    assert str(err.value) == (f"bad IDX magic number 0x00000804 in {path} (expected 0x00000803)")


def test_labels_file_in_place_of_images(tmp_path):
    folder, arrays = make_idx_set(tmp_path, gz=False)
    write_file(folder / "train-images-idx3-ubyte", idx_bytes(arrays["train"][1]))
    with pytest.raises(DataError, match="bad IDX magic number 0x00000801"):
        load_dataset("mnist", root=tmp_path)


def test_mismatched_counts(tmp_path):
    folder, arrays = make_idx_set(tmp_path, gz=False)
    labels = np.append(arrays["test"][1], 3)
    write_file(folder / "t10k-labels-idx1-ubyte", idx_bytes(labels))
    with pytest.raises(DataError, match="4 images in .* but 5 labels in") as err:
        load_dataset("mnist", root=tmp_path)
    assert str(folder / "t10k-labels-idx1-ubyte") in str(err.value)


def test_label_out_of_range(tmp_path):
    folder, arrays = make_idx_set(tmp_path, gz=False)
    labels = arrays["train"][1].copy()
    labels[2] = 10
    write_file(folder / "train-labels-idx1-ubyte", idx_bytes(labels))
    with pytest.raises(DataError, match="label 10 outside 0..9"):
        load_dataset("mnist", root=tmp_path)


def test_wrong_image_size(tmp_path):
    folder, _ = make_idx_set(tmp_path, gz=False)
    write_file(folder / "train-images-idx3-ubyte", idx_bytes(np.zeros((6, 27, 28))))
    with pytest.raises(DataError, match=r"size \(27, 28\), expected \(28, 28\)"):
        load_dataset("mnist", root=tmp_path)


def test_missing_file_names_file_and_folder(tmp_path):
    folder, _ = make_idx_set(tmp_path, "fashion-mnist", gz=True)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("fashion-mnist", root=tmp_path)
    message = str(err.value)
    assert "t10k-images-idx3-ubyte" in message and str(folder) in message
    assert "download=True" in message


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte") as err:
        load_dataset("mnist", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in str(err.value)


def test_unknown_dataset():
    with pytest.raises(DataError, match="known data sets: digits, mnist, fashion-mnist, cifar10"):
        load_dataset("svhn")


# ---------------------------------------------------------------------------------------------
# CIFAR-10

@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_round_trip(tmp_path, protocol):
    (train_images, train_labels), (test_images, test_labels) = make_cifar(
        tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = load_dataset("cifar10", root=tmp_path)
    assert data.input_shape == (3, 32, 32) and data.classes == 10
    assert data.train_x.shape == (10, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    # channel c of the loaded image is row bytes [1024 c, 1024 (c + 1)), normalised per channel
    rows = train_images.reshape(10, 3072)
    for c in range(3):
        plane = rows[:, 1024 * c: 1024 * (c + 1)].reshape(10, 32, 32)
        np.testing.assert_allclose(data.train_x[:, c].numpy(),
                                   normalised(plane, CIFAR_MEAN[c], CIFAR_STD[c]), atol=1e-5)
    np.testing.assert_allclose(data.test_x.numpy(),
                               normalised(test_images, CIFAR_MEAN[:, None, None],
                                          CIFAR_STD[:, None, None]), atol=1e-5)
    np.testing.assert_array_equal(data.train_y.numpy(), train_labels)
    np.testing.assert_array_equal(data.test_y.numpy(), test_labels)


def test_cifar10_pure_colours_land_in_their_channel(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    red = np.zeros((1, 3072), dtype=np.uint8)
    red[0, :1024] = 255  # the first 1024 bytes of a row are the red plane
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": red, b"labels": [3]}))
    x = load_dataset("cifar10", root=tmp_path).test_x[0]
    expected = [(1 - CIFAR_MEAN[0]) / CIFAR_STD[0], -CIFAR_MEAN[1] / CIFAR_STD[1],
                -CIFAR_MEAN[2] / CIFAR_STD[2]]
    for c in range(3):
        assert torch.allclose(x[c], torch.tensor(expected[c], dtype=torch.float32), atol=1e-5)


def test_cifar10_malformed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    path = folder / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"expected uint8 \(n, 3072\)") as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(path) in str(err.value)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]}))
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_dataset("cifar10", root=tmp_path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(DataError, match="2 images but labels of shape"):
        load_dataset("cifar10", root=tmp_path)
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    path.write_bytes(good[:-30])
    with pytest.raises(DataError, match="cannot unpickle"):
        load_dataset("cifar10", root=tmp_path)
    path.unlink()
    with pytest.raises(DataError, match="missing data_batch_3") as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder) in str(err.value) and "download=True" in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar10_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    exploit = _Exploit()
    exploit.target = str(tmp_path / "pwned")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": exploit, b"labels": []}))
    with pytest.raises(DataError, match="not allowed"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------------------------------------
# digits

def test_digits_sizes_and_standardisation():
    from sklearn.datasets import load_digits

    data = load_dataset("digits")
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.train_y.shape == (1437,) and data.test_y.shape == (360,)
    assert data.input_shape == (1, 8, 8) and data.classes == 10
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    train = data.train_x.double()
    assert abs(train.mean().item()) < 1e-6 and abs(train.std(unbiased=False).item() - 1) < 1e-6
    # every class in the test set (stratified split)
    assert torch.bincount(data.test_y, minlength=10).min() >= 30
    # undo the affine map using the train extremes (pixel levels 0 and 16 both occur): the
    # recovered rows and labels are exactly scikit-learn's, as a multiset
    lo, hi = train.min(), train.max()
    levels = torch.cat([data.train_x, data.test_x]).double().sub(lo).div(hi - lo).mul(16)
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    ours = np.concatenate([levels.round().reshape(-1, 64).numpy(),
                           torch.cat([data.train_y, data.test_y]).numpy()[:, None]], axis=1)
    digits = load_digits()
    theirs = np.concatenate([digits.data, digits.target[:, None]], axis=1)
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))
    assert len(ours) == len(theirs) == 1797
    # deterministic
    again = load_dataset("digits")
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


# ---------------------------------------------------------------------------------------------
# sampler

@pytest.mark.parametrize("n,batch_size,overlap", [
    (103, 10, 0.0), (103, 10, 0.2), (100, 10, 0.05), (60, 20, 0.5), (7, 3, 0.34), (50, 49, 0.1),
])
def test_sampler_epoch_layout(n, batch_size, overlap):
    sampler = MinibatchSampler(n, batch_size, overlap=overlap, seed=3)
    shared = round(overlap * batch_size)
    for epoch in range(3):
        batches = list(sampler)
        assert len(batches) == sampler.batches_per_epoch == len(sampler)
        assert all(b.dtype == torch.int64 for b in batches)
        # every sample at least once
        assert torch.equal(torch.cat(batches).unique(), torch.arange(n))
        # full minibatches except possibly the last, which still brings a new sample
        assert all(len(b) == batch_size for b in batches[:-1])
        assert shared < len(batches[-1]) <= batch_size
        # consecutive minibatches share exactly their boundary `shared` indices, nothing else
        for a, b in zip(batches, batches[1:]):
            if shared:
                assert torch.equal(b[:shared], a[-shared:])
            assert len(set(a.tolist()) & set(b.tolist())) == shared
        # the epoch is a permutation read with stride batch_size - shared: no index repeats
        # other than the shared ones
        total = sum(len(b) for b in batches)
        assert total == n + shared * (len(batches) - 1)
        # one epoch fewer would not cover the set
        assert (len(batches) - 2) * (batch_size - shared) + batch_size < n


def test_sampler_authors_mnist_setting():
    sampler = MinibatchSampler(60000, 10000, overlap=0.05, seed=0)
    batches = sampler.epoch_batches(0)
    assert [len(b) for b in batches] == [10000] * 6 + [3000]
    assert all(torch.equal(b[:500], a[-500:]) for a, b in zip(batches, batches[1:]))


def test_sampler_full_batch():
    for batch_size in (50, 80):
        sampler = MinibatchSampler(50, batch_size, overlap=0.3, seed=1)
        assert sampler.batches_per_epoch == 1
        for _ in range(2):
            (batch,) = list(sampler)
            assert torch.equal(batch, torch.arange(50))


def test_sampler_deterministic_and_epochs_differ():
    a = MinibatchSampler(200, 32, overlap=0.1, seed=7)
    b = MinibatchSampler(200, 32, overlap=0.1, seed=7)
    c = MinibatchSampler(200, 32, overlap=0.1, seed=8)
    seq_a = [list(a) for _ in range(3)]
    seq_b = [list(b) for _ in range(3)]
    for ea, eb in zip(seq_a, seq_b):
        assert all(torch.equal(x, y) for x, y in zip(ea, eb))
    assert not torch.equal(seq_a[0][0], seq_a[1][0])
    assert not torch.equal(torch.cat(seq_a[0]), torch.cat(seq_a[1]))
    assert not torch.equal(torch.cat(seq_a[0]), torch.cat(list(c)))
    # any epoch regenerates on its own, independent of the sampler's state
    fresh = MinibatchSampler(200, 32, overlap=0.1, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(fresh.epoch_batches(2), seq_a[2]))
    assert fresh.epoch == 0


def test_sampler_global_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(MinibatchSampler(100, 10, seed=5))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("stop_after", [0, 1, 4, 5, 6, 13])
def test_sampler_resume(stop_after):
    # 5 minibatches per epoch (stride 9); stop after `stop_after` minibatches were handed out
    reference = MinibatchSampler(48, 12, overlap=0.25, seed=11)
    assert reference.batches_per_epoch == 5
    full = [batch for _ in range(4) for batch in reference]

    run = MinibatchSampler(48, 12, overlap=0.25, seed=11)
    seen, state = [], run.state_dict() if stop_after == 0 else None
    while state is None:
        for batch in run:
            seen.append(batch)
            if len(seen) == stop_after:
                state = run.state_dict()  # checkpoint taken while this batch is in use
                break
    state = pickle.loads(pickle.dumps(state))  # as through a checkpoint file
    resumed = MinibatchSampler(48, 12, overlap=0.25, seed=11)
    resumed.load_state_dict(state)
    remaining = []
    while len(seen) + len(remaining) < len(full):
        remaining.extend(resumed)
    sequence = seen + remaining
    assert len(sequence) == len(full)
    assert all(torch.equal(x, y) for x, y in zip(sequence, full))
    assert state["epoch"] == stop_after // 5 and state["position"] == stop_after % 5


def test_sampler_state_mismatch_and_validation():
    state = MinibatchSampler(50, 10, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        MinibatchSampler(50, 10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        MinibatchSampler(50, 10, seed=1).load_state_dict(dict(state, position=9))
    with pytest.raises(ValueError, match="0 <= overlap < 1"):
        MinibatchSampler(50, 10, overlap=1.0)
    with pytest.raises(ValueError, match="0 <= overlap < 1"):
        MinibatchSampler(50, 10, overlap=-0.1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        MinibatchSampler(50, 0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        MinibatchSampler(0, 10)
    with pytest.raises(ValueError, match="leaving none new"):
        MinibatchSampler(50, 1, overlap=0.9)


# ---------------------------------------------------------------------------------------------
# download, against a local HTTP server

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A folder served on 127.0.0.1; yields (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def md5(path):
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def served_idx_sources(served, base_url, name="mnist"):
    folder, arrays = make_idx_set(served / "src", name, gz=True, seed=4)
    sources = {}
    for path in sorted(folder.iterdir()):
        (served / path.name).write_bytes(path.read_bytes())
        sources[path.name] = (base_url + path.name, md5(path))
    return sources, arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_download_idx(http_root, tmp_path, name):
    served, base_url = http_root
    sources, arrays = served_idx_sources(served, base_url, name)
    root = tmp_path / "data"
    data = load_dataset(name, root=root, download=True, sources=sources)
    np.testing.assert_array_equal(data.test_y.numpy(), arrays["test"][1])
    mean, std = NORMALISATION[name]
    np.testing.assert_allclose(data.train_x.numpy()[:, 0],
                               normalised(arrays["train"][0], mean, std), atol=1e-5)
    folder = root / FOLDER[name] / "raw"
    assert sorted(p.name for p in folder.iterdir()) == sorted(sources)
    # present files are not fetched again (the server is not even asked)
    dead = {k: ("http://127.0.0.1:9/" + k, v[1]) for k, v in sources.items()}
    assert download_dataset(name, root, sources=dead) == []


def test_download_only_missing_files(http_root, tmp_path):
    served, base_url = http_root
    sources, _ = served_idx_sources(served, base_url)
    root = tmp_path / "data"
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    keep = "train-images-idx3-ubyte.gz"
    (folder / keep).write_bytes((served / keep).read_bytes())
    sources[keep] = ("http://127.0.0.1:9/unreachable", "0" * 32)
    written = download_dataset("mnist", root, sources=sources)
    assert sorted(p.name for p in written) == sorted(set(sources) - {keep})


def test_download_checksum_mismatch_leaves_nothing(http_root, tmp_path):
    served, base_url = http_root
    sources, _ = served_idx_sources(served, base_url)
    name = "t10k-labels-idx1-ubyte.gz"
    url, good = sources[name]
    root = tmp_path / "data"
    with pytest.raises(DataError, match=f"checksum mismatch for {url}.*expected {'0' * 32}"):
        download_dataset("mnist", root, sources={name: (url, "0" * 32)})
    folder = root / "MNIST" / "raw"
    assert list(folder.iterdir()) == []
    with pytest.raises(DataError, match="cannot download"):
        download_dataset("mnist", root, sources={name: (base_url + "absent.gz", good)})
    assert list(folder.iterdir()) == []


def test_download_from_file_url(tmp_path):
    folder, arrays = make_idx_set(tmp_path / "src", gz=True)
    sources = {p.name: (p.as_uri(), md5(p)) for p in folder.iterdir()}
    data = load_dataset("mnist", root=tmp_path / "data", download=True, sources=sources)
    np.testing.assert_array_equal(data.train_y.numpy(), arrays["train"][1])


def test_download_cifar10_archive(http_root, tmp_path):
    served, base_url = http_root
    (train_images, train_labels), _ = make_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    sources = {"cifar-10-python.tar.gz": (base_url + archive.name, md5(archive))}
    root = tmp_path / "data"
    data = load_dataset("cifar10", root=root, download=True, sources=sources)
    np.testing.assert_array_equal(data.train_y.numpy(), train_labels)
    assert data.train_x.shape == (len(train_images), 3, 32, 32)
    assert (root / "cifar-10-python.tar.gz").is_file()
    # an archive with a member outside the data folder is refused
    evil = served / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        payload = b"x"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(DataError, match="cannot extract|outside"):
        download_dataset("cifar10", tmp_path / "other",
                         sources={"cifar-10-python.tar.gz": (base_url + "evil.tar.gz", md5(evil))})
    assert not (tmp_path / "escaped").exists()


# ---------------------------------------------------------------------------------------------
# the real MNIST, where $APTS_DATA (else ./data) has it

@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no MNIST under $APTS_DATA/MNIST/raw (or ./data)")
def test_real_mnist():
    data = load_dataset("mnist", root=REAL_MNIST.parent.parent)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_y).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(data.test_y).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # with the standard constants the normalised training set has mean ~0 and std ~1
    assert abs(data.train_x.mean().item()) < 1e-2 and abs(data.train_x.std().item() - 1) < 1e-2
