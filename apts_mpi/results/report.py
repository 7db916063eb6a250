"""The report over run folders: summary rows and a table formatter.

A run folder holds ``metrics.h5`` (:mod:`apts_mpi.results.metrics`, whose docstring lists the
series read here).  :func:`summarize_runs` groups runs that differ only in seed and gives the
numbers; :func:`report_table` prints them with the package's one table formatter
(:func:`apts_mpi.tables.format_table`, re-exported here); :mod:`.figure` draws the runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import RESUMABLE
from ..tables import format_table
from .metrics import METRICS_FILE, read_metrics

__all__ = ["summarize_runs", "report_table", "report_records", "format_table"]


class _Measure(NamedTuple):
    """A per-epoch quality measure a problem may report."""

    series: str      # epoch series in metrics.h5
    stem: str        # summary keys final_<stem>, best_<stem>
    label: str       # table column "final <label>" / "best <label>"
    axis: str        # figure axis label
    higher: bool     # higher is better (best = max), else best = min; the figure uses log y if not
    spec: str        # table number format


# In order of precedence for the figure's main metric.
_QUALITY = (_Measure("test_accuracy", "test_acc", "test acc %", "test accuracy %", True, ".2f"),
            _Measure("val_loss", "val_loss", "val loss", "val loss", False, ".4g"),  # language model
            _Measure("l2_error", "l2_error", "L2 error", "L2 error", False, ".4g"))  # PINN
_COUNTERS = ("seconds", "loss_evals", "grad_evals", "accepted", "rejected", "nonfinite")
_SUMMARY_KEYS = ("epochs", *(f"{end}_{q.stem}" for q in _QUALITY for end in ("final", "best")),
                 "final_loss", *_COUNTERS)


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
    """What decides a run's trajectory, less its seed: the config without the keys that only set
    how long or how a run goes on (``config.RESUMABLE``: epochs, targets, checkpoints, logging),
    where its data lie, null values (keys added later with a null default) and every ``seed``."""
    def prune(node):
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if k != "seed" and v is not None}
        return [prune(v) for v in node] if isinstance(node, list) else node
    if not isinstance(value, dict):
        return prune(value)
    kept = {k: v for k, v in value.items() if k not in RESUMABLE}
    if isinstance(kept.get("data"), dict):
        kept["data"] = {k: v for k, v in kept["data"].items() if k not in ("root", "download")}
    return prune(kept)


def _quality_series(epochs: dict, series: str):
    """The epoch series ``series`` as float64 (test accuracy in percent), or None if absent."""
    values = epochs.get(series)
    if values is None or not len(values):
        return None
    return _accuracy_percent(values) if series == "test_accuracy" else np.asarray(values, float)


def _run_values(epochs: dict) -> dict:
    def last(name):
        s = epochs.get(name)
        return float(s[-1]) if s is not None and len(s) else None

    out = {"epochs": last("epoch")}
    for q in _QUALITY:
        values = _quality_series(epochs, q.series)
        best = None
        if values is not None:
            best = (float((np.nanmax if q.higher else np.nanmin)(values))
                    if np.isfinite(values).any() else float("nan"))
        out[f"final_{q.stem}"] = None if values is None else float(values[-1])
        out[f"best_{q.stem}"] = best
    out["final_loss"] = last("loss")
    out |= {name: last(name) for name in _COUNTERS}
    return out


def _short_name(names: list) -> str:
    stripped = [re.sub(r"(?i)[_\-.]?seed[_\-=]?\d+", "", n) or n for n in names]
    if len(set(stripped)) == 1:
        return stripped[0]
    return os.path.commonprefix(stripped).rstrip("_-. ") or stripped[0]


def summarize_runs(run_dirs: list) -> list:
    """Group runs that differ only in seed (and in how long they ran: see _without_seed) and
    summarise each group; the numbers behind the table.

    The group key is the run's ``method``, ``subdomains``, ``world_size``, ``device`` and
    ``config`` with every key named ``seed`` removed at any depth; a run without ``config`` is a
    group of its own.  Returns one dict per group in order of first appearance: ``label``,
    ``runs`` (paths), ``seeds``, ``n``, ``values`` (per summary key, the per-run values present),
    ``mean`` and ``std`` (sample standard deviation, ``ddof=1``; NaN for one run; ``None`` when no
    run has the series).  Summary keys: epochs; final_test_acc and best_test_acc (percent, best
    is the largest), final_val_loss and best_val_loss, final_l2_error and best_l2_error (best is
    the smallest; NaN entries are skipped, NaN when all are); final_loss; seconds, loss_evals,
    grad_evals, accepted, rejected, nonfinite (last values).
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
               "method": g["method"], "subdomains": g["subdomains"],
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


