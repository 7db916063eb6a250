"""The figures over run folders: learning curves (:func:`plot_runs`) and the trust-region
diagnostics (:func:`plot_diagnostics`).

Runs that differ only in seed are one group (:func:`~apts_mpi.results.report.summarize_runs`):
one line, the mean over the seeds at each epoch (or iteration), and a band from the smallest to the
largest seed's value.  A group's colour depends only on its method and N (:func:`group_colour`),
so the same run has the same colour in every figure.  The title names the problem (data set and
network, from the runs' configs).  An axis of seconds, evaluations or iterations that spans two
decades or more is drawn in log scale.
"""
from __future__ import annotations

import os

import numpy as np

from .files import atomic_write
from .metrics import read_metrics
from .report import _QUALITY, _metrics_path, _quality_series, summarize_runs

__all__ = ["plot_runs", "plot_diagnostics", "group_colour", "has_diagnostics"]

# one hue per method (matplotlib's tab10), lighter for few subdomains and darker for many
_HUES = {"apts": "C0", "tr": "C1", "sgd": "C2", "adam": "C3", "lbfgs": "C4", "adam-lbfgs": "C5",
         "adamw": "C6", "schedulefree": "C7", "adam-apts": "C8"}
_N_LADDER = (1, 2, 4, 6, 8, 16)
# iteration series the diagnostics figure draws: (series, axis label, log y)
_DIAGNOSTICS = (("radius", "trust-region radius", True), ("rho", "rho (actual / predicted)", False),
                ("accepted", "accepted steps % (moving mean)", False),
                ("step_inf", "||s||_inf (step)", True))
_RHO_CLIP = (-1.0, 2.0)  # rho far outside [0, 1] only says "rejected": clipped for the scale


def group_colour(method, subdomains):
    """The RGB colour of a group: the method's hue, lighter for N = 1, 2 and darker for N = 6, 8,
    16 and more (the same for every figure)."""
    from matplotlib.colors import to_rgb

    hue = _HUES.get(method)
    if hue is None:  # a method without its own hue: C9, the one tab10 colour left
        hue = "C9"
    n = subdomains if isinstance(subdomains, int) else 1
    step = next((i for i, m in enumerate(_N_LADDER) if n <= m), len(_N_LADDER) - 1)
    amount = -0.5 + step / (len(_N_LADDER) - 1)  # -0.5 (lighter) .. 0.5 (darker)
    base = np.array(to_rgb(hue))
    target = np.zeros(3) if amount > 0 else np.ones(3)
    return tuple(base + (target - base) * abs(amount) * 0.8)


def _canvas(out, size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = os.fspath(out)
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    fig = Figure(figsize=size, dpi=100)
    canvas = FigureCanvasAgg(fig)
    if fmt not in canvas.get_supported_filetypes():
        raise ValueError(f"{out}: unsupported figure format {fmt!r}; "
                         f"use one of {', '.join(sorted(canvas.get_supported_filetypes()))}")
    return fig, fmt


def check_format(out) -> None:
    """Raise ``ValueError`` (one line) when matplotlib cannot write ``out``'s extension."""
    _canvas(out, (1, 1))


def _save(fig, out, fmt):
    def write(tmp):
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format=fmt)
            fh.flush()

    atomic_write(os.fspath(out), write)


def _groups(run_dirs):
    """[(summary row, [(iterations, epochs, attrs) per run])] in the order of summarize_runs."""
    rows = summarize_runs(run_dirs)
    return [(row, [read_metrics(_metrics_path(r)) for r in row["runs"]]) for row in rows]


def _stack(series: list):
    """Series of unequal length as one float array, NaN-padded: (runs, longest)."""
    n = max((len(s) for s in series), default=0)
    out = np.full((len(series), n), np.nan)
    for i, s in enumerate(series):
        out[i, :len(s)] = np.asarray(s, dtype=float)
    return out


def _band(ax, x, ys, style, label):
    """The mean line of ``ys`` (runs x points, NaN-padded) over ``x``, and the min-max band."""
    with np.errstate(all="ignore"), _quiet():
        mean, low, high = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
    keep = np.isfinite(x) & np.isfinite(mean)
    (line,) = ax.plot(x[keep], mean[keep], label=label, **style)
    if ys.shape[0] > 1 and keep.any():
        ax.fill_between(x[keep], low[keep], high[keep], color=style["color"], alpha=0.2,
                        linewidth=0)
    return line


