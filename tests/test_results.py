"""apts_mpi.results: exact round trips, corruption, meta checks, atomicity, report, figure."""
import math
import os
import random
import re
import shutil
import stat
import struct
from collections import OrderedDict

import h5py
import numpy as np
import pytest
import torch

from apts_mpi.results import checkpoint as checkpoint_module
from apts_mpi.results import metrics as metrics_module
from apts_mpi.results.files import WriteError
from apts_mpi.results import (ResultsError, format_table, load_checkpoint, plot_runs,
                              read_metrics, report_table, save_checkpoint, summarize_runs,
                              write_metrics)

# A quiet NaN with a payload, and the bit patterns that must survive untouched.
NAN_PAYLOAD = struct.unpack("<d", bytes.fromhex("2301000000 00f87f".replace(" ", "")))[0]
SPECIAL_F64 = [NAN_PAYLOAD, float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0,
               5e-324, 1.0]


def f64_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_identical(a, b, where="payload"):
    """Same structure, same types, bitwise-identical values."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.requires_grad == b.requires_grad, where
        assert a.device == b.device == torch.device("cpu"), where
        a_bits = a.detach().contiguous().reshape(-1).view(torch.uint8)
        b_bits = b.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(a_bits, b_bits), where
        if not (a.is_floating_point() or a.is_complex()) or not a.isnan().any():
            assert torch.equal(a.detach(), b.detach()), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert f64_bits(a) == f64_bits(b), where
    elif isinstance(a, complex):
        assert f64_bits(a.real) + f64_bits(a.imag) == f64_bits(b.real) + f64_bits(b.imag), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(next(kb for kb in b if kb == k)), f"{where}: key {k!r}"
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def every_leaf_payload():
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(SPECIAL_F64, dtype=torch.float64)
    return {
        "tensors": {
            "float32": torch.randn(3, 4, generator=g),
            "float64_special": special,
            "float16": torch.randn(5, generator=g).half(),
            "bfloat16": torch.randn(2, 3, generator=g).bfloat16(),
            "complex64": torch.randn(4, dtype=torch.complex64, generator=g),
            "bool": torch.tensor([True, False, True]),
            "int64": torch.tensor([-(2 ** 63), -1, 0, 2 ** 63 - 1]),
            "int8": torch.tensor([-128, 127], dtype=torch.int8),
            "uint8": torch.arange(256, dtype=torch.uint8),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
            "transposed": torch.arange(12.0).reshape(3, 4).t(),
            "requires_grad": torch.ones(2, requires_grad=True),
        },
        "rng": torch.get_rng_state(),
        "arrays": {
            "f64": np.array([[NAN_PAYLOAD, -0.0], [np.inf, 1.5]]),
            "i32": np.arange(6, dtype=np.int32).reshape(2, 3),
            "u16": np.array([0, 65535], dtype=np.uint16),
            "bool": np.array([True, False]),
            "c128": np.array([1 + 2j, -0.0 - 1j]),
            "big_endian": np.array([1.0, 2.0], dtype=">f8"),
            "empty": np.zeros((0, 2), dtype=np.float32),
            "scalar_np": np.float32(1.25),
            "int64_np": np.int64(-7),
        },
        "python": {
            "int": -42, "big_int": 2 ** 100 + 1, "neg_big_int": -(2 ** 64),
            "float": 0.1, "nan_payload": NAN_PAYLOAD, "neg_zero": -0.0, "inf": float("inf"),
            "true": True, "false": False, "complex": complex(1.5, -0.0),
            "str": "grüße ✓ \x00 end", "empty_str": "", "none": None,
            "bytes": b"\x00\xff raw", "empty_bytes": b"", "bytearray": bytearray(b"abc"),
        },
        "history": {  # quasi-Newton memory: lists of tensors and of numbers
            "s": [torch.randn(4, generator=g) for _ in range(3)],
            "y": [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3)],
            "rho": [0.5, float("inf"), NAN_PAYLOAD],
            "ids": [1, -2, 2 ** 62],
            "flags": [True, False],
            "mixed": [1, 1.0, True, None, "x", torch.zeros(1)],
            "empty": [],
            "pair": (0.9, 0.999),
            "nested": [[1.0], {"a": 1}],
        },
        7: {"int_key": 1, "3": "str key"},
        "ordered": OrderedDict([("z", 1), ("a", 2)]),
        "empty_dict": {},
    }


# ----------------------------------------------------------------------------------------------
# metrics


def test_metrics_round_trip(tmp_path):
    path = tmp_path / "metrics.h5"
    iterations = {"loss": np.array(SPECIAL_F64), "radius": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                  "step": np.arange(8, dtype=np.int32), "accepted": np.array([True] * 8)}
    epochs = {"epoch": [1, 2], "loss": np.array([0.5, 0.25], dtype=np.float32)}
    attrs = {"method": "apts", "subdomains": 4, "seed": 0, "lr": 1e-3, "nan": float("nan"),
             "flag": True, "np_float": np.float64(2.5), "np_int": np.int32(3),
             "config": {"model": {"widths": [32, 32]}, "seed": 0, "tol": None, "x": float("inf")},
             "list": [1, "a", None], "none": None, "huge": 2 ** 70,
             "looks_like_json": "json:{not json}", "nul": "a\x00b", "unicode": "Ω"}
    write_metrics(path, iterations, epochs, attrs)
    it, ep, at = read_metrics(path)

    assert list(it) == list(iterations) and list(ep) == list(epochs)
    assert it["loss"].dtype == np.float64
    assert it["loss"].tobytes() == np.array(SPECIAL_F64).tobytes()
    assert it["radius"].dtype == np.float64 and np.array_equal(it["radius"], iterations["radius"])
    assert it["step"].dtype == np.int64 and np.array_equal(it["step"], np.arange(8))
    assert it["accepted"].dtype == np.bool_ and it["accepted"].all()
    assert ep["epoch"].dtype == np.int64 and ep["loss"].dtype == np.float64
    assert np.array_equal(ep["loss"], [0.5, 0.25])

    expected = dict(attrs, np_float=2.5, np_int=3)
    assert list(at) == list(expected)
    for k, v in expected.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(at[k]) and type(at[k]) is float
        elif k == "config":
            assert at[k]["model"] == v["model"] and at[k]["tol"] is None
            assert at[k]["x"] == math.inf
        else:
            assert at[k] == v and type(at[k]) is type(v), k
    with h5py.File(path, "r") as f:  # the documented storage convention
        assert f.attrs["config"].startswith("json:") and f.attrs["method"] == "apts"
        assert f["epochs/loss"].dtype == np.float64


def test_metrics_rejects_bad_input(tmp_path):
    path = tmp_path / "metrics.h5"
    with pytest.raises(ValueError, match="lengths differ"):
        write_metrics(path, {"a": [1.0, 2.0], "b": [1.0]}, {}, {})
    with pytest.raises(ValueError, match="1-D"):
        write_metrics(path, {"a": np.zeros((2, 2))}, {}, {})
    with pytest.raises(TypeError, match="tuple"):
        write_metrics(path, {}, {}, {"config": {"betas": (0.9, 0.99)}})
    with pytest.raises(TypeError, match="key"):
        write_metrics(path, {}, {}, {"config": {1: "int key"}})
    assert list(tmp_path.iterdir()) == []


def test_read_metrics_missing_or_unreadable(tmp_path):
    missing = tmp_path / "nope" / "metrics.h5"
    with pytest.raises(ResultsError, match=str(missing)):
        read_metrics(missing)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(ResultsError, match=str(garbage)):
        read_metrics(garbage)
    no_groups = tmp_path / "other.h5"
    with h5py.File(no_groups, "w") as f:
        f["x"] = 1
    with pytest.raises(ResultsError, match="/iterations"):
        read_metrics(no_groups)


# ----------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_every_leaf(tmp_path):
    path = tmp_path / "checkpoint.h5"
    payload = every_leaf_payload()
    meta = {"config_hash": "0123abcd", "world_size": 4, "epoch": 3, "cfg": {"a": [1, 2]}}
    save_checkpoint(path, payload, meta)
    loaded, loaded_meta = load_checkpoint(path, expect={"config_hash": "0123abcd", "world_size": 4})
    assert_identical(payload, loaded)
    assert loaded_meta == meta
    # the NaN payload bits in the float64 tensor, checked on their own
    got = loaded["tensors"]["float64_special"]
    assert got.dtype == torch.float64
    assert [f64_bits(x) for x in got.tolist()] == [f64_bits(x) for x in SPECIAL_F64]
    want = payload["tensors"]["float64_special"]
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))


def test_checkpoint_rng_states_restore_the_streams(tmp_path):
    path = tmp_path / "checkpoint.h5"
    np_rng = np.random.default_rng(123)
    py_rng = random.Random(5)
    state = {"torch": torch.get_rng_state(), "numpy": np_rng.bit_generator.state,
             "python": py_rng.getstate()}
    expected = (torch.rand(5), np_rng.random(5), [py_rng.random() for _ in range(5)])
    save_checkpoint(path, state, {})
    loaded, _ = load_checkpoint(path)
    assert loaded["torch"].dtype == torch.uint8 and torch.equal(loaded["torch"], state["torch"])
    assert loaded["numpy"] == state["numpy"]  # nested dict with 128-bit ints
    torch.set_rng_state(loaded["torch"])
    np_rng.bit_generator.state = loaded["numpy"]
    py_rng.setstate(loaded["python"])
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np_rng.random(5), expected[1])
    assert [py_rng.random() for _ in range(5)] == expected[2]


def test_checkpoint_model_and_optimizer_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 3)).square().mean().backward()
    opt.step()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    save_checkpoint(tmp_path / "c.h5", payload, {})
    loaded, _ = load_checkpoint(tmp_path / "c.h5")
    assert_identical(payload, loaded)
    clone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    clone.load_state_dict(loaded["model"])
    opt2 = torch.optim.Adam(clone.parameters(), lr=1.0)
    opt2.load_state_dict(loaded["optimizer"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_checkpoint_rejects_what_would_not_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    with pytest.raises(TypeError, match="object"):
        save_checkpoint(path, {"a": object()}, {})
    with pytest.raises(ValueError, match="valid HDF5 name"):
        save_checkpoint(path, {"a/b": 1}, {})
    with pytest.raises(ValueError, match="share the name"):
        save_checkpoint(path, {"1": 1, 1: 2}, {})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(path, {}, {"complete": True})
    with pytest.raises(TypeError, match="dtype"):
        save_checkpoint(path, {"a": np.array(["text"])}, {})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "checkpoint.h5"
    save_checkpoint(path, every_leaf_payload(), {"config_hash": "abc", "world_size": 4})
    return path


def dataset_offsets(path):
    """File offsets and sizes of the raw data of every contiguous, non-empty dataset."""
    offsets = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_storage_size() > 0:
                offsets[name] = (obj.id.get_offset(), obj.id.get_storage_size())
        f.visititems(visit)
    return offsets


def test_flipped_data_bytes_are_detected_by_both_digests(checkpoint, tmp_path):
    offsets = dataset_offsets(checkpoint)
    assert len(offsets) > 40
    original = checkpoint.read_bytes()
    for name, (offset, size) in offsets.items():
        for where in {offset, offset + size - 1}:
            copy = tmp_path / "flipped.h5"
            data = bytearray(original)
            data[where] ^= 0x5A
            copy.write_bytes(data)
            # the whole-file digest in the header, checked before HDF5 opens the file
            with pytest.raises(ResultsError, match="file SHA-256 digest") as exc:
                load_checkpoint(copy)
            assert str(copy) in str(exc.value), name
            # the digest over the payload leaves, with the header resealed over the damage
            checkpoint_module._seal(copy)
            with pytest.raises(ResultsError, match="SHA-256 digest .* does not match the stored"):
                load_checkpoint(copy)


def test_any_flipped_bit_is_detected(checkpoint, tmp_path):
    """Header, HDF5 metadata and data alike: never a crash inside libhdf5, never silent."""
    original = checkpoint.read_bytes()
    copy = tmp_path / "flipped.h5"
    for where in range(0, len(original), 17):
        data = bytearray(original)
        data[where] ^= 1 << (where % 8)
        copy.write_bytes(data)
        with pytest.raises(ResultsError) as exc:
            load_checkpoint(copy)
        assert str(copy) in str(exc.value), where


def test_truncated_file_is_detected(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    for size in (0, 100, len(data) // 2, len(data) - 1):
        copy = tmp_path / f"cut_{size}.h5"
        copy.write_bytes(data[:size])
        with pytest.raises(ResultsError, match="truncated") as exc:
            load_checkpoint(copy)
        assert str(copy) in str(exc.value)


def test_missing_or_false_complete_flag_is_detected(checkpoint, tmp_path):
    for value in (None, False):
        copy = tmp_path / f"partial_{value}.h5"
        shutil.copy(checkpoint, copy)
        with h5py.File(copy, "r+") as f:
            if value is None:
                del f.attrs["complete"]
            else:
                f.attrs["complete"] = value
        with pytest.raises(ResultsError, match="digest|truncated or extended"):  # any change to the file shows
            load_checkpoint(copy)
        checkpoint_module._seal(copy)  # as if its writer had stopped before setting the flag
        with pytest.raises(ResultsError, match="complete") as exc:
            load_checkpoint(copy)
        assert str(copy) in str(exc.value)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(ResultsError, match="missing.h5"):
        load_checkpoint(tmp_path / "missing.h5")
    foreign = tmp_path / "foreign.h5"
    write_metrics(foreign, {}, {}, {})
    with pytest.raises(ResultsError, match="not an apts_mpi checkpoint"):
        load_checkpoint(foreign)


def test_meta_mismatch_names_the_key(checkpoint):
    load_checkpoint(checkpoint, expect={"world_size": 4})
    with pytest.raises(ResultsError) as exc:
        load_checkpoint(checkpoint, expect={"config_hash": "abc", "world_size": 2})
    msg = str(exc.value)
    assert str(checkpoint) in msg and "'world_size'" in msg and "4" in msg and "2" in msg
    with pytest.raises(ResultsError, match="config_hash.*'abc'.*'other'"):
        load_checkpoint(checkpoint, expect={"config_hash": "other"})
    with pytest.raises(ResultsError, match="no key 'nodes'"):
        load_checkpoint(checkpoint, expect={"nodes": 1})


# ----------------------------------------------------------------------------------------------
# atomicity


def leftover_temporaries(folder):
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_crash_during_checkpoint_write_keeps_old_file(checkpoint, monkeypatch):
    before = checkpoint.read_bytes()
    real = checkpoint_module._write_record
    calls = []

    def crash_midway(*args):
        calls.append(args[1])
        if len(calls) == 10:
            raise KeyboardInterrupt("simulated crash")
        real(*args)

    monkeypatch.setattr(checkpoint_module, "_write_record", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(checkpoint, {"new": torch.zeros(100)} | every_leaf_payload(), {})
    assert len(calls) == 10
    assert checkpoint.read_bytes() == before
    assert leftover_temporaries(checkpoint.parent) == []
    payload, meta = load_checkpoint(checkpoint, expect={"world_size": 4})
    assert_identical(every_leaf_payload()["tensors"], payload["tensors"])


def test_crash_during_first_write_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(metrics_module, "_write_series", crash)
    with pytest.raises(OSError, match="disk full"):
        write_metrics(tmp_path / "metrics.h5", {"loss": [1.0]}, {}, {})
    assert list(tmp_path.iterdir()) == []


def test_crash_during_metrics_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.h5"
    write_metrics(path, {"loss": [1.0]}, {"epoch": [1]}, {"seed": 1})
    before = path.read_bytes()
    real = metrics_module._write_series

    def crash_on_epochs(group, name, arr):
        if group.name == "/epochs":
            raise RuntimeError("simulated crash")
        real(group, name, arr)

    monkeypatch.setattr(metrics_module, "_write_series", crash_on_epochs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_metrics(path, {"loss": [1.0, 0.5]}, {"epoch": [1, 2]}, {"seed": 1})
    assert path.read_bytes() == before
    assert leftover_temporaries(tmp_path) == []
    assert read_metrics(path)[1]["epoch"].tolist() == [1]


def test_crash_at_rename_keeps_old_file(checkpoint, monkeypatch):
    before = checkpoint.read_bytes()

    def no_replace(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(WriteError, match="before rename"):  # an OSError, named as a write error
        save_checkpoint(checkpoint, {"x": 1}, {})
    assert checkpoint.read_bytes() == before
    assert leftover_temporaries(checkpoint.parent) == []


def test_write_order_is_fsync_file_replace_fsync_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        assert os.path.basename(src) == f".checkpoint.h5.tmp-{os.getpid()}"
        assert os.path.dirname(src) == os.path.dirname(os.path.abspath(dst))
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "checkpoint.h5", {"x": torch.ones(3)}, {})
    assert events == ["fsync file", "replace", "fsync dir"]


# ----------------------------------------------------------------------------------------------
# report and figure


def make_runs(root):
    """Two seeds of one APTS config and one Adam run; returns (dirs, written epoch series)."""
    rng = np.random.default_rng(7)
    specs = [("apts_seed0", "apts", 0, 0.1), ("apts_seed1", "apts", 1, 0.1),
             ("adam_lr", "adam", 0, 0.001)]
    dirs, written = [], []
    for folder, method, seed, lr in specs:
        run = root / folder
        run.mkdir()
        n = 5
        epochs = {"epoch": np.arange(1, n + 1),
                  "loss": np.sort(rng.uniform(0.05, 2.0, n))[::-1].copy(),
                  "test_accuracy": rng.uniform(0.5, 0.99, n),
                  "seconds": np.cumsum(rng.uniform(1.0, 3.0, n))}
        if method == "apts":
            epochs |= {"accepted": np.cumsum(rng.integers(5, 10, n)),
                       "rejected": np.cumsum(rng.integers(0, 3, n)),
                       "loss_evals": np.cumsum(rng.integers(50, 90, n)),
                       "grad_evals": np.cumsum(rng.integers(20, 40, n))}
        config = {"method": method, "lr": lr, "seed": seed, "data": {"name": "mnist", "seed": seed}}
        write_metrics(run / "metrics.h5", {"loss": rng.uniform(size=3 * n)}, epochs,
                      {"method": method, "subdomains": 4 if method == "apts" else 1, "seed": seed,
                       "config": config, "world_size": 4, "device": "cpu"})
        dirs.append(run)
        written.append(epochs)
    return dirs, written


def test_report_groups_seeds_with_numpy_mean_and_std(tmp_path):
    dirs, written = make_runs(tmp_path)
    rows = summarize_runs(dirs)
    assert [r["n"] for r in rows] == [2, 1]
    assert rows[0]["seeds"] == [0, 1]
    apts = written[:2]
    reference = {
        "final_test_acc": [100 * e["test_accuracy"][-1] for e in apts],
        "best_test_acc": [100 * e["test_accuracy"].max() for e in apts],
        "final_loss": [e["loss"][-1] for e in apts],
        "seconds": [e["seconds"][-1] for e in apts],
        "loss_evals": [e["loss_evals"][-1] for e in apts],
        "accepted": [e["accepted"][-1] for e in apts],
    }
    for key, values in reference.items():
        assert rows[0]["mean"][key] == pytest.approx(np.mean(values), rel=1e-15, abs=0)
        assert rows[0]["std"][key] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=0)
    assert rows[1]["mean"]["final_loss"] == written[2]["loss"][-1]
    assert math.isnan(rows[1]["std"]["final_loss"])
    assert rows[1]["mean"]["accepted"] is None  # Adam has no accepted/rejected series

    table = report_table(dirs)
    lines = table.splitlines()
    assert len(lines) == 4 and set(lines[1]) == {"-", " "}
    assert len({len(line) for line in lines}) == 1  # aligned
    header = lines[0]
    for col in ("run", "seeds", "epochs", "final test acc %", "best test acc %", "final loss",
                "wall time s", "loss/grad evals", "accepted/rejected"):
        assert col in header
    apts_line, adam_line = lines[2], lines[3]
    assert apts_line.startswith("apts N=4 apts ")
    acc = reference["final_test_acc"]
    assert f"{np.mean(acc):.2f} +- {np.std(acc, ddof=1):.2f}" in apts_line
    wall = reference["seconds"]
    assert f"{np.mean(wall):.1f} +- {np.std(wall, ddof=1):.1f}" in apts_line
    assert adam_line.startswith("adam N=1 adam_lr ")
    assert f"{written[2]['loss'][-1]:.4g}" in adam_line and "+-" not in adam_line
    # the blank accepted/rejected and evals cells of the Adam row
    start = header.index("loss/grad evals")
    assert adam_line[start:].strip() == ""


def test_plot_runs_writes_readable_png_and_pdf(tmp_path):
    import matplotlib.image

    dirs, _ = make_runs(tmp_path)
    png = tmp_path / "curves.png"
    plot_runs(dirs, png)
    assert png.stat().st_size > 10_000
    image = matplotlib.image.imread(png)
    assert image.shape == (800, 1300, 4)
    assert image[..., :3].std() > 0.01  # something was drawn
    pdf = tmp_path / "curves.pdf"
    plot_runs(dirs, pdf)
    assert pdf.read_bytes().startswith(b"%PDF")
    assert leftover_temporaries(tmp_path) == []
    with pytest.raises(ValueError, match="format"):
        plot_runs(dirs, tmp_path / "curves.xyz")


def test_format_table_plain_and_markdown():
    header, rows = ["run", "n", "acc %"], [["apts", "2", "97.10"], ["adam long name", "1", ""]]
    assert format_table(header, rows) == (
        "run             n  acc %\n"
        "--------------  -  -----\n"
        "apts            2  97.10\n"
        "adam long name  1       \n")
    assert format_table(header, rows, style="markdown") == (
        "| run | n | acc % |\n|---|---|---|\n| apts | 2 | 97.10 |\n| adam long name | 1 |  |")
    with pytest.raises(ValueError, match="row 1 has 2 cells"):
        format_table(header, [["a", "b", "c"], ["a", "b"]])
    with pytest.raises(ValueError, match="style"):
        format_table(header, rows, style="html")


def make_other_runs(root):
    """Two seeds of a language model (val_loss, one NaN) and a PINN run (l2_error)."""
    specs = {"lm_seed0": ("val_loss", [3.2, 2.9, np.nan, 2.7, 2.8], 0),
             "lm_seed1": ("val_loss", [3.1, 2.6, 2.65, 2.7, 2.75], 1),
             "pinn": ("l2_error", [0.9, 0.2, 0.05, 0.08, 0.04], 0)}
    dirs = []
    for folder, (series, values, seed) in specs.items():
        run = root / folder
        run.mkdir()
        n = len(values)
        epochs = {"epoch": np.arange(1, n + 1), "loss": np.linspace(2.0, 1.0, n),
                  "seconds": np.arange(1.0, n + 1), series: np.array(values)}
        if series == "l2_error":
            epochs["grad_evals"] = np.array([10, 25, 45, 70, 100])
        problem = "lm" if series == "val_loss" else "pinn"
        write_metrics(run / "metrics.h5", {}, epochs,
                      {"method": "apts", "subdomains": 2, "seed": seed,
                       "config": {"problem": problem, "seed": seed}})
        dirs.append(run)
    return dirs


def columns(header_line):
    """The column names of a plain table's header (names hold single spaces, gaps are wider)."""
    return re.split(r" {2,}", header_line.strip())


