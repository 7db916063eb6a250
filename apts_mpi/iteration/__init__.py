"""The parts one APTS iteration is made of (docs/method.md, "The iteration's parts").

* :mod:`.evaluator` -- f and its gradient over a communicator, on the minibatch's shares and
  micro-batches: the shared evaluations and each local phase's part (frozen prefix, autocast).
  Model parallel: :class:`apts_mpi.model_parallel.PipeEvaluator`.
* :mod:`.local_phase` -- one subdomain's trust-region iterations from theta_k; the step itself is
  the engine's local solver (:mod:`apts_mpi.solvers`).
* :mod:`.combiner` -- the corrections into one step s and one predicted decrease: the sum over
  parameter subdomains, or the data space's weighted average.  Model parallel:
  :class:`apts_mpi.model_parallel.PipeCombiner`.
* :mod:`.coordinator` -- the acceptance test on the combined step and the radius.

:class:`apts_mpi.apts.APTS` runs the iteration over whichever parts it was built with; the parts
never ask which mode they are in.
"""
