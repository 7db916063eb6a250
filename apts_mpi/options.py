"""Every optimiser keyword, written once: its default, type, allowed values and check.

The YAML config (``optimizer:`` section), the constructors (:class:`~apts_mpi.APTS`,
:class:`~apts_mpi.TrustRegion`, the data-parallel baselines) and the command line all read their
keywords from :data:`METHODS` through :func:`resolve`.  A new keyword is one :class:`Option` line
in the table of its method (and the constructor's use of it).

Each rule has one message, ``<key> <rule>; got <value>``; the config prefixes the key with
``optimizer.``.  The config's own sections and the problems' ``data.*`` keys are written as
:class:`Option` lines too and checked by the same :func:`check_keys`.  Cross-key invariants (``0 < eta1 < eta2 < 1``, the radius within its bounds, the
sign step's requirements) are :data:`RULES`, checked after every key passed its own check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import InputError
from .solvers import STEPS

NUMBER = (int, float)


class OptionError(InputError):
    """A keyword that cannot run (an InputError); ``key`` names it (without the ``optimizer.`` prefix)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Option:
    """One keyword: ``check(value)`` is True for an allowed value, ``rule`` says which (after the name)."""

    name: str
    default: Any
    types: Any
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    help: str = ""
    in_config: bool = True  # False: a constructor keyword that the YAML config does not carry

    def validate(self, value, prefix: str = ""):
        """The value, checked (ints promoted to float where a number is expected); raises OptionError."""
        key = prefix + self.name
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        if isinstance(value, bool) and bool not in types:
            raise OptionError(self.name, f"{key} must be {type_name(types)}; got {value!r}")
        if types == NUMBER and isinstance(value, int):
            value = float(value)
        if not isinstance(value, types):
            raise OptionError(self.name, f"{key} must be {type_name(types)}; got "
                                         f"{type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise OptionError(self.name, f"{key} must be a finite number; got {value!r}")
        if value is not None and self.check is not None and not self.check(value):
            raise OptionError(self.name, f"{key} {self.rule}; got {value!r}")
        return value


def type_name(types) -> str:
    """The types a message expects, in words: (int, NoneType) -> "an integer or null"."""
    types = types if isinstance(types, tuple) else (types,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def choice(*allowed):
    return dict(check=lambda v: v in allowed, rule=f"must be one of {', '.join(allowed)}")


def at_least(k):
    return dict(check=lambda v: v >= k, rule=f"must be an integer >= {k}")


POSITIVE = dict(check=lambda v: v > 0, rule="must be > 0")
NONNEGATIVE = dict(check=lambda v: v >= 0, rule="must be >= 0")
POSITIVE_INT = dict(check=lambda v: v >= 1, rule="must be a positive integer")
MODELS = ("first-order", "lsr1", "lbfgs")
DECOMPOSITIONS = ("balanced", "random-tensors", "flat", "stages", "cost")


def _local_batch_allowed(v):
    return v == "shard" if isinstance(v, str) else 0 < v <= 1


_models = dict(check=lambda v: v in MODELS,
               rule=f"must be one of {', '.join(MODELS)} (local_model and global_model)")

# The trust-region engine (docs/method.md section 4): the authors' March 2024 constants.
TRUST_REGION = (
    Option("radius", 0.01, NUMBER, **POSITIVE, help="initial trust-region radius Delta_0"),
    Option("max_radius", 0.1, NUMBER, **POSITIVE, help="largest radius Delta_max"),
    Option("min_radius", 1e-4, NUMBER, **POSITIVE, help="smallest radius Delta_min"),
    Option("eta1", 0.25, NUMBER, help="accept a step iff rho >= eta1; shrink the radius below it"),
    Option("eta2", 0.75, NUMBER, help="grow the radius when rho > eta2"),
    Option("decrease", 0.5, NUMBER, check=lambda v: 0 < v < 1, rule="must lie in (0, 1)",
           help="radius factor after a poor step"),
    Option("increase", 2.0, NUMBER, check=lambda v: v >= 1, rule="must be >= 1",
           help="radius factor after a very good step"),
    Option("norm", "inf", str, **choice("inf", "2"), help="norm of the trust region"),
    Option("step", "cauchy", str, **choice(*STEPS),
           help="first-order step, a local solver of apts_mpi.solvers: Cauchy point, sign step "
                "(inf-norm only) or Adam's direction scaled to the radius"),
    Option("memory", 5, int, **POSITIVE_INT, help="pairs kept by a limited-memory model"),
    Option("scaling", "none", str, **choice("none", "adam"),
           help="trust-region norm ||W s||: none (W = 1) or adam (W from the bias-corrected second "
                "moment of the gradients, kept across iterations; apts_mpi/solvers/scaled.py)"),
)

# torch.optim.LBFGS's stopping tests within a step call (null: torch's 1e-7 and 1e-9; 0 runs every
# iteration of max_iter, e.g. to converge a PINN as far as it goes)
LBFGS_TOLERANCES = (
    Option("tolerance_grad", None, (int, float, type(None)), **NONNEGATIVE,
           help="stop a step call once max |g| <= tolerance_grad (null: torch's 1e-7)"),
    Option("tolerance_change", None, (int, float, type(None)), **NONNEGATIVE,
           help="stop a step call once a step or loss change <= tolerance_change (null: torch's 1e-9)"),
)

METHODS: dict[str, tuple[Option, ...]] = {
    # the engine's constants alone (TrustRegionConfig)
    "trust-region": TRUST_REGION + (
        Option("model", "first-order", str, **_models, help="model of f: first order or quasi-Newton"),
    ),
    "apts": TRUST_REGION + (
        Option("subdomains", None, (int, type(None)), **at_least(1),
               help="number of subdomains (default: world size / replicas)"),
        Option("decomposition", "balanced", str, **choice(*DECOMPOSITIONS),
               help="how the parameters are split into subdomains"),
        Option("local_iters", 5, int, **at_least(1), help="trust-region iterations per local phase"),
        Option("local_fraction", 1.0, NUMBER, check=lambda v: 0 < v <= 1, rule="must lie in (0, 1]",
               help="local budget b = local_fraction * Delta"),
        Option("local_model", "first-order", str, **_models, help="model of the local phases"),
        Option("acceptance", "ratio", str, **choice("ratio", "none", "nonmonotone"),
               help="the coordinator's rule for the assembled step"),
        Option("window", 5, int, **at_least(1), help="accepted losses a nonmonotone test looks back at"),
        Option("global_iters", 1, int, **at_least(0), help="trust-region iterations of the global pass"),
        Option("global_model", "first-order", str, **_models, help="model of the global pass"),
        Option("foc", False, bool, help="add the first-order-consistency term to the local objectives"),
        Option("replicas", 1, int, **at_least(1), help="ranks sharing one subdomain's minibatch"),
        Option("micro_batch", None, (int, type(None)), **at_least(1),
               help="evaluate a rank's share in chunks of this many samples (bounded memory)"),
        Option("model_parallel", False, bool,
               help="rank d holds only block d of an nn.Sequential (needs decomposition 'stages')"),
        Option("autocast", "none", str, **choice("none", "bf16"),
               help="local phases' forward passes under torch.autocast to bfloat16 (losses, rho, sums "
                    "stay in the parameters' dtype)"),
        Option("local_batch", 1.0, (int, float, str), check=_local_batch_allowed,
               rule="must be a fraction in (0, 1] or 'shard'",
               help="part of the minibatch a local phase uses: a fraction of its pieces, or 'shard'"),
        Option("space", "parameters", str, **choice("parameters", "data"),
               help="subdomains of the parameters (APTS_P) or shards of the minibatch (APTS_D)"),
        Option("local_decisions", "host", str, **choice("host", "device"),
               help="local accept/reject and radius on the host, or branch-free on the device (one "
                    "transfer per local phase; first-order local model, replicas 1)"),
        Option("radius_control", "global", str, **choice("global", "combined"),
               help="global: the global pass's radius becomes Delta (the papers); combined: the "
                    "combined step's rho drives Delta (its norm taken relative to the local budget), "
                    "the global pass keeps a radius of its own, local radii never exceed the budget"),
        Option("damping", False, bool,
               help="before rejecting the combined step s, try theta_k + s/2 (the quadratic along s "
                    "through f(theta_k), grad f(theta_k)^T s and f(theta_k + s) predicts its decrease)"),
        Option("data_pred", "gradient", str, **choice("gradient", "local"),
               help="space='data': pred = -grad f(theta_k)^T s (gradient) or the weighted mean of "
                    "the shards' local decreases, sum_d w_d delta_d (local)"),
    ),
    # APTS as the second stage of the usual PINN schedule: data-parallel Adam steps first, then
    # APTS (every keyword of the apts table) from where Adam ended
    "adam-apts": (
        Option("lr", 1e-3, NUMBER, **POSITIVE, help="Adam's learning rate"),
        Option("adam_steps", 1000, int, **at_least(0), help="steps taken with Adam before APTS"),
    ),
    "tr": TRUST_REGION + (
        Option("model", "first-order", str, **_models, help="model of f: first order or quasi-Newton"),
        Option("max_iters", 1, int, **POSITIVE_INT, help="trust-region iterations per step call"),
        Option("tolerance_grad", 0.0, NUMBER, **NONNEGATIVE, in_config=False,
               help="stop a step's iterations once ||g||_inf <= tolerance_grad"),
    ),
    "sgd": (
        Option("lr", 0.01, NUMBER, **POSITIVE, help="learning rate"),
        Option("momentum", 0.9, NUMBER, **NONNEGATIVE, help="momentum"),
        Option("weight_decay", 0.0, NUMBER, **NONNEGATIVE, help="L2 penalty"),
    ),
    "adam": (
        Option("lr", 1e-3, NUMBER, **POSITIVE, help="learning rate"),
        Option("weight_decay", 0.0, NUMBER, **NONNEGATIVE, help="L2 penalty"),
    ),
    "adamw": (
        Option("lr", 1e-3, NUMBER, **POSITIVE, help="learning rate"),
        Option("weight_decay", 0.01, NUMBER, **NONNEGATIVE, help="decoupled weight decay"),
    ),
    "schedulefree": (  # Schedule-Free AdamW (Defazio et al. 2024), the `schedulefree` package
        Option("lr", 2.5e-3, NUMBER, **POSITIVE, help="learning rate (no schedule)"),
        Option("weight_decay", 0.0, NUMBER, **NONNEGATIVE, help="decoupled weight decay"),
        Option("warmup_steps", 0, int, **at_least(0), help="linear warm-up steps"),
    ),
    "lbfgs": (
        Option("lr", 1.0, NUMBER, **POSITIVE, help="step length scale (strong-Wolfe line search)"),
        Option("history_size", 10, int, **POSITIVE_INT, help="curvature pairs kept"),
        Option("max_iter", 1, int, **POSITIVE_INT, help="iterations per step call"),
    ) + LBFGS_TOLERANCES,
    "adam-lbfgs": (  # the usual PINN schedule: Adam first, then L-BFGS from where Adam ended
        Option("lr", 1e-3, NUMBER, **POSITIVE, help="Adam's learning rate"),
        Option("adam_steps", 1000, int, **at_least(0), help="steps taken with Adam before L-BFGS"),
        Option("history_size", 50, int, **POSITIVE_INT, help="L-BFGS curvature pairs kept"),
        Option("max_iter", 1, int, **POSITIVE_INT, help="L-BFGS iterations per step call"),
    ) + LBFGS_TOLERANCES,
}
METHODS["adam-apts"] += METHODS["apts"]
# the values of the config's optimizer.method (every table but the engine's own constants)
TRAINABLE = tuple(m for m in METHODS if m != "trust-region")


def _trust_region_rules(v, prefix):
    """Cross-key invariants of the engine's constants, one message each."""
    p = prefix
    if not v["min_radius"] <= v["max_radius"]:
        yield "min_radius", (f"{p}min_radius ({v['min_radius']}) must not exceed {p}max_radius "
                             f"({v['max_radius']})")
    elif not v["min_radius"] <= v["radius"] <= v["max_radius"]:
        yield "radius", (f"{p}radius ({v['radius']}) must lie in [min_radius, max_radius] = "
                         f"[{v['min_radius']}, {v['max_radius']}]")
    if not 0 < v["eta1"] < v["eta2"] < 1:
        yield "eta1", f"need 0 < eta1 < eta2 < 1; got {p}eta1={v['eta1']}, {p}eta2={v['eta2']}"
    model = v.get("model", v.get("local_model", "first-order"))
    if v["step"] == "sign" and (v["norm"] != "inf" or model != "first-order"
                                or v.get("global_model", "first-order") != "first-order"):
        yield "step", ("step='sign' is the inf-norm minimiser of the first-order model: it needs "
                       "norm='inf' and a first-order model")


def _apts_rules(v, prefix):
    """The engine's invariants, and what the data space (shards of the minibatch) excludes."""
    yield from _trust_region_rules(v, prefix)
    if v["space"] == "data" and v["replicas"] > 1:
        yield "replicas", (f"{prefix}space='data' makes each rank one shard of the minibatch; it does "
                           f"not combine with {prefix}replicas > 1 (got {v['replicas']})")
    if v["local_decisions"] == "device" and (v["local_model"] != "first-order" or v["replicas"] > 1):
        yield "local_decisions", (f"{prefix}local_decisions='device' needs {prefix}local_model="
                                  f"'first-order' and {prefix}replicas=1 (got {v['local_model']!r}, "
                                  f"{v['replicas']})")
    if v["scaling"] != "none" and (v["local_decisions"] == "device" or v["model_parallel"]):
        yield "scaling", (f"{prefix}scaling={v['scaling']!r} forms its steps on the host with the "
                          f"whole gradient: it needs {prefix}local_decisions='host' and "
                          f"{prefix}model_parallel=false")
    if v["model_parallel"] and (v["radius_control"] != "global" or v["damping"]):
        yield "radius_control", (f"{prefix}radius_control='combined' and {prefix}damping=true are "
                                 f"not built for {prefix}model_parallel=true")
    if v["damping"] and v["acceptance"] == "none":
        yield "damping", (f"{prefix}damping=true shortens a rejected step; {prefix}acceptance='none' "
                          f"rejects none")
    if v["data_pred"] != "gradient" and v["space"] != "data":
        yield "data_pred", (f"{prefix}data_pred={v['data_pred']!r} applies to space='data' "
                            f"(got space={v['space']!r})")
    if v["space"] == "data" and v["local_batch"] != 1:
        yield "local_batch", (f"{prefix}local_batch applies to space='parameters'; with space='data' "
                              f"each local phase uses its shard (got {v['local_batch']!r})")


def _adam_apts_rules(v, prefix):
    yield from _apts_rules(v, prefix)
    if v["model_parallel"]:
        yield "model_parallel", (f"{prefix}model_parallel=true holds one block per rank; the Adam "
                                 f"stage of adam-apts needs the whole model on every rank")


RULES = {"trust-region": _trust_region_rules, "apts": _apts_rules, "tr": _trust_region_rules,
         "adam-apts": _adam_apts_rules}


def options(method: str, config_only: bool = False) -> dict[str, Option]:
    """The keywords of ``method`` by name (those the YAML config carries, with ``config_only``)."""
    if method not in METHODS:
        raise OptionError("method", f"method must be one of {', '.join(TRAINABLE)}; got {method!r}")
    return {o.name: o for o in METHODS[method] if o.in_config or not config_only}


def defaults(method: str, config_only: bool = False) -> dict:
    return {name: o.default for name, o in options(method, config_only).items()}


def did_you_mean(key, known) -> str:
    """`` (did you mean 'x'?)`` for the known key closest to ``key`` (difflib), else ``""``."""
    import difflib
    close = difflib.get_close_matches(str(key), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(known: dict[str, Option], given: dict, prefix: str = "") -> dict:
    """Every keyword of ``known``: the given values checked (each once, by its :class:`Option`),
    the rest their defaults.  The one validator of the package: the config's sections, the
    problems' own ``data.*`` keys and every method's keywords go through it.

    Raises OptionError for an unknown keyword or a value its option refuses; the message names
    the key (with ``prefix``): ``<key> <rule>; got <value>``, or ``<key>: unknown key (did you mean ...?) (known: ...)``.
    """
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise OptionError(unknown[0], f"{prefix}{unknown[0]}: unknown key"
                                      f"{did_you_mean(unknown[0], known)} (known: "
                                      f"{', '.join(sorted(known))})")
    return {name: o.validate(given[name], prefix) if name in given else o.default
            for name, o in known.items()}


def resolve(method: str, given: dict, prefix: str = "", config_only: bool = False) -> dict:
    """Every keyword of ``method``: the given values checked, the rest their defaults.

    Raises OptionError (a ValueError) for an unknown keyword, a wrong type, a value its rule
    refuses, or a broken cross-key invariant; the message names the key (with ``prefix``).
    """
    values = check_keys(options(method, config_only), given, prefix)
    for key, message in RULES.get(method, lambda v, p: ())(values, prefix):
        raise OptionError(key, message)
    return values
