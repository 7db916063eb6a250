"""Which of the paths given to ``report`` and ``plot`` are runs.

A run is a folder holding ``metrics.h5`` (or that file named directly).  A folder that holds no
``metrics.h5`` is looked into one level deeper, so that ``runs/*`` after ``scripts/run`` (which
writes ``runs/demo-<time>/<run>/``) finds the runs; anything else (a figure written beside the
runs, a folder of a run killed before its first write) is skipped with a one-line reason.
"""
from __future__ import annotations

from pathlib import Path

from .files import ResultsError
from .metrics import METRICS_FILE

__all__ = ["find_runs"]


def find_runs(paths) -> tuple[list[Path], list[str]]:
    """``(runs, skipped)``: the run folders among ``paths`` (each folder without ``metrics.h5``
    replaced by its sub-folders that hold one, in name order; duplicates dropped) and one line per
    path that is not a run (``"<path>: <reason>"``).  Raises ``ResultsError`` when no path is a
    run, naming what was given."""
    runs, skipped, seen = [], [], set()

    def add(folder: Path):
        key = folder.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(folder)

    for given in paths:
        p = Path(given)
        if p.is_file() and p.name == METRICS_FILE:
            add(p.parent)
        elif not p.exists():
            skipped.append(f"{p}: no such file or folder")
        elif not p.is_dir():
            skipped.append(f"{p}: not a run (a file; a run is a folder holding {METRICS_FILE})")
        elif (p / METRICS_FILE).is_file():
            add(p)
        else:
            inner = sorted(c for c in p.iterdir() if (c / METRICS_FILE).is_file())
            if inner:
                for c in inner:
                    add(c)
            else:
                skipped.append(f"{p}: not a run (no {METRICS_FILE} in it or in its sub-folders)")
    if not runs:
        shown = ", ".join(str(p) for p in list(paths)[:3]) + (", ..." if len(paths) > 3 else "")
        raise ResultsError(f"no runs among {shown}: a run is a folder holding {METRICS_FILE} "
                           "(or one level below a folder given)")
    return runs, skipped
