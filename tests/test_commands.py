"""The command line beside ``train``: report and plot over folders of runs, the figures, --version,
``config`` (resolved YAML, --keys, "did you mean"), ``download`` (from a mirror on 127.0.0.1) and
``export`` (a state dict that ``torch.load(..., weights_only=True)`` loads into the network)."""
import csv
import hashlib
import importlib.metadata
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from apts_mpi import cli, config as configuration, options
from apts_mpi.results import plot_diagnostics, plot_runs, read_metrics, summarize_runs, write_metrics
from apts_mpi.results.figure import group_colour
from test_data import http_root, served_idx_sources  # noqa: F401  (a fixture)
from test_results import make_runs

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    """``apts-mpi ARGV`` in this process: (status, stdout, stderr)."""
    try:
        cli.main([str(a) for a in argv])
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error(status, err, *words):
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("apts-mpi: error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def runs_tree(tmp):
    """runs/ as scripts/run and plot leave it: runs/demo-<time>/<three runs>, runs/figure.png,
    an empty run folder (killed before its first write)."""
    demo = tmp / "runs" / "demo-20260101-000000"
    demo.mkdir(parents=True)
    dirs, written = make_runs(demo)
    (tmp / "runs" / "figure.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp / "runs" / "killed").mkdir()
    return tmp / "runs", dirs, written


# ---- report and plot cope with what a runs folder holds ---------------------------------------

def test_report_walks_into_run_folders_and_skips_the_rest_with_a_note(tmp_path, capsys):
    runs, dirs, _ = runs_tree(tmp_path)
    status, out, err = run_cli(capsys, "report", *sorted(runs.iterdir()))
    assert status == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and sorted(l.split()[0] for l in lines[2:]) == ["adam", "apts"]
    notes = err.splitlines()
    assert len(notes) == 2 and all(n.startswith("apts-mpi: note: skipped ") for n in notes), err
    assert "figure.png: not a run" in err and "killed: not a run" in err
    # a metrics.h5 named directly, and a run given twice, count once
    status, out, _ = run_cli(capsys, "report", dirs[0] / "metrics.h5", dirs[0], dirs[1])
    assert status == 0 and out.splitlines()[2].split()[3] == "2"  # one group of two seeds


def test_report_with_no_run_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "figure.png").write_bytes(b"x")
    status, out, err = run_cli(capsys, "report", tmp_path / "figure.png", tmp_path / "absent")
    assert_one_error(status, err, "no runs among")
    assert out == ""


def test_report_formats_md_csv_json(tmp_path, capsys):
    runs, dirs, written = runs_tree(tmp_path)
    runs = sorted(runs.iterdir())
    plain = run_cli(capsys, "report", *runs)[1]
    status, md, _ = run_cli(capsys, "report", "--format", "md", *runs)
    assert status == 0 and md.splitlines()[1] == "|" + "---|" * 10
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header == [c.strip() for c in plain.splitlines()[0].split("  ") if c.strip()]

    status, text, _ = run_cli(capsys, "report", "--format", "csv", *runs)
    table = list(csv.reader(io.StringIO(text)))
    assert status == 0 and table[0] == header and len(table) == 3
    acc = [100 * e["test_accuracy"][-1] for e in written[:2]]
    apts_row = next(r for r in table[1:] if r[0].startswith("apts"))
    assert apts_row[3] == f"{np.mean(acc):.2f} +- {np.std(acc, ddof=1):.2f}"

    status, text, _ = run_cli(capsys, "report", "--format", "json", *runs)
    records = json.loads(text)
    apts, adam = sorted(records, key=lambda r: r["label"], reverse=True)
    assert status == 0 and (apts["n"], adam["n"]) == (2, 1)
    assert apts["mean"]["final_test_acc"] == pytest.approx(np.mean(acc), rel=1e-14)
    assert apts["std"]["final_test_acc"] == pytest.approx(np.std(acc, ddof=1), rel=1e-12)
    assert adam["std"]["final_loss"] is None  # one seed: no spread (NaN) is null
    assert adam["mean"]["accepted"] is None  # Adam has no accepted/rejected


def test_a_bad_report_format_is_one_line_exit_2(tmp_path, capsys):
    runs, _, _ = runs_tree(tmp_path)
    status, out, err = run_cli(capsys, "report", "--format", "xml", runs)
    assert_one_error(status, err, "--format 'xml'", "md, csv, json")
    assert out == ""


def test_plot_with_an_unknown_extension_is_one_line_and_writes_nothing(tmp_path, capsys):
    runs, _, _ = runs_tree(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    status, _, err = run_cli(capsys, "plot", runs, "--out", tmp_path / "figure.xyz")
    assert_one_error(status, err, "unsupported figure format 'xyz'")
    status, _, err = run_cli(capsys, "plot", runs, "--out", tmp_path / "f.png",
                             "--diagnostics", tmp_path / "d.nope")
    assert_one_error(status, err, "unsupported figure format 'nope'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_plot_then_report_on_the_same_glob(tmp_path, capsys):
    """The figure written into runs/ is skipped by the next report and plot."""
    runs, _, _ = runs_tree(tmp_path)
    status, out, err = run_cli(capsys, "plot", *sorted(runs.iterdir()), "--out", runs / "curves.png")
    assert status == 0 and f"wrote {runs / 'curves.png'}" in out, err
    assert "no trust-region diagnostics" in out  # the synthetic runs have no radius
    status, out, err = run_cli(capsys, "report", *sorted(runs.iterdir()))
    assert status == 0 and "curves.png: not a run" in err


# ---- the figures ------------------------------------------------------------------------------

def trust_region_runs(root, seeds=(0, 1, 2)):
    """APTS N=2 runs of several seeds with per-iteration radius, rho, accepted and ||s||_inf (of
    unequal length: a run stopped early), and a TR N=1 run; returns (dirs, iteration series)."""
    rng = np.random.default_rng(3)
    dirs, series = [], []
    for method, n_sub, seed, length in [("apts", 2, s, 300 - 20 * s) for s in seeds] + \
            [("tr", 1, 0, 250)]:
        run = root / f"{method}-n{n_sub}-seed{seed}"
        run.mkdir(parents=True)
        it = {"radius": np.exp(rng.normal(-4, 0.5, length)), "rho": rng.normal(0.6, 2.0, length),
              "accepted": rng.integers(-1, 2, length), "step_inf": np.exp(rng.normal(-5, 1, length)),
              "epoch": np.arange(1, length + 1)}
        ep = {"epoch": np.arange(1, length + 1), "loss": np.linspace(2, 0.1, length),
              "test_accuracy": np.linspace(0.2, 0.95, length),
              "seconds": np.cumsum(rng.uniform(0.01, 0.02, length)),
              "grad_evals": np.cumsum(rng.integers(1, 30, length))}
        cfg = {"seed": seed, "data": {"dataset": "digits"}, "model": {"name": "mlp-digits"},
               "optimizer": {"method": method}}
        write_metrics(run / "metrics.h5", it, ep, {"method": method, "subdomains": n_sub,
                                                   "seed": seed, "config": cfg, "world_size": n_sub})
        dirs.append(run)
        series.append(it)
    return dirs, series


def test_diagnostics_figure_mean_and_band_over_seeds(tmp_path):
    dirs, series = trust_region_runs(tmp_path)
    fig = plot_diagnostics(dirs, tmp_path / "diagnostics.png", window=1)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["trust-region radius", "rho (actual / predicted)",
                                                "accepted steps % (moving mean)", "||s||_inf (step)"]
    assert all(ax.get_xlabel() == "iteration" for ax in axes)
    assert "digits / mlp-digits" in fig._suptitle.get_text()
    apts = series[:3]
    # radius: the mean over the seeds that reached each iteration (independent numpy reference)
    line = next(l for l in axes[0].lines if l.get_label().startswith("apts N=2"))
    for i in (0, 150, 259, 270, 299):  # 3 seeds, 3, 2 (seed 2 ended at 260), 1 (seed 1 at 280)
        reference = np.mean([s["radius"][i] for s in apts if len(s["radius"]) > i])
        assert line.get_ydata()[i] == pytest.approx(reference, rel=1e-14)
    assert line.get_xdata()[0] == 1 and len(line.get_xdata()) == 300
    assert len(axes[0].collections) == 1  # one band: APTS has three seeds, TR one
    band = axes[0].collections[0].get_paths()[0].vertices[:, 1]
    low = min(min(s["radius"][i] for s in apts) for i in range(260))
    assert band.min() == pytest.approx(low, rel=1e-14)
    # accepted: the share of decided steps (1 of {0, 1}; -1 is no decision), in percent
    acc = next(l for l in axes[2].lines if l.get_label().startswith("apts N=2"))
    decided = [np.where(s["accepted"][:260] >= 0, 100.0 * (s["accepted"][:260] == 1), np.nan)
               for s in apts]
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):  # an iteration no seed decided
        reference = np.nanmean(decided, 0)
    x = acc.get_xdata().astype(int)
    shown = x[x <= 260]
    assert set(shown) == set(np.flatnonzero(np.isfinite(reference)) + 1)  # gaps: no decision
    np.testing.assert_allclose(acc.get_ydata()[:len(shown)], reference[shown - 1], rtol=1e-14)
    rho = next(l for l in axes[1].lines if l.get_label().startswith("apts N=2")).get_ydata()
    assert rho.min() >= -1 and rho.max() <= 2  # clipped for the scale
    assert axes[0].get_xscale() == "log" and axes[0].get_yscale() == "log"  # 300 iterations
    assert axes[1].get_yscale() == "linear"


def test_a_group_keeps_its_colour_whatever_the_argument_order(tmp_path):
    dirs, _ = trust_region_runs(tmp_path)

    def colours(fig):
        return {l.get_label().split(" (")[0]: l.get_color() for l in fig.axes[0].lines
                if not l.get_label().startswith("_")}

    a = colours(plot_runs(dirs, tmp_path / "a.png"))
    b = colours(plot_runs(dirs[::-1], tmp_path / "b.png"))
    assert a == b and len(set(map(tuple, a.values()))) == 2
    assert tuple(a["apts N=2 apts-n2"]) == group_colour("apts", 2)
    assert group_colour("apts", 2) != group_colour("apts", 4) != group_colour("tr", 2)
    assert group_colour("apts", 4) == group_colour("apts", 4)


def test_curves_figure_groups_seeds_titles_the_problem_and_logs_wide_axes(tmp_path):
    dirs, _ = trust_region_runs(tmp_path)
    fig = plot_runs(dirs, tmp_path / "curves.png")
    assert fig._suptitle.get_text().startswith("digits / mlp-digits: test accuracy %")
    labels = {l.get_label() for l in fig.axes[0].lines}
    assert labels == {"apts N=2 apts-n2 (3 seeds: 0, 1, 2)", "tr N=1 tr-n1 (1 seed: 0)"}
    epochs = [read_metrics(d / "metrics.h5")[1] for d in dirs[:3]]
    line = next(l for l in fig.axes[0].lines if l.get_label().startswith("apts"))
    i = 100
    assert line.get_ydata()[i] == pytest.approx(np.mean([100 * e["test_accuracy"][i] for e in epochs]),
                                                rel=1e-14)
    # gradient evaluations span more than two decades: log x; epochs stay linear
    assert fig.axes[4].get_xlabel() == "gradient evaluations" and fig.axes[4].get_xscale() == "log"
    assert fig.axes[0].get_xscale() == "linear"


# ---- --version, config, did you mean ----------------------------------------------------------

def test_version_is_the_installed_metadata(capsys):
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0 and out.strip() == f"apts-mpi {importlib.metadata.version('apts_mpi')}"
    setup = (ROOT / "setup.cfg").read_text()
    assert "version = attr: apts_mpi._version.__version__" in setup  # written once


def test_license_file_is_bsd_3_clause():
    text = (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause" in text and "Neither the name of the copyright holder" in text
    assert "license = BSD-3-Clause" in (ROOT / "setup.cfg").read_text()


def test_config_prints_the_resolved_yaml(capsys):
    status, out, _ = run_cli(capsys, "config", ROOT / "configs" / "demo.yaml",
                             "--set", "epochs=7", "--set", "optimizer.radius=0.05")
    expected = configuration.load(ROOT / "configs" / "demo.yaml", ["epochs=7", "optimizer.radius=0.05"])
    assert status == 0 and yaml.safe_load(out) == expected
    assert configuration.resolve(yaml.safe_load(out)) == expected  # a config that runs as printed


def test_config_keys_lists_every_key_with_default_and_rule(capsys):
    status, out, _ = run_cli(capsys, "config", "--keys")
    assert status == 0
    listed = {line.split()[0]: line for line in out.splitlines()[1:] if line and line[0] != "("}
    expected = ({k for k in configuration.TOP} | {f"data.{k}" for k in configuration.DATA}
                | {f"model.{k}" for k in configuration.MODEL} | {"optimizer.method"}
                | {f"optimizer.{k}" for k in options.options("apts", config_only=True)})
    assert set(listed) == expected
    assert listed["optimizer.radius"].split()[1] == "0.01"  # its default
    assert "must be > 0" in listed["optimizer.radius"]       # and its rule
    assert listed["seed"].split()[1] == "0" and "2**63" in listed["seed"]
    # the keys of another data set and method
    status, out, _ = run_cli(capsys, "config", ROOT / "configs" / "demo.yaml", "--keys",
                             "--set", "optimizer.method=adam", "--set", "data.dataset=poisson2d",
                             "--set", "model.name=pinn-mlp")
    assert "data.interior_points" in out and "optimizer.lr" in out and "optimizer.radius" not in out


@pytest.mark.parametrize("override, key, guess", [
    ("epoch=3", "epoch", "epochs"), ("data.batchsize=10", "data.batchsize", "batch_size"),
    ("optimizer.raduis=0.1", "optimizer.raduis", "radius")])
def test_an_unknown_key_gets_did_you_mean(capsys, override, key, guess):
    status, _, err = run_cli(capsys, "config", ROOT / "configs" / "demo.yaml", "--set", override)
    assert_one_error(status, err, f"{key}: unknown key (did you mean '{guess}'?)")


# ---- download ---------------------------------------------------------------------------------

def test_download_from_a_mirror_checks_md5(http_root, tmp_path, capsys, monkeypatch):  # noqa: F811
    from apts_mpi import data
    served, base_url = http_root
    sources, _ = served_idx_sources(served, base_url)
    # the published MD5s are those of the real files: here, those of the files this server holds
    monkeypatch.setitem(data.SOURCES, "mnist", {k: (url, sources[k][1])
                                                for k, (url, _) in data.SOURCES["mnist"].items()})
    root = tmp_path / "data"
    status, out, err = run_cli(capsys, "download", "mnist", "--root", root, "--mirror", base_url)
    assert status == 0, err
    raw = root / "MNIST" / "raw"
    for name in sources:
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == sources[name][1]
    assert out.count("wrote ") == 4
    status, out, _ = run_cli(capsys, "download", "mnist", "--root", root, "--mirror", base_url)
    assert status == 0 and "already present" in out


def test_download_with_a_wrong_checksum_is_one_line_and_leaves_nothing(http_root, tmp_path):  # noqa: F811
    served, base_url = http_root
    served_idx_sources(served, base_url)  # files of the right names, not the published ones
    root = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "apts_mpi", "download", "mnist", "--root", root,
                             "--mirror", base_url], capture_output=True, text=True, timeout=120)
    assert_one_error(result.returncode, result.stderr, "checksum mismatch")
    assert not any(p.is_file() for p in root.rglob("*"))


def test_download_unknown_data_set(capsys, tmp_path):
    status, _, err = run_cli(capsys, "download", "mnst", "--root", tmp_path)
    assert_one_error(status, err, "unknown data set 'mnst'", "did you mean 'mnist'?")


# ---- export -----------------------------------------------------------------------------------

def test_export_gives_a_state_dict_that_loads_with_weights_only(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "apts_mpi", "train", ROOT / "configs" / "demo.yaml",
                    "--set", "optimizer.method=tr", "--set", "epochs=3", "--out", run],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    out = tmp_path / "model.pt"
    result = subprocess.run([sys.executable, "-m", "apts_mpi", "export", run, "--out", out],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "weights_only=True" in result.stdout
    state = torch.load(out, weights_only=True)
    from apts_mpi.data import load_dataset
    from apts_mpi.models import build_model
    digits = load_dataset("digits")
    model = build_model("mlp-digits", digits.input_shape, digits.classes)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        accuracy = (model(digits.test_x).argmax(1) == digits.test_y).double().mean().item()
    # the network the run evaluated at its last epoch, re-evaluated here from the exported file
    assert accuracy == pytest.approx(read_metrics(run / "metrics.h5")[1]["test_accuracy"][-1],
                                     abs=1e-12)
    result = subprocess.run([sys.executable, "-m", "apts_mpi", "export", tmp_path, "--out",
                             tmp_path / "x.pt"], capture_output=True, text=True, timeout=120)
    assert_one_error(result.returncode, result.stderr, "no checkpoint at")
    assert not (tmp_path / "x.pt").exists()


# ---- help -------------------------------------------------------------------------------------

def test_every_argument_has_help_and_the_epilog_says_launch_exits_and_environment():
    import argparse
    top = cli.parser()
    subparsers = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("apts-mpi", top), *subparsers.choices.items()]:
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
        text = sub.format_help()
        for word in ("mpiexec -n", "exit statuses", " 75 ", "APTS_DATA", "OMP_NUM_THREADS"):
            assert word in text, f"{name} --help lacks {word!r}"
    assert set(subparsers.choices) >= {"train", "report", "plot", "config", "download", "export"}
