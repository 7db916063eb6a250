"""Results I/O: metrics and checkpoints in HDF5, a summary table and a figure over run folders.

A run folder ``RUN_DIR`` holds two files, both rewritten whole and atomically by rank 0 (h5py is
serial, so this package has no MPI in it):

``metrics.h5`` (:func:`write_metrics`, :func:`read_metrics`; module :mod:`.metrics`)
    per-iteration and per-epoch series and the run's attributes.
``checkpoint.h5`` (:func:`save_checkpoint`, :func:`load_checkpoint`; module :mod:`.checkpoint`)
    the state to resume from, with a SHA-256 over its content and one over the whole file.

Module :mod:`.files` holds what both share: atomic replacement and the attribute convention.
Module :mod:`.report` reads run folders: :func:`summarize_runs`, :func:`report_table`,
:func:`format_table` (the package's table formatter); :mod:`.figure` draws the curves
(:func:`plot_runs`) and the trust-region diagnostics (:func:`plot_diagnostics`); :mod:`.runs` finds
the run folders among the paths given (:func:`find_runs`).
"""
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .files import ResultsError
from .metrics import METRICS_FILE, read_metrics, write_metrics
from .figure import plot_diagnostics, plot_runs
from .report import format_table, report_records, report_table, summarize_runs
from .runs import find_runs

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
    "format_table",
    "report_records",
    "plot_runs",
    "plot_diagnostics",
    "find_runs",
]