class _quiet:
    """numpy's "mean of empty slice" warnings off (an all-NaN column is a gap in the line)."""

    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _title(groups, what) -> str:
    problems = []
    for _, runs in groups:
        for _, _, attrs in runs:
            cfg = attrs.get("config") if isinstance(attrs.get("config"), dict) else {}
            data, model = cfg.get("data", {}), cfg.get("model", {})
            dataset = data.get("dataset") if isinstance(data, dict) else None
            network = model.get("name") if isinstance(model, dict) else None
            name = " / ".join(str(x) for x in (dataset, network) if x) or "problem not recorded"
            if name not in problems:
                problems.append(name)
    return f"{', '.join(problems)}: {what}"


def _label(row) -> str:
    seeds = [s for s in row["seeds"] if s is not None]
    return f"{row['label']} ({row['n']} seed{'s' if row['n'] > 1 else ''}" + \
        (f": {', '.join(map(str, seeds))})" if seeds else ")")


def _curves(ax):
    """The lines of the runs (not the reference lines, whose labels start with '_')."""
    return [line for line in ax.lines if not line.get_label().startswith("_")]


def _log_x_where_it_helps(ax):
    """Log x when the positive x values of the axis span two decades or more."""
    xs = np.concatenate([np.asarray(line.get_xdata(), dtype=float) for line in _curves(ax)]
                        or [[]])
    xs = xs[np.isfinite(xs) & (xs > 0)]
    if xs.size and xs.max() / xs.min() >= 100:
        ax.set_xscale("log")


def _finish(fig, axes, groups, title, legend_x):
    fig.suptitle(title)
    handles = {}
    for ax in axes:
        for line in _curves(ax):
            handles.setdefault(line.get_label(), line)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center left",
                   bbox_to_anchor=(legend_x, 0.5), fontsize="small", frameon=False)


def plot_runs(run_dirs: list, out):
    """The learning curves of the runs, grouped over seeds, into ``out`` (written atomically);
    returns the figure.

    Columns: the problem's main metric (the first of test accuracy %, validation loss, L2 error
    that some run has; log y for the losses) and the training loss (log y).  Rows: against epoch,
    against wall time s and, when some run has ``grad_evals``, against cumulative gradient
    evaluations (x: the seeds' mean at each epoch).  One line (mean) and band (min to max) per
    group, coloured by :func:`group_colour`; one legend.  The format follows ``out``'s extension
    (png, pdf, or any other matplotlib writes).  Raises ``ValueError`` for no runs or an unknown
    extension (before reading any run), ``ResultsError`` for an unreadable metrics file.
    """
    from matplotlib.ticker import MaxNLocator

    if not run_dirs:
        raise ValueError("plot_runs: no runs to plot")
    fig, fmt = _canvas(out, (13, 8))
    groups = _groups(run_dirs)
    everything = [ep for _, runs in groups for _, ep, _ in runs]
    main = next((q for q in _QUALITY if any(_quality_series(ep, q.series) is not None
                                            for ep in everything)), _QUALITY[0])
    x_axes = [("epoch", "epoch"), ("seconds", "wall time s")]
    if any("grad_evals" in ep and len(ep["grad_evals"]) for ep in everything):
        x_axes.append(("grad_evals", "gradient evaluations"))
    axes = fig.subplots(len(x_axes), 2, squeeze=False)
    for row, runs in groups:
        style = {"color": group_colour(row["method"], row["subdomains"]), "marker": ".",
                 "markersize": 3, "linewidth": 1.5}
        label = _label(row)
        epochs = [ep for _, ep, _ in runs]
        quality = [_quality_series(ep, main.series) for ep in epochs]
        ys = [_stack([[] if q is None else q for q in quality])
              if any(q is not None for q in quality) else None,
              _stack([ep.get("loss", []) for ep in epochs])]
        for (x_name, _), ax_row in zip(x_axes, axes):
            if not all(len(ep.get(x_name, [])) for ep in epochs):
                continue  # e.g. a baseline without gradient evaluations
            with _quiet():
                x = np.nanmean(_stack([ep[x_name] for ep in epochs]), 0)
            for ax, y in zip(ax_row, ys):
                if y is not None and y.size:
                    _band(ax, x[:y.shape[1]], y[:, :len(x)], style, label)
    for (x_name, xlabel), (ax_main, ax_loss) in zip(x_axes, axes):
        for ax, ylabel, log in ((ax_main, main.axis, not main.higher), (ax_loss, "loss", True)):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if x_name == "epoch":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            else:
                _log_x_where_it_helps(ax)
            if log and any(np.any(np.asarray(line.get_ydata(), dtype=float) > 0)
                           for line in ax.lines):
                ax.set_yscale("log")
    fig.subplots_adjust(left=0.06, right=0.74, bottom=0.07, top=0.93, wspace=0.25,
                        hspace=0.3 if len(x_axes) == 2 else 0.45)
    _finish(fig, axes.ravel(), groups,
            _title(groups, f"{main.axis} and training loss (mean, band: min to max over seeds)"),
            0.755)
    _save(fig, out, fmt)
    return fig


