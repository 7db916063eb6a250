"""The package version (one place: the package, setup.cfg and the run files read it)."""
__version__ = "0.1.0"