def test_report_shows_val_loss_and_l2_error_final_and_best(tmp_path):
    dirs = make_other_runs(tmp_path)
    lm, pinn = summarize_runs(dirs)
    final_val = [2.8, 2.75]
    best_val = [2.7, 2.6]  # the NaN epoch is skipped
    assert lm["mean"]["final_val_loss"] == pytest.approx(np.mean(final_val), rel=1e-15)
    assert lm["std"]["final_val_loss"] == pytest.approx(np.std(final_val, ddof=1), rel=1e-12)
    assert lm["mean"]["best_val_loss"] == pytest.approx(np.mean(best_val), rel=1e-15)
    assert lm["mean"]["final_test_acc"] is None and lm["mean"]["final_l2_error"] is None
    assert pinn["mean"]["final_l2_error"] == 0.04 and pinn["mean"]["best_l2_error"] == 0.04
    assert pinn["mean"]["grad_evals"] == 100 and pinn["mean"]["final_val_loss"] is None

    lines = report_table(dirs).splitlines()
    assert columns(lines[0]) == ["run", "seeds", "epochs", "final val loss", "best val loss",
                                 "final L2 error", "best L2 error", "final loss", "wall time s",
                                 "loss/grad evals", "accepted/rejected", "non-finite"]
    assert len({len(line) for line in lines}) == 1
    lm_line, pinn_line = lines[2], lines[3]
    assert f"{np.mean(final_val):.4g} +- {np.std(final_val, ddof=1):.4g}" in lm_line
    assert f"{np.mean(best_val):.4g} +- {np.std(best_val, ddof=1):.4g}" in lm_line
    l2_end = lines[0].index("best L2 error") + len("best L2 error")
    assert lm_line[lines[0].index("best val loss") + len("best val loss"):l2_end].strip() == ""
    assert pinn_line[:l2_end].split()[-2:] == ["0.04", "0.04"]
    val_start = lines[0].index("epochs") + len("epochs")
    assert pinn_line[val_start:lines[0].index("best val loss") + len("best val loss")].strip() == ""

    # classification runs alone: exactly today's columns; beside a PINN run: both measures
    (tmp_path / "mnist").mkdir()
    mnist, _ = make_runs(tmp_path / "mnist")
    today = ["run", "seeds", "epochs", "final test acc %", "best test acc %", "final loss",
             "wall time s", "loss/grad evals", "accepted/rejected", "non-finite"]
    assert columns(report_table(mnist).splitlines()[0]) == today
    mixed = columns(report_table(mnist + [dirs[2]]).splitlines()[0])
    assert mixed == today[:5] + ["final L2 error", "best L2 error"] + today[5:]