def has_diagnostics(run_dirs: list) -> bool:
    """Whether some run has a trust-region radius per iteration (APTS, TR; not the baselines)."""
    for r in run_dirs:
        it = read_metrics(_metrics_path(r))[0]
        if "radius" in it and np.isfinite(np.asarray(it["radius"], dtype=float)).any():
            return True
    return False


def plot_diagnostics(run_dirs: list, out, window: int | None = None):
    """The trust-region diagnostics of the runs, grouped over seeds, into ``out``; returns the
    figure.

    Four panels against the iteration (1, 2, ...): the radius Delta (log y), rho = actual over
    predicted decrease (clipped to [-1, 2]; dashed lines at 0 and 1), the share of accepted steps
    in percent (moving mean over ``window`` iterations, default a twentieth of the longest run, at
    least 1) and the step's inf-norm ||s||_inf (log y).  Mean line and min-max band per group, as
    :func:`plot_runs`; runs without a radius (the baselines) are left out.  Log x once the
    iterations span two decades.  Raises ``ValueError`` for no runs with a radius or an unknown
    extension, ``ResultsError`` for an unreadable metrics file.
    """
    if not run_dirs:
        raise ValueError("plot_diagnostics: no runs to plot")
    fig, fmt = _canvas(out, (13, 8))
    groups = []
    for row, runs in _groups(run_dirs):
        kept = [r for r in runs if "radius" in r[0]
                and np.isfinite(np.asarray(r[0]["radius"], dtype=float)).any()]
        if kept:
            groups.append((row, kept))
    if not groups:
        raise ValueError("plot_diagnostics: no run has a trust-region radius per iteration "
                         "(Adam, SGD, L-BFGS have none)")
    longest = max(len(it["radius"]) for _, runs in groups for it, _, _ in runs)
    window = window or max(1, longest // 20)
    axes = fig.subplots(2, 2).ravel()
    for row, runs in groups:
        style = {"color": group_colour(row["method"], row["subdomains"]), "linewidth": 1.2}
        label = _label(row)
        for ax, (series, _, _) in zip(axes, _DIAGNOSTICS):
            values = []
            for it, _, _ in runs:
                v = np.asarray(it.get(series, []), dtype=float)
                if series == "accepted":  # 1 accepted, 0 rejected, -1 no decision
                    decided = np.where(v >= 0, (v == 1) * 100.0, np.nan)
                    kernel = np.ones(window)
                    with np.errstate(all="ignore"):
                        num = np.convolve(np.nan_to_num(decided), kernel)[:len(v)]
                        den = np.convolve(np.isfinite(decided).astype(float), kernel)[:len(v)]
                        v = np.where(den > 0, num / np.maximum(den, 1), np.nan)
                elif series == "rho":
                    v = np.clip(v, *_RHO_CLIP)
                values.append(v)
            ys = _stack(values)
            _band(ax, np.arange(1, ys.shape[1] + 1, dtype=float), ys, style, label)
    for ax, (series, ylabel, log) in zip(axes, _DIAGNOSTICS):
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        _log_x_where_it_helps(ax)
        if log and any(np.any(np.asarray(line.get_ydata(), dtype=float) > 0) for line in ax.lines):
            ax.set_yscale("log")
        if series == "rho":
            for level in (0.0, 1.0):
                ax.axhline(level, color="0.5", linestyle="--", linewidth=0.8)
            ax.set_ylim(_RHO_CLIP[0] - 0.1, _RHO_CLIP[1] + 0.1)
        if series == "accepted":
            ax.set_ylim(-5, 105)
    fig.subplots_adjust(left=0.06, right=0.74, bottom=0.07, top=0.92, wspace=0.25, hspace=0.3)
    _finish(fig, axes, groups, _title(groups, f"trust-region diagnostics (mean, band: min to max "
                                              f"over seeds; acceptance over {window} iterations)"),
            0.755)
    _save(fig, out, fmt)
    return fig
