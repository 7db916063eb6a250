"""Benchmarks: what an iteration costs, where the time goes, how fast a run reaches its target.

One harness (:mod:`.harness`: build through the public constructor path, warm up, time, median,
JSON) and one home for tables (:mod:`.tables`, through :func:`apts_mpi.tables.format_table`, the
formatter ``apts-mpi report`` uses); the benchmarks themselves:

* :mod:`.iteration` (``python -m apts_mpi.bench``; ``scripts/bench``, ``scripts/bench_options``,
  ``scripts/time_to_accuracy``): one iteration on the paper's MNIST network, split into local
  work, communication, waiting and global work; the baselines' iteration; raw MPI bandwidth;
* :mod:`.pipeline` (``scripts/bench_pipeline``): model-parallel APTS beside data-parallel APTS;
* :mod:`.gpu` (``scripts/gpu_bench``): APTS on one GPU with each option, the cost split;
* :mod:`.suite` (``scripts/reproduce_suite``): the authors' current problems, CPU-sized.

Nothing here is imported by the package's training path.
"""
