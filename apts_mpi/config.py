"""Experiment configuration: one YAML file per experiment, validated before any work starts.

A config has four sections; every key has a default, so a file names only what differs::

    name: demo
    seed: 0
    epochs: 20
    checkpoint_every: 1         # epochs between metrics/checkpoint writes (and the last)
    target_accuracy: null       # stop once the test accuracy reaches it (time-to-accuracy runs)
    stall_iterations: 100       # stop after this many steps in a row rejected at min_radius
    device: auto                 # auto | cpu | cuda
    data:      {dataset: digits, root: null, download: false, batch_size: 100000, overlap: 0.0}
    model:     {name: mlp-digits, head: logits, dtype: float32}
    optimizer: {method: apts, ...keywords of that method...}

``optimizer.method`` is one of ``apts``, ``tr``, ``sgd``, ``adam``, ``lbfgs``; the keywords allowed
next to it are those of :data:`OPTIMIZER_KEYS` for that method (e.g. ``radius`` for apts/tr, ``lr``
for sgd/adam/lbfgs).  ``--set key.sub=value`` overrides a key (the value is parsed as YAML).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re

import yaml

from .data import DATASETS
from .models import MODELS


class ConfigError(ValueError):
    """A config that cannot run; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``1e-5`` is a number (PyYAML's YAML 1.1 reads it as a string); a key given
    twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)\.?[0-9_]*(?:[eE][-+]?[0-9]+)?$|^\.[0-9_]+(?:[eE][-+]?[0-9]+)?$
                   |^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$""", re.X),
    list("-+0123456789."))


def _parse(text):
    return yaml.load(text, Loader=_Loader)


# key: (default, type(s), check or None, description of the check)
_number = (int, float)
_positive = (lambda v: v > 0, "> 0")
_nonneg = (lambda v: v >= 0, ">= 0")
_unit = (lambda v: 0 <= v < 1, "in [0, 1)")

TOP = {
    "name": ("run", str, None),
    "seed": (0, int, (lambda v: 0 <= v < 2**63, "in [0, 2**63)")),  # torch and HDF5 take int64
    "epochs": (10, int, _positive),
    "checkpoint_every": (1, int, _positive),
    "target_accuracy": (None, (float, int, type(None)), (lambda v: 0 < v <= 1, "in (0, 1]")),
    "stall_iterations": (100, int, _positive),
    "device": ("auto", str, (lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda")),
}
DATA = {
    "dataset": ("digits", str, (lambda v: v in DATASETS, f"one of {', '.join(DATASETS)}")),
    "root": (None, (str, type(None)), None),
    "download": (False, bool, None),
    "batch_size": (100000, int, _positive),
    "overlap": (0.0, _number, _unit),
    "test_batch_size": (10000, int, _positive),
}
MODEL = {
    "name": ("mlp-digits", str, (lambda v: v in MODELS, f"one of {', '.join(MODELS)}")),
    "head": ("logits", str, (lambda v: v in ("logits", "sigmoid"), "logits or sigmoid")),
    "dtype": ("float32", str, (lambda v: v in ("float32", "float64"), "float32 or float64")),
}
_tr_keys = {
    "radius": (0.01, _number, _positive), "max_radius": (0.1, _number, _positive),
    "min_radius": (1e-4, _number, _positive), "eta1": (0.25, _number, None),
    "eta2": (0.75, _number, None), "decrease": (0.5, _number, None), "increase": (2.0, _number, None),
    "norm": ("inf", str, None), "step": ("cauchy", str, None), "memory": (5, int, None),
}
OPTIMIZER_KEYS = {
    "apts": {**_tr_keys, "subdomains": (None, (int, type(None)), None),
             "decomposition": ("balanced", str, None), "local_iters": (5, int, None),
             "local_fraction": (1.0, _number, None), "local_model": ("first-order", str, None),
             "acceptance": ("ratio", str, None), "window": (5, int, None),
             "global_iters": (1, int, None), "global_model": ("first-order", str, None),
             "foc": (False, bool, None), "replicas": (1, int, None),
             "micro_batch": (None, (int, type(None)), None)},
    "tr": {**_tr_keys, "model": ("first-order", str, None), "max_iters": (1, int, None)},
    "sgd": {"lr": (0.01, _number, _positive), "momentum": (0.9, _number, _nonneg),
            "weight_decay": (0.0, _number, _nonneg)},
    "adam": {"lr": (1e-3, _number, _positive), "weight_decay": (0.0, _number, _nonneg)},
    "lbfgs": {"lr": (1.0, _number, _positive), "history_size": (10, int, _positive),
              "max_iter": (1, int, _positive)},
}
SECTIONS = {"data": DATA, "model": MODEL}


def _check(key, value, spec):
    default, types, check = spec
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ConfigError(f"{key}: expected {_type_name(types)}, got {value!r}")
    if types is _number and isinstance(value, int):
        value = float(value)
    if not isinstance(value, types):
        raise ConfigError(f"{key}: expected {_type_name(types)}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {value!r}")
    if check is not None and value is not None and not check[0](value):
        raise ConfigError(f"{key}: must be {check[1]}, got {value!r}")
    return value


def _type_name(types):
    types = types if isinstance(types, tuple) else (types,)
    names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "NoneType": "null"}
    return " or ".join(dict.fromkeys(names[t.__name__] for t in types))


def _fill(section_name, given, schema):
    if not isinstance(given, dict):
        raise ConfigError(f"{section_name}: expected a mapping, got {given!r}")
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ConfigError(f"{section_name}.{unknown[0]}: unknown key (known: {', '.join(sorted(schema))})")
    return {k: _check(f"{section_name}.{k}", given.get(k, spec[0]), spec) if k in given else spec[0]
            for k, spec in schema.items()}


def resolve(raw: dict) -> dict:
    """The fully resolved config: defaults filled in, every key checked; raises ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    known = set(TOP) | set(SECTIONS) | {"optimizer"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    config = {k: _check(k, raw[k], spec) if k in raw else spec[0] for k, spec in TOP.items()}
    for name, schema in SECTIONS.items():
        config[name] = _fill(name, raw.get(name, {}), schema)
    opt = raw.get("optimizer")
    if not isinstance(opt, (dict, type(None))):
        raise ConfigError(f"optimizer: expected a mapping, got {opt!r}")
    opt = dict(opt or {})
    method = opt.pop("method", "apts")
    if not isinstance(method, str) or method not in OPTIMIZER_KEYS:
        raise ConfigError(f"optimizer.method: must be one of {', '.join(OPTIMIZER_KEYS)}, got {method!r}")
    config["optimizer"] = {"method": method, **_fill("optimizer", opt, OPTIMIZER_KEYS[method])}
    _check_constants(config["optimizer"])
    return config


def _check_constants(opt):
    """Cross-key invariants, checked by the classes that own them, reported with the key's name."""
    if opt["method"] not in ("apts", "tr"):
        return
    from .trust_region import TrustRegionConfig
    keys = ("radius", "max_radius", "min_radius", "eta1", "eta2", "decrease", "increase", "norm",
            "step", "memory")
    try:
        TrustRegionConfig(**{k: opt[k] for k in keys}, model=opt.get("model", "first-order"))
    except ValueError as e:
        raise ConfigError(f"optimizer: {e}") from None
    if opt["method"] == "apts":
        for key, ok, what in (("local_iters", opt["local_iters"] >= 1, ">= 1"),
                              ("global_iters", opt["global_iters"] >= 0, ">= 0"),
                              ("window", opt["window"] >= 1, ">= 1"),
                              ("replicas", opt["replicas"] >= 1, ">= 1"),
                              ("local_fraction", 0 < opt["local_fraction"] <= 1, "in (0, 1]")):
            if not ok:
                raise ConfigError(f"optimizer.{key}: must be {what}, got {opt[key]!r}")
        for key, allowed in (("decomposition", ("balanced", "random-tensors", "flat")),
                             ("acceptance", ("ratio", "none", "nonmonotone")),
                             ("local_model", ("first-order", "lsr1", "lbfgs")),
                             ("global_model", ("first-order", "lsr1", "lbfgs"))):
            if opt[key] not in allowed:
                raise ConfigError(f"optimizer.{key}: must be one of {', '.join(allowed)}, got {opt[key]!r}")
        if opt["micro_batch"] is not None and opt["micro_batch"] < 1:
            raise ConfigError(f"optimizer.micro_batch: must be >= 1, got {opt['micro_batch']!r}")
        if opt["subdomains"] is not None and opt["subdomains"] < 1:
            raise ConfigError(f"optimizer.subdomains: must be >= 1, got {opt['subdomains']!r}")


def apply_overrides(raw: dict, overrides) -> dict:
    """``key.sub=value`` strings applied to a raw config (values parsed as YAML)."""
    raw = copy.deepcopy(raw or {})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node, parts = raw, key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
        try:
            node[parts[-1]] = _parse(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {value!r} is not valid YAML: "
                              f"{_yaml_problem(e)}") from None
    return raw


def _yaml_problem(error) -> str:
    """A YAML parser error on one line: the problem and where (PyYAML's own text spans lines)."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    text = " ".join(str(problem or error).split())
    return f"{text} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else text


def load(path, overrides=()) -> dict:
    """Read, override and resolve a YAML config file; raises ConfigError."""
    try:
        with open(path) as f:
            raw = _parse(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:  # a binary file is not YAML either
        problem = _yaml_problem(e) if isinstance(e, yaml.YAMLError) else f"not UTF-8 text ({e.reason})"
        raise ConfigError(f"config {path} is not valid YAML: {problem}") from None
    if raw is not None and not isinstance(raw, dict):  # before --set walks into it
        raise ConfigError(f"config {path}: expected a mapping at the top level, got "
                          f"{type(raw).__name__}")
    return resolve(apply_overrides(raw, overrides))


# keys that say where a run stops or how often it writes, not which trajectory it follows: a run
# may be resumed with other values (e.g. more epochs)
RESUMABLE = ("epochs", "checkpoint_every", "name", "target_accuracy", "stall_iterations")


def digest(config: dict) -> str:
    """A short hash of a resolved config, to tie checkpoints to the trajectory that wrote them.

    Keys whose value is null are left out, so that a key added later with a null default keeps
    older checkpoints resumable.
    """
    def prune(node):
        if isinstance(node, dict):
            return {k: prune(v) for k, v in node.items() if v is not None}
        return node
    trajectory = {k: v for k, v in config.items() if k not in RESUMABLE}
    trajectory["data"] = {k: v for k, v in config["data"].items() if k not in ("root", "download")}
    return hashlib.sha256(json.dumps(prune(trajectory), sort_keys=True).encode()).hexdigest()[:16]
