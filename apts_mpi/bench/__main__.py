"""``python -m apts_mpi.bench ...``: the iteration benchmark (:mod:`apts_mpi.bench.iteration`)."""
from .iteration import main

main()
