"""The trust-region engine: global pass, APTS local solves, and the ``TR`` baseline.

apts-method.md section 4.  One iteration at the iterate x with loss f, gradient g and radius r:

1. step s from the model m(s) = f + g^T s (+ 1/2 s^T B s), bounded by r in the chosen norm:
   ``first-order`` + ``step="cauchy"``: s = -r g / ||g||, decrease r ||g||_2^2 / ||g||
   (inf-norm: r ||g||_2^2 / ||g||_inf; 2-norm: r ||g||_2); ``step="sign"`` (inf-norm only): the exact
   minimiser of the linear model in the inf-ball, s = -r sign(g), decrease r ||g||_1;
   ``lsr1`` / ``lbfgs``: the exact minimiser of the quadratic model in the 2-ball of radius r (which
   also satisfies an inf-norm bound r), decrease m(0) - m(s).
2. pred = m(0) - m(s) for the step actually taken (after any projection, see ``box``);
   rho = (f(x) - f(x + s)) / pred.
3. accept iff the trial loss and gradient are finite and rho >= eta1; otherwise restore x bitwise.
4. radius update by :func:`update_radius`.

Host synchronisation: two small transfers per iteration, the gradient norms before the step and the
trial loss with the trial gradient's largest magnitude after it (the scalars the rho-test needs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .decomposition import Subdomain

MODELS = ("first-order", "lsr1", "lbfgs")
NORMS = ("inf", "2")
STEPS = ("cauchy", "sign")


def update_radius(radius: float, rho: float, *, eta1: float = 0.25, eta2: float = 0.75,
                  decrease: float = 0.5, increase: float = 2.0, min_radius: float = 1e-4,
                  max_radius: float = 0.1) -> float:
    """The radius rule, written once (apts-method.md section 4).

    ====================  ===================================
    rho                   new radius
    ====================  ===================================
    rho < eta1 or NaN     max(decrease * radius, min_radius)
    eta1 <= rho <= eta2   radius
    rho > eta2            min(increase * radius, max_radius)
    ====================  ===================================
    """
    if not rho >= eta1:  # also catches NaN
        return max(decrease * radius, min_radius)
    if rho > eta2:
        return min(increase * radius, max_radius)
    return radius


@dataclass
class TrustRegionConfig:
    """The constants of the engine, validated with one message per invariant."""

    radius: float = 0.01
    max_radius: float = 0.1
    min_radius: float = 1e-4
    eta1: float = 0.25
    eta2: float = 0.75
    decrease: float = 0.5
    increase: float = 2.0
    model: str = "first-order"
    memory: int = 5
    norm: str = "inf"
    step: str = "cauchy"

    def __post_init__(self):
        for name in ("radius", "max_radius", "min_radius", "eta1", "eta2", "decrease", "increase"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
            setattr(self, name, float(value))
        if not self.min_radius > 0:
            raise ValueError(f"min_radius must be > 0; got {self.min_radius}")
        if not self.min_radius <= self.max_radius:
            raise ValueError(f"min_radius ({self.min_radius}) must not exceed max_radius ({self.max_radius})")
        if not self.min_radius <= self.radius <= self.max_radius:
            raise ValueError(f"radius ({self.radius}) must lie in [min_radius, max_radius] = "
                             f"[{self.min_radius}, {self.max_radius}]")
        if not 0 < self.eta1 < self.eta2 < 1:
            raise ValueError(f"need 0 < eta1 < eta2 < 1; got eta1={self.eta1}, eta2={self.eta2}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must lie in (0, 1); got {self.decrease}")
        if not self.increase >= 1:
            raise ValueError(f"increase must be >= 1; got {self.increase}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}; got {self.model!r}")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"memory must be a positive integer; got {self.memory!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if self.step not in STEPS:
            raise ValueError(f"step must be one of {', '.join(STEPS)}; got {self.step!r}")
        if self.step == "sign" and (self.norm != "inf" or self.model != "first-order"):
            raise ValueError("step='sign' is the inf-norm minimiser of the first-order model: "
                             "it needs norm='inf' and model='first-order'")

    def radius_rule(self):
        return dict(eta1=self.eta1, eta2=self.eta2, decrease=self.decrease, increase=self.increase,
                    min_radius=self.min_radius, max_radius=self.max_radius)


@dataclass
class Counters:
    """Running totals of one engine; ``rho`` and ``radius`` are those of the last iteration."""

    loss_evals: int = 0
    grad_evals: int = 0
    accepted: int = 0
    rejected: int = 0
    nonfinite: int = 0                # rejections because the trial loss or gradient was NaN/Inf
    rho: float = float("nan")
    radius: float = float("nan")


class TrustRegionCore:
    """Trust-region iterations on the coordinates of one :class:`Subdomain`, with its own flat buffers.

    ``evaluate(grad_out) -> loss`` evaluates the objective at the current parameters and writes the
    gradient restricted to the subdomain into ``grad_out``; it may reduce over ranks.  The loss may be
    a 0-dim tensor (it is read together with the trial gradient's norm, in one transfer).  ``decide``
    (optional) replaces the local accept/radius decision, e.g. by one computed on a coordinator rank
    and broadcast: ``decide(actual, pred, finite) -> (accept, rho, new_radius)``, by default
    :meth:`ratio_decision`.
    """

    def __init__(self, subdomain: Subdomain, config: TrustRegionConfig):
        self.subdomain, self.config = subdomain, config
        n, kw = subdomain.numel, dict(dtype=subdomain.dtype, device=subdomain.device)
        self.radius = config.radius
        self.counters = Counters(radius=self.radius)
        self.grad, self.trial_grad = torch.empty(n, **kw), torch.empty(n, **kw)
        self.step, self.saved = torch.empty(n, **kw), torch.empty(n, **kw)
        self.offset = None  # accumulated step u, allocated on the first boxed run
        self.qn = None
        if config.model != "first-order":
            from .quasi_newton import LimitedMemoryMatrix
            self.qn = LimitedMemoryMatrix(config.model, config.memory, n, **kw)

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"radius": self.radius, "counters": asdict(self.counters)}
        if self.qn is not None:
            state["qn"] = self.qn.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.radius = float(state["radius"])
        self.counters = Counters(**state["counters"])
        if self.qn is not None:
            self.qn.load_state_dict(state["qn"])

    # -- the iteration ----------------------------------------------------------------------------
    def counted_evaluation(self, evaluate, grad_out):
        """``evaluate(grad_out)``, counted as one loss and one gradient evaluation."""
        loss = evaluate(grad_out)
        self.counters.loss_evals += 1
        self.counters.grad_evals += 1
        return loss

    def _propose(self, radius: float, gtol: float = 0.0) -> float:
        """Write the step for ``radius`` into self.step; return the model decrease (<= 0: none).

        Returns 0 (no step) when ||g||_inf <= gtol or the gradient is not finite.
        """
        g, s, cfg = self.grad, self.step, self.config
        norm = torch.linalg.vector_norm  # reductions: no n-sized temporaries
        g_inf, g_2sq, g_1 = torch.stack([norm(g, math.inf), g.dot(g), norm(g, 1)]).tolist()
        if not (g_inf > gtol and math.isfinite(g_2sq)):
            return 0.0
        if self.qn is not None and len(self.qn):
            step, _ = self.qn.solve(g, radius)
            s.copy_(step)
            return self.qn.model_decrease(g, s)
        if cfg.step == "sign":
            torch.sign(g, out=s).mul_(-radius)
            return radius * g_1
        g_norm = g_inf if cfg.norm == "inf" else math.sqrt(g_2sq)
        torch.mul(g, -radius / g_norm, out=s)
        return radius * g_2sq / g_norm

    def _project(self, box: float) -> float:
        """Clip u + s to the box |u_i| <= box, make s the step actually taken, return its decrease."""
        u, s = self.offset, self.step
        s.add_(u).clamp_(-box, box).sub_(u)
        if self.qn is not None and len(self.qn):
            return self.qn.model_decrease(self.grad, s)
        return -float(self.grad.dot(s))

    def ratio_decision(self, actual: float, pred: float, finite: bool):
        """The classical rule: (accept iff finite and rho >= eta1, rho, the updated radius)."""
        rho = actual / pred if finite else float("-inf")
        accept = finite and rho >= self.config.eta1
        return accept, rho, update_radius(self.radius, rho, **self.config.radius_rule())

    def run(self, evaluate, iters: int, loss: float | None = None, box: float | None = None,
            decide=None, gtol: float = 0.0, agree=None) -> float:
        """At most ``iters`` iterations from the current parameters; returns the final loss.

        ``loss`` given means ``self.grad`` already holds the gradient at the current point (no
        evaluation needed).  ``box`` keeps the accumulated step u (``self.offset``, reset to 0 here)
        inside ||u||_inf <= box: every step radius is min(radius, box) and u + s is clipped to the
        box, the model decrease being that of the clipped step (APTS local phase).  Stops early
        when ||g||_inf <= ``gtol`` or no step can decrease the model.

        ``agree(values: list[float]) -> list[float]`` (None: identity) makes the ranks that run this
        loop together take the same decisions: it returns one designated rank's values (a Bcast).
        ``[pred, stop]`` pass through it before the trial, ``[trial loss, finite]`` after it.
        """
        if loss is None:
            loss = float(self.counted_evaluation(evaluate, self.grad))
        if box is not None:
            if self.offset is None:
                self.offset = torch.zeros_like(self.grad)
            self.offset.zero_()
        decide = decide or self.ratio_decision
        agree = agree or (lambda values: values)
        for _ in range(iters):
            radius = self.radius if box is None else min(self.radius, box)
            pred = self._propose(radius, gtol)
            if box is not None and pred > 0:
                pred = self._project(box)
            pred, stop = agree([pred, float(not pred > 0)])
            if stop:
                break  # stationary (or a model that cannot decrease): nothing to try
            self.subdomain.gather(self.saved)
            self.subdomain.add_(self.step)
            trial = torch.as_tensor(self.counted_evaluation(evaluate, self.trial_grad),
                                    dtype=self.step.dtype, device=self.step.device).reshape(())
            trial, g_max = torch.stack([trial, torch.linalg.vector_norm(self.trial_grad, math.inf)]).tolist()
            trial, finite = agree([trial, float(math.isfinite(trial) and math.isfinite(g_max))])
            finite = bool(finite)
            self.counters.nonfinite += not finite
            accept, rho, self.radius = decide(loss - trial, pred, finite)
            if self.qn is not None and finite:
                self.qn.update(self.step, self.trial_grad.sub(self.grad, alpha=1.0))
            if accept:
                loss = trial
                self.grad, self.trial_grad = self.trial_grad, self.grad
                if box is not None:
                    self.offset.add_(self.step)
                self.counters.accepted += 1
            else:
                self.subdomain.scatter(self.saved)
                self.counters.rejected += 1
            self.counters.rho, self.counters.radius = rho, self.radius
        return loss

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

    Keywords (validated, one message per invariant): ``radius=0.01``, ``max_radius=0.1``,
    ``min_radius=1e-4``, ``eta1=0.25``, ``eta2=0.75``, ``decrease=0.5``, ``increase=2.0``,
    ``model="first-order" | "lsr1" | "lbfgs"``, ``memory=5``, ``norm="inf" | "2"``,
    ``step="cauchy" | "sign"``, ``max_iters=1`` (iterations per ``step`` call, on its closure),
    ``tolerance_grad=0.0`` (stop those iterations once ||g||_inf <= tolerance_grad).

    After each step, ``counters`` holds loss and gradient evaluations, accepted and rejected steps, the
    last rho and the radius.  ``state_dict()`` carries radius, counters and quasi-Newton pairs so that a
    resumed run continues on the identical trajectory.

    Limitations: one parameter group; all parameters share one dtype and device.
    """

    def __init__(self, params, radius=0.01, max_radius=0.1, min_radius=1e-4, eta1=0.25, eta2=0.75,
                 decrease=0.5, increase=2.0, model="first-order", memory=5, norm="inf",
                 step="cauchy", max_iters=1, tolerance_grad=0.0):
        config = TrustRegionConfig(radius, max_radius, min_radius, eta1, eta2, decrease, increase,
                                   model, memory, norm, step)
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer; got {max_iters!r}")
        if not (isinstance(tolerance_grad, (int, float)) and tolerance_grad >= 0):
            raise ValueError(f"tolerance_grad must be a number >= 0; got {tolerance_grad!r}")
        super().__init__(params, dict(vars(config), max_iters=max_iters, tolerance_grad=tolerance_grad))
        if len(self.param_groups) != 1:
            raise ValueError("TrustRegion supports a single parameter group")
        self._params = self.param_groups[0]["params"]
        self._core = TrustRegionCore(Subdomain.whole(self._params), config)
        self._max_iters, self._gtol = max_iters, float(tolerance_grad)

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
            sub.gather(grad_out, grad=True)
            return loss.detach()

        return self._core.run(evaluate, self._max_iters, gtol=self._gtol)

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
