"""The trust-region engine: global pass, APTS local solves, and the ``TR`` baseline.

docs/method.md section 4.  One iteration at the iterate x with loss f, gradient g and radius r:

1. step s from the model m(s) = f + g^T s (+ 1/2 s^T B s), bounded by r in the chosen norm:
   ``first-order`` + ``step="cauchy"``: s = -r g / ||g||, decrease r ||g||_2^2 / ||g||
   (inf-norm: r ||g||_2^2 / ||g||_inf; 2-norm: r ||g||_2); ``step="sign"`` (inf-norm only): the exact
   minimiser of the linear model in the inf-ball, s = -r sign(g), decrease r ||g||_1;
   ``lsr1`` / ``lbfgs``: the exact minimiser of the quadratic model in the 2-ball of radius r
   (inf-norm: of radius sqrt(n) r, clipped to the inf-ball), replaced by the Cauchy point of the
   same model when it gives less than 0.1 x its decrease (N&W eq. 4.20; ``Counters.fallbacks``);
   with no pair stored yet, the first-order step.
2. pred = m(0) - m(s) for the step actually taken (after any projection, see ``box``), in the
   representation of B the solver used; rho = (f(x) - f(x + s)) / pred in float64, rho = 1 when
   both are at rounding level.
3. accept iff the trial loss and gradient are finite and rho >= eta1; otherwise restore x bitwise.
4. radius update by :func:`update_radius` with ||s|| (an interior step, ||s|| < 0.8 r, never
   grows the radius; a failure shrinks it to decrease x min(r, ||s||)).  A rejection at min_radius
   ends the run (the same step would be tried again).

Host synchronisation: two small transfers per iteration, the gradient norms (with a box, together
with the projected first-order step's decrease) before the trial, and the trial loss with the
trial gradient's largest magnitude after it (the scalars the rho-test needs); none after a
loss-only trial whose loss the evaluation already returned as a host float.
With ``agree`` (MPI callers), the values every branch depends on pass through it at those points.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import options
from .decomposition import Subdomain
from .solvers import make_solver

BOUNDARY_FRACTION = 0.8   # ||s|| >= 0.8 radius counts as a boundary step (N&W Alg. 6.2)
ROUNDING = 10.0           # |actual|, |pred| <= 10 eps max(1, |f|): rho = 1 (Conn, Gould, Toint 17.4.2)


def _where(condition, a, b):
    """``a if condition else b`` for host values; ``torch.where`` for device tensors (branch-free)."""
    if isinstance(condition, torch.Tensor):
        return torch.where(condition, a, b)
    return a if condition else b


def _floor(value, low):
    return value.clamp(min=low) if isinstance(value, torch.Tensor) else max(value, low)


def _ceiling(value, high):
    return value.clamp(max=high) if isinstance(value, torch.Tensor) else min(value, high)


def ratio(actual, pred, finite, loss, eps: float):
    """rho = actual / predicted decrease, the rule written once (docs/method.md section 4).

    rho = -inf when ``finite`` is False (a non-finite trial, or no decrease predicted); rho = 1 when
    the actual and the predicted decrease are both at rounding level, |actual|, |pred| <=
    10 eps max(1, |f|) with f = ``loss`` and eps that of the parameters' dtype (Conn, Gould, Toint
    section 17.4.2).  Host floats (the host engine, the coordinator) or float64 device tensors
    (:meth:`TrustRegionCore.run_on_device`): the same float64 operations either way.
    """
    rounding = _floor(abs(loss), 1.0) * (ROUNDING * eps)
    at_rounding = (abs(actual) <= rounding) & (abs(pred) <= rounding)
    quotient = actual / pred if isinstance(pred, torch.Tensor) or pred else math.nan
    return _where(finite, _where(at_rounding, 1.0, quotient), -math.inf)


def update_radius(radius, rho, *, eta1: float, eta2: float, decrease: float,
                  increase: float, min_radius: float, max_radius: float,
                  step_norm: float | None = None):
    """The radius rule, written once (docs/method.md section 4; Nocedal & Wright Alg. 4.1).

    ``step_norm`` is ||s|| in the trust-region norm; None means the step reached the boundary
    (||s|| = radius, every first-order step).  A step counts as reaching it when
    ||s|| >= 0.8 radius (SciPy's ``hits_boundary``, N&W Alg. 6.2).  Host floats, or float64 device
    tensors for ``radius`` and ``rho`` (branch-free, :meth:`TrustRegionCore.run_on_device`).

    ====================================  ===========================================
    rho                                   new radius
    ====================================  ===========================================
    rho < eta1 or NaN                     max(decrease * min(radius, ||s||), min_radius)
    eta1 <= rho <= eta2                   radius
    rho > eta2, ||s|| >= 0.8 radius       min(increase * radius, max_radius)
    rho > eta2, ||s|| < 0.8 radius        radius (an interior step says nothing about it)
    ====================================  ===========================================
    """
    shrunk = _floor(decrease * (radius if step_norm is None else min(radius, step_norm)), min_radius)
    grow = rho > eta2
    if step_norm is not None:
        grow = grow and step_norm >= BOUNDARY_FRACTION * radius
    kept = _where(grow, _ceiling(increase * radius, max_radius), radius)
    return _where(rho >= eta1, kept, shrunk)  # not rho >= eta1 also catches NaN


class TrustRegionConfig:
    """The constants of the engine (docs/method.md section 4): the ``trust-region`` keywords of
    :mod:`apts_mpi.options` (radius, max_radius, min_radius, eta1, eta2, decrease, increase, model,
    memory, norm, step), whose defaults and checks are written there; a bad value raises
    ``OptionError`` (a ValueError) with one message per rule."""

    def __init__(self, **keywords):
        vars(self).update(options.resolve("trust-region", keywords))

    @classmethod
    def checked(cls, **values) -> "TrustRegionConfig":
        """The constants from values that a wider table's :func:`options.resolve` has already
        checked (APTS's or TrustRegion's keywords, whose rules include the engine's): each value
        is checked once, there."""
        missing = set(options.options("trust-region")) ^ set(values)
        if missing:
            raise TypeError(f"TrustRegionConfig.checked needs exactly the trust-region keywords; "
                            f"mismatch: {', '.join(sorted(missing))}")
        config = cls.__new__(cls)
        vars(config).update(values)
        return config

    def radius_rule(self):
        return dict(eta1=self.eta1, eta2=self.eta2, decrease=self.decrease, increase=self.increase,
                    min_radius=self.min_radius, max_radius=self.max_radius)


def engine_configs(keywords: dict):
    """(the global pass's, the local phases' engine constants) from APTS's keywords: the
    trust-region keywords with ``global_model`` and ``local_model`` as their models."""
    base = {k: keywords[k] for k in options.options("trust-region") if k != "model"}
    return (TrustRegionConfig.checked(model=keywords["global_model"], **base),
            TrustRegionConfig.checked(model=keywords["local_model"], **base))


@dataclass
class Counters:
    """Running totals of one engine; ``rho`` and ``radius`` are those of the last iteration."""

    loss_evals: int = 0
    grad_evals: int = 0
    accepted: int = 0
    rejected: int = 0
    nonfinite: int = 0                # rejections because the trial loss or gradient was NaN/Inf
    fallbacks: int = 0                # quasi-Newton steps replaced by the Cauchy point
    memory_resets: int = 0            # quasi-Newton memories cleared (with a fallback)
    skipped_pairs: int = 0            # (s, y) pairs the quasi-Newton update refused
    rho: float = float("nan")
    radius: float = float("nan")


class TrustRegionCore:
    """Trust-region iterations on the coordinates of one :class:`Subdomain`, with its own flat buffers.

    ``evaluate(grad_out) -> loss`` evaluates the objective at the current parameters and writes the
    gradient restricted to the subdomain into ``grad_out``; it may reduce over ranks.  The loss may be
    a 0-dim tensor (it is read together with the trial gradient's norm, in one transfer).
    ``evaluate(None)`` asks for the loss alone: ``run(..., loss_only=True)`` makes that call for a
    trial whose gradient can never be used (the last iteration of a run of the first-order model);
    it is counted in ``loss_evals`` but not in ``grad_evals``, and ``grad_current`` is False after
    such a trial is accepted (``grad`` then belongs to the previous iterate).

    ``decide`` (optional) replaces the local accept/radius decision, e.g. by one computed on a
    coordinator rank and broadcast: ``decide(actual, pred, finite) -> (accept, rho, new_radius)``,
    by default :meth:`ratio_decision`.  ``agree`` (optional) makes every rank take the same branch:
    ``agree(values: list[float]) -> list[float]`` returns one designated rank's values (a Bcast);
    ``run`` passes ``[pred, stop]`` through it before each trial and ``[trial_loss, finite]`` after
    the trial evaluation, before the accept/radius decision.
    """

    def __init__(self, subdomain: Subdomain, config: TrustRegionConfig):
        self.subdomain, self.config = subdomain, config
        n, kw = subdomain.numel, dict(dtype=subdomain.dtype, device=subdomain.device)
        self.radius = config.radius
        self.counters = Counters(radius=self.radius)
        self.grad, self.trial_grad = torch.empty(n, **kw), torch.empty(n, **kw)
        self.step, self.saved = torch.empty(n, **kw), torch.empty(n, **kw)
        self.grad_current = True
        self.offset = None  # accumulated step u, allocated on the first boxed run
        self.solver = make_solver(config, n, **kw)  # the local solver (apts_mpi.solvers)
        self.qn = getattr(self.solver, "qn", None)  # its quasi-Newton matrix, whose pairs run stores
        # what ratio_decision needs beyond (actual, pred, finite): set by run before each decision
        self.step_norm, self.loss = None, 0.0

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"radius": self.radius, "counters": asdict(self.counters), **self.solver.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.radius = float(state["radius"])
        self.counters = Counters(**state["counters"])
        self.solver.load_state_dict(state)

    # -- the iteration ----------------------------------------------------------------------------
    def counted_evaluation(self, evaluate, grad_out):
        """``evaluate(grad_out)``, counted as one loss and (grad_out given) one gradient evaluation."""
        loss = evaluate(grad_out)
        self.counters.loss_evals += 1
        self.counters.grad_evals += grad_out is not None
        return loss

    def _propose(self, radius: float, gtol: float = 0.0, box: float | None = None):
        """The local solver's step for ``radius`` into self.step (clipped by ``box``, see
        :meth:`_project`); return (model decrease, ||s|| or None).

        The decrease is 0 (no step) when ||g||_inf <= gtol or the gradient is not finite.  The norm
        is None for a step on the boundary by construction (every first-order step).  A solver that
        needs only g and its norms (``device``) forms the step on the device and it is projected
        before anything is read: the norms and the projected step's decrease reach the host in one
        transfer.  (With no step to take, self.step holds whatever that gives; nothing reads it.)
        """
        g, s, solver = self.grad, self.step, self.solver
        norm = torch.linalg.vector_norm  # reductions: no n-sized temporaries
        norms = [norm(g, math.inf), g.dot(g), norm(g, 1)]
        on_device = solver.device and not self.partial_gradient
        if on_device:
            solver.form(g, s, radius, *norms)
            if box is not None:
                norms.append(-g.dot(self._clip(box)))
        values = torch.stack(norms).tolist()
        values[:3] = self._reduce_norms(values[:3])
        g_inf, g_2sq, g_1 = values[:3]
        if not (g_inf > gtol and math.isfinite(g_2sq)):
            return 0.0, None
        if on_device:
            pred = solver.decrease(radius, g_inf, g_2sq, g_1)
            return (values[3] if box is not None and pred > 0 else pred), None
        if box is not None and self.partial_gradient:
            raise ValueError("a box needs the whole gradient on this rank")
        pred, step_norm = solver.solve(self, radius, g_inf, g_2sq, g_1)  # on the host
        return (self._project(box) if box is not None and pred > 0 else pred), step_norm

    #: True where self.grad is one block of a gradient split over ranks (model-parallel APTS): the
    #: norms are reduced by :meth:`_reduce_norms` before the step is formed (on the host)
    partial_gradient = False

    def _reduce_norms(self, values):
        """[||g||_inf, ||g||_2^2, ||g||_1] of the whole gradient from this rank's (a subclass reduces)."""
        return values

    def _clip(self, box: float) -> torch.Tensor:
        """Clip u + s to the box |u_i| <= box: s becomes the step actually taken; returns s."""
        u, s = self.offset, self.step
        return s.add_(u).clamp_(-box, box).sub_(u)

    def _project(self, box: float) -> float:
        """:meth:`_clip`, and the decrease of the clipped step (quasi-Newton model)."""
        self._clip(box)
        if self.qn is not None and len(self.qn):
            return self.qn.model_decrease(self.grad, self.step)
        return -float(self.grad.dot(self.step))

    def ratio_decision(self, actual: float, pred: float, finite: bool):
        """The classical rule: (accept iff finite and rho >= eta1, rho, the updated radius).

        rho = 1 when the actual and predicted decrease are both at rounding level,
        |actual|, |pred| <= 10 eps max(1, |f|) (Conn, Gould, Toint section 17.4.2); the radius rule
        sees ``self.step_norm`` (set by ``run``).
        """
        rho = ratio(actual, pred, finite, self.loss, torch.finfo(self.step.dtype).eps)
        accept = finite and rho >= self.config.eta1
        return accept, rho, update_radius(self.radius, rho, **self.config.radius_rule(),
                                          step_norm=self.step_norm)

    def run(self, evaluate, iters: int, loss: float | None = None, box: float | None = None,
            decide=None, gtol: float = 0.0, agree=None, loss_only: bool = False,
            cap: bool = False) -> float:
        """At most ``iters`` iterations from the current parameters; returns the final loss.

        ``loss`` given means ``self.grad`` already holds the gradient at the current point (no
        evaluation needed).  ``box`` keeps the accumulated step u (``self.offset``, reset to 0 here)
        inside ||u||_inf <= box: every step radius is min(radius, box) and u + s is clipped to the
        box, the model decrease being that of the clipped step (APTS local phase).  Stops early
        when ||g||_inf <= ``gtol``, when no step can decrease the model (only with ``box``: the box
        is full), or when a step is rejected with the radius already at ``min_radius`` (the same
        step would be tried again).  ``agree``, ``decide`` and ``loss_only``: class docstring.
        ``cap`` (with ``box``): the radius never exceeds the box, so a radius grown past it cannot
        shrink back to the box and propose the rejected step again.
        Loss differences are formed in float64 (Python floats).
        """
        if loss is None:
            loss = float(self.counted_evaluation(evaluate, self.grad))
            self.grad_current = True
        if box is not None:
            if self.offset is None:
                self.offset = torch.zeros_like(self.grad)
            self.offset.zero_()
        decide = decide or self.ratio_decision
        agree = agree or (lambda values: values)
        for it in range(iters):
            radius = self.radius if box is None else min(self.radius, box)
            pred, step_norm = self._propose(radius, gtol, box)
            pred, stop = agree([pred, float(not pred > 0)])
            if stop:
                break  # stationary (or a full box): nothing to try
            need_grad = not loss_only or self.qn is not None or it < iters - 1
            self.subdomain.gather(self.saved)
            self.subdomain.add_(self.step)
            trial = self.counted_evaluation(evaluate, self.trial_grad if need_grad else None)
            if need_grad or isinstance(trial, torch.Tensor):  # one transfer for both
                trial = torch.as_tensor(trial, dtype=self.step.dtype, device=self.step.device).reshape(())
                g_max = torch.linalg.vector_norm(self.trial_grad, math.inf) if need_grad else torch.zeros_like(trial)
                trial, g_max = torch.stack([trial, g_max]).tolist()
            else:  # a host float (loss only): rounded to the parameters' dtype on the host, as above
                trial, g_max = torch.tensor(trial, dtype=self.step.dtype).item(), 0.0
            trial, finite = agree([trial, float(math.isfinite(trial) and math.isfinite(g_max))])
            finite = bool(finite)
            self.counters.nonfinite += not finite
            at_floor = self.radius <= self.config.min_radius
            boundary = step_norm is None or step_norm >= BOUNDARY_FRACTION * radius
            self.step_norm, self.loss = (None if boundary else step_norm), loss
            accept, rho, self.radius = decide(loss - trial, pred, finite)
            if cap and box is not None:
                self.radius = min(self.radius, box)
            if self.qn is not None and finite:
                stored = self.qn.update(self.step, self.trial_grad.sub(self.grad, alpha=1.0))
                self.counters.skipped_pairs += not stored
            if accept:
                loss = trial
                self.grad, self.trial_grad = self.trial_grad, self.grad
                self.grad_current = need_grad
                if box is not None:
                    self.offset.add_(self.step)
                self.counters.accepted += 1
            else:
                self.subdomain.scatter(self.saved)
                self.counters.rejected += 1
            self.counters.rho, self.counters.radius = rho, self.radius
            if not accept and at_floor:
                break  # rejected at the radius floor: the next step would be the same
        return loss

    def run_on_device(self, evaluate, iters: int, loss, box: float | None = None,
                      read=(), cap: bool = False) -> list[float]:
        """:meth:`run` with the first-order model and every decision taken on the device: no host
        synchronisation until one transfer at the end (GPU: the kernels of all ``iters`` iterations
        are queued without waiting).

        The same iterates, losses, radius, rho and accept/reject counts as ``run(evaluate, iters,
        loss=loss, box=box, loss_only=True)`` (no ``gtol``, ``decide`` or ``agree``), bit for bit:
        stop, rho, acceptance and the radius rule are the same float64 operations on the same values,
        written branch-free (``torch.where``).  Where ``run`` stops early (a zero or non-finite
        gradient, a full box, a rejection at ``min_radius``), the remaining iterations here evaluate
        the unchanged point and discard the result: they are counted in ``loss_evals`` and
        ``grad_evals`` because they are spent.  ``loss``: f at the current point (a float or a 0-dim
        tensor), ``self.grad`` holding its gradient; ``evaluate`` may return a 0-dim tensor.
        Returns the host values of [final loss, *read] (``read``: 0-dim tensors the caller wants in
        the same transfer).
        """
        if not self.solver.device or self.qn is not None or self.partial_gradient:
            raise ValueError("run_on_device needs a first-order step formed on the device and the "
                             "whole gradient")
        cfg, s, dev = self.config, self.step, self.step.device
        f64 = dict(dtype=torch.float64, device=dev)

        def as_f64(v):
            return v.to(**f64).reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v), **f64)

        loss = as_f64(loss)
        radius = torch.tensor(self.radius, **f64)
        going = torch.ones((), dtype=torch.bool, device=dev)  # run has not stopped yet
        grad_current = going.clone()
        tally = torch.zeros(3, **f64)  # accepted, rejected, non-finite trials
        rho_last = torch.tensor(self.counters.rho, **f64)
        eps = torch.finfo(s.dtype).eps  # ratio's rounding level
        if box is not None:
            if self.offset is None:
                self.offset = torch.zeros_like(self.grad)
            self.offset.zero_()
        norm = torch.linalg.vector_norm
        for it in range(iters):
            r = radius if box is None else radius.clamp(max=box)
            g = self.grad
            norms = [norm(g, math.inf), g.dot(g), norm(g, 1)]
            self.solver.form(g, s, r, *norms)
            g_inf, g_2sq, g_1 = (v.double() for v in norms)
            pred = self.solver.decrease(r, g_inf, g_2sq, g_1)
            if box is not None:
                pred = torch.where(pred > 0, -g.dot(self._clip(box)).double(), pred)
            going &= (g_inf > 0) & torch.isfinite(g_2sq) & (pred > 0)
            s.masked_fill_(~going, 0)
            need_grad = it < iters - 1
            self.subdomain.gather(self.saved)
            self.subdomain.add_(s)
            trial = self.counted_evaluation(evaluate, self.trial_grad if need_grad else None)
            trial = torch.as_tensor(trial, dtype=s.dtype, device=dev).reshape(()).double()
            finite = torch.isfinite(trial)
            if need_grad:
                finite &= torch.isfinite(norm(self.trial_grad, math.inf))
            rho = ratio(loss - trial, pred, finite, loss, eps)
            good = rho >= cfg.eta1
            accept = going & finite & good
            updated = update_radius(radius, rho, **cfg.radius_rule())
            if cap and box is not None:
                updated = updated.clamp(max=box)
            at_floor = radius <= cfg.min_radius
            radius = torch.where(going, updated, radius)
            tally += torch.stack([accept, going & ~accept, going & ~finite])
            rho_last = torch.where(going, rho, rho_last)
            loss = torch.where(accept, trial, loss)
            torch.where(accept, self.trial_grad, g, out=g)
            grad_current = torch.where(accept, need_grad, grad_current)
            s.masked_fill_(~accept, 0)  # a rejection restores the saved point (+ a zero step)
            self.subdomain.scatter(self.saved)
            self.subdomain.add_(s)
            if box is not None:
                self.offset.add_(s)
            going &= accept | ~at_floor
        values = torch.cat([torch.stack([loss, rho_last, radius, grad_current.double()]), tally,
                            *(as_f64(v).reshape(1) for v in read)]).tolist()
        (loss, self.counters.rho, self.radius, current), (acc, rej, bad) = values[:4], values[4:7]
        self.counters.radius, self.grad_current = self.radius, bool(current)
        self.counters.accepted += int(acc)
        self.counters.rejected += int(rej)
        self.counters.nonfinite += int(bad)
        return [loss, *values[7:]]

    # -- what a driver that owns its iteration (APTS) may set and count ---------------------------
    def count_evaluation(self, loss: int = 1, grad: int = 1) -> None:
        """Count evaluations made outside :meth:`run` (by the caller's own closure) in ``counters``."""
        self.counters.loss_evals += loss
        self.counters.grad_evals += grad

    def set_gradient(self, grad: torch.Tensor) -> None:
        """Copy the gradient at the current point into the engine: the next ``run(..., loss=f)``
        starts from it without evaluating again."""
        self.grad.copy_(grad)

    def set_radius(self, radius: float) -> None:
        """The radius the next :meth:`run` starts from (e.g. a local budget, or the caller's own)."""
        self.radius = float(radius)


