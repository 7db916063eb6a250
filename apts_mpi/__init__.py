"""apts_mpi: APTS, the Additively Preconditioned Trust-region Strategy, across MPI ranks.

Trotti, Cruz Alegria, Kopanicakova, Krause, arXiv:2312.13677.  Public names are imported lazily
so that ``import apts_mpi`` stays cheap and does not initialise MPI.
"""
from ._version import __version__

_exports = {
    "TrustRegion": "apts_mpi.trust_region",
    "update_radius": "apts_mpi.trust_region",
    "APTS": "apts_mpi.apts",
}


def __getattr__(name):
    if name in _exports:
        import importlib
        return getattr(importlib.import_module(_exports[name]), name)
    raise AttributeError(f"module 'apts_mpi' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_exports)]