def _quality_shown(rows: list) -> list:
    """The entries of ``_QUALITY`` the table shows: those some run has.  Test accuracy is also
    shown when no run has any of them, so such a table keeps its (blank) accuracy columns."""
    shown = [q for q in _QUALITY if any(r["mean"][f"final_{q.stem}"] is not None for r in rows)]
    return shown or [_QUALITY[0]]


def report_table(run_dirs: list, style: str = "plain") -> str:
    """A table, one row per group of runs differing only in seed (see summarize_runs).

    ``style``: ``plain`` (aligned text), ``markdown`` (see :func:`format_table`) or ``csv`` (RFC
    4180, the same cells).

    Columns: run (method, N, short folder name), seeds, epochs, then the final and best value of
    each quality measure some run has (test accuracy %, validation loss, L2 error; test accuracy
    also when none is present, as blank cells), final loss, wall time s, loss/grad evals,
    accepted/rejected, rejections of a non-finite trial (``nonfinite``); a group of several seeds
    shows ``mean +- std``.  A missing series leaves its cell blank ('-' for half of a pair cell).
    Raises ``ResultsError`` for an unreadable metrics file.
    """
    rows = summarize_runs(run_dirs)
    quality = _quality_shown(rows)
    header = ["run", "seeds", "epochs"]
    for q in quality:
        header += [f"final {q.label}", f"best {q.label}"]
    header += ["final loss", "wall time s", "loss/grad evals", "accepted/rejected", "non-finite"]
    table = []
    for row in rows:
        ep = row["values"]["epochs"]
        if ep.size and np.all(ep == ep[0]):
            epochs = format(ep[0], "g")
        else:
            epochs = _fmt(row, "epochs", ".1f")

        def pair(a, b):
            x, y = _fmt(row, a, ".0f"), _fmt(row, b, ".0f")
            return f"{x or '-'} / {y or '-'}" if (x or y) else ""

        cells = [row["label"], str(row["n"]), epochs]
        for q in quality:
            cells += [_fmt(row, f"final_{q.stem}", q.spec), _fmt(row, f"best_{q.stem}", q.spec)]
        table.append(cells + [_fmt(row, "final_loss", ".4g"), _fmt(row, "seconds", ".1f"),
                              pair("loss_evals", "grad_evals"), pair("accepted", "rejected"),
                              _fmt(row, "nonfinite", ".0f")])
    if style == "csv":
        import csv
        import io
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([header, *table])
        return text.getvalue()
    return format_table(header, table, style)


def report_records(run_dirs: list) -> list:
    """The numbers of :func:`summarize_runs` as JSON-ready records (``report --format json``):
    ``label``, ``runs``, ``seeds``, ``n``, and per summary key ``mean``, ``std`` and ``values``
    (a NaN as ``null``)."""
    def plain(x):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    return [{"label": r["label"], "runs": r["runs"], "seeds": r["seeds"], "n": r["n"],
             "mean": {k: plain(v) for k, v in r["mean"].items()},
             "std": {k: plain(v) for k, v in r["std"].items()},
             "values": {k: [plain(float(x)) for x in v] for k, v in r["values"].items()}}
            for r in summarize_runs(run_dirs)]

