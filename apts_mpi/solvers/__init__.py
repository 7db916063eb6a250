"""Local solvers: the trust-region subproblem, one class per file (docs/method.md section 4).

In the manner of SciPy's trust-region subproblems (``scipy/optimize/_trustregion_*.py``): given
the model of f at the current point -- the engine's gradient g (and, for a quasi-Newton solver,
its limited-memory matrix B) -- and a radius, a solver writes a step s into the engine's step
buffer and returns its predicted decrease pred = m(0) - m(s) and ||s|| (None for a step on the
boundary by construction).  The engine (:class:`apts_mpi.trust_region.TrustRegionCore`) evaluates
the trial, takes rho and the radius by its one rule, and never asks which solver it holds; the
same solvers serve the APTS local phases, the global pass and the ``tr`` baseline.

The interface (:class:`apts_mpi.solvers.base.Solver`):

* ``solve(core, radius, g_inf, g_2sq, g_1) -> (pred, step_norm)`` on the host, from the gradient
  norms (host floats);
* ``device`` True: the step needs only g and its norms, so the engine forms it on the device before
  anything is read (``form(g, s, radius, g_inf, g_2sq, g_1)``, norms as 0-dim tensors, and
  ``decrease(radius, g_inf, g_2sq, g_1)``): one transfer per iteration, and
  :meth:`~apts_mpi.trust_region.TrustRegionCore.run_on_device` can use it;
* ``state_dict()`` / ``load_state_dict(state)``: what it keeps across iterations (checkpoints).

A new solver is one file here and one line in :data:`SOLVERS`; its name is then a value of the
``step`` keyword (a first-order model's step) or, for a quasi-Newton one, of ``model``.
"""
from __future__ import annotations

import importlib

#: solver name -> "module:class" in this package (imported on first use: this module is torch-free)
SOLVERS = {
    "cauchy": "cauchy:CauchyStep",                  # s = -radius g / ||g||
    "sign": "sign:SignStep",                        # s = -radius sign(g) (inf-norm)
    "adam": "adam:AdamStep",                        # Adam's direction scaled to the radius
    "lbfgs": "quasi_newton_step:QuasiNewtonStep",   # the quadratic model's minimiser in the ball
    "lsr1": "quasi_newton_step:QuasiNewtonStep",
}
#: the engine's models of f with a solver of their own (the rest: ``first-order``)
QUASI_NEWTON = ("lbfgs", "lsr1")
#: the first-order steps: the values of the ``step`` keyword (apts_mpi.options)
STEPS = tuple(name for name in SOLVERS if name not in QUASI_NEWTON)


def solver_class(name: str):
    module, cls = SOLVERS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_solver(config, numel: int, dtype, device):
    """The solver of an engine with ``config`` (a TrustRegionConfig): its ``model``'s when that is a
    quasi-Newton one (with the ``step``'s solver for its first iterations, before any pair is
    stored), else its ``step``'s; with ``scaling: adam`` that solver in the scaled norm
    (:class:`apts_mpi.solvers.scaled.ScaledSolver`)."""
    step = solver_class(config.step)(config, numel, dtype, device)
    if config.model in QUASI_NEWTON:
        step = solver_class(config.model)(config, numel, dtype, device, fallback=step)
    if getattr(config, "scaling", "none") == "adam":  # the scaled trust region (solvers/scaled.py)
        from .scaled import ScaledSolver
        step = ScaledSolver(config, numel, dtype, device, step)
    return step