def test_plot_runs_main_metric_and_gradient_evaluations(tmp_path):
    dirs = make_other_runs(tmp_path)
    fig = plot_runs([dirs[2]], tmp_path / "pinn.png")  # has grad_evals: three rows
    assert [ax.get_ylabel() for ax in fig.axes] == ["L2 error", "loss"] * 3
    assert [ax.get_xlabel() for ax in fig.axes[::2]] == ["epoch", "wall time s",
                                                         "gradient evaluations"]
    assert fig.axes[0].get_yscale() == "log"
    (line,) = fig.axes[0].lines
    assert np.array_equal(line.get_ydata(), [0.9, 0.2, 0.05, 0.08, 0.04])
    (line,) = fig.axes[4].lines
    assert np.array_equal(line.get_xdata(), [10, 25, 45, 70, 100])

    fig = plot_runs(dirs[:2], tmp_path / "lm.png")  # no grad_evals: two rows
    assert [ax.get_ylabel() for ax in fig.axes] == ["val loss", "loss"] * 2
    # two seeds of one config: one line, their mean (a NaN epoch of one seed: the other's value)
    (line,) = fig.axes[0].lines
    assert np.allclose(line.get_ydata(), [3.15, 2.75, 2.65, 2.7, 2.775], rtol=1e-15, atol=0)
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == 2.6 and band.max() == 3.2  # from the lowest to the highest seed

    mnist_root = tmp_path / "mnist"
    mnist_root.mkdir()
    mnist, written = make_runs(mnist_root)
    fig = plot_runs(mnist, tmp_path / "mnist.png")
    assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy %", "loss"] * 3
    assert fig.axes[0].get_yscale() == "linear"
    apts, adam = fig.axes[0].lines  # the two APTS seeds are one group
    assert np.allclose(adam.get_ydata(), 100 * written[2]["test_accuracy"], rtol=1e-15, atol=0)
    assert np.allclose(apts.get_ydata(), 50 * (written[0]["test_accuracy"]
                                               + written[1]["test_accuracy"]), rtol=1e-14, atol=0)
    assert len(fig.axes[4].lines) == 1  # Adam's run has no grad_evals


def test_seeds_run_for_different_lengths_form_one_group(tmp_path):
    """Runs of one config that differ in seed, in how long they ran (epochs, targets, logging)
    and in where their data lie form one group; a change of the method's keywords does not."""
    def run(name, seed, epochs, lr=0.1, root="/data/a"):
        folder = tmp_path / name
        folder.mkdir()
        config = {"seed": seed, "epochs": epochs, "log_interval_s": 60.0 * seed, "target": None,
                  "data": {"dataset": "mnist", "root": root, "batch_size": 100},
                  "optimizer": {"method": "apts", "radius": lr, "micro_batch": None}}
        write_metrics(folder / "metrics.h5", {"loss": np.ones(3)},
                      {"epoch": np.arange(1, epochs + 1), "loss": np.ones(epochs)},
                      {"method": "apts", "subdomains": 2, "seed": seed, "config": config,
                       "world_size": 2, "device": "cpu"})
        return folder

    dirs = [run("a0", 0, 50), run("a1", 1, 25, root="/scratch/b"), run("b0", 0, 50, lr=0.2)]
    rows = summarize_runs(dirs)
    assert [(r["n"], r["seeds"]) for r in rows] == [(2, [0, 1]), (1, [0])]