class TrustRegion(torch.optim.Optimizer):
    """Trust-region optimiser for PyTorch with ``step(closure)``; no learning rate.

    Each ``step`` evaluates the closure at the current parameters, then runs ``max_iters`` trust-region
    iterations on that closure (see the module docstring for the iteration).  The closure zeroes the
    gradients, computes the loss, calls ``backward()`` and returns the loss.

    Keywords: those of the ``tr`` table in :mod:`apts_mpi.options`, where their defaults and
    checks are written once: the engine's constants (``radius``, ``max_radius``, ``min_radius``,
    ``eta1``, ``eta2``, ``decrease``, ``increase``, ``model``, ``memory``, ``norm``, ``step``),
    ``max_iters`` (iterations per ``step`` call, on its closure) and ``tolerance_grad`` (stop those
    iterations once ||g||_inf <= tolerance_grad); and ``agree`` (see :class:`TrustRegionCore`; for
    data-parallel use, a Bcast from one rank; not stored in the parameter group).

    The closure may be called for its loss alone (the last trial of a ``step`` with the first-order
    model, whose gradient can never be used): it still runs as usual (``backward`` included, the
    closure contract), its gradient is simply not read, and the call is counted in ``loss_evals``
    but not ``grad_evals``.

    After each step, ``counters`` holds loss and gradient evaluations, accepted and rejected steps, the
    last rho and the radius.  ``state_dict()`` carries radius, counters and quasi-Newton pairs so that a
    resumed run continues on the identical trajectory.

    Limitations: one parameter group; all parameters share one dtype and device.
    """

    def __init__(self, params, agree=None, **keywords):
        values = options.resolve("tr", keywords)
        max_iters, tolerance_grad = values.pop("max_iters"), values.pop("tolerance_grad")
        config = TrustRegionConfig.checked(**values)
        super().__init__(params, dict(vars(config), max_iters=max_iters, tolerance_grad=tolerance_grad))
        if len(self.param_groups) != 1:
            raise ValueError("TrustRegion supports a single parameter group")
        self._params = self.param_groups[0]["params"]
        self._core = TrustRegionCore(Subdomain.whole(self._params), config)
        self._max_iters, self._gtol, self._agree = max_iters, float(tolerance_grad), agree

    @property
    def counters(self) -> Counters:
        return self._core.counters

    @property
    def radius(self) -> float:
        return self._core.radius

    @torch.no_grad()
    def step(self, closure):
        if closure is None:
            raise ValueError("TrustRegion.step needs a closure that returns the loss")
        closure = torch.enable_grad()(closure)
        sub = self._core.subdomain

        def evaluate(grad_out):
            loss = closure()
            if grad_out is not None:
                sub.gather(grad_out, grad=True)
            return loss.detach()

        return self._core.run(evaluate, self._max_iters, gtol=self._gtol, agree=self._agree,
                              loss_only=True)

    def state_dict(self):
        self.state[self._params[0]]["trust_region"] = self._core.state_dict()
        return super().state_dict()

    def load_state_dict(self, state_dict):
        # torch's loader would cast the engine state (strings included) element by element: take it
        # out, load the rest, and hand it to the engine as it was saved.
        state_dict = {**state_dict, "state": {k: dict(v) for k, v in state_dict["state"].items()}}
        engine = state_dict["state"][0].pop("trust_region")
        super().load_state_dict(state_dict)
        self._core.load_state_dict(engine)
        self.state[self._params[0]]["trust_region"] = engine
