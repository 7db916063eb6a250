"""Experiment configuration: one YAML file per experiment, validated before any work starts.

A config has four sections; every key has a default, so a file names only what differs::

    name: demo
    seed: 0
    epochs: 20
    checkpoint_every: 1         # epochs between metrics/checkpoint writes (and the last)
    target_accuracy: null       # stop once the test accuracy reaches it (time-to-accuracy runs)
    stall_iterations: 100       # stop after this many steps in a row rejected at min_radius
    device: auto                 # auto | cpu | cuda
    watchdog_s: null            # no progress for this long: exit 75 (null: automatic, 0: off)
    data:      {dataset: digits, root: null, download: false, batch_size: 100000, overlap: 0.0}
    model:     {name: mlp-digits, head: logits, dtype: float32}
    optimizer: {method: apts, ...keywords of that method...}

``data.dataset`` picks the problem (:mod:`apts_mpi.problems`), which may add ``data.*`` keys of its
own (e.g. a context length) and names the networks ``model.name`` may take.  ``target`` stops a
run once the problem's target metric reaches it (test accuracy at least, a validation loss or an
error at most); ``target_accuracy`` is the same for classification.
``optimizer.method`` is one of ``apts``, ``tr``, ``sgd``, ``adam``, ``lbfgs``; the keywords allowed
next to it, their defaults and checks are those of :mod:`apts_mpi.options` for that method (e.g.
``radius`` for apts/tr, ``lr`` for sgd/adam/lbfgs).  ``--set key.sub=value`` overrides a key (the value is parsed as YAML).
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` (from
:mod:`apts_mpi.errors`) naming the key.  Every key, the problems' own included, is an
:class:`~apts_mpi.options.Option` checked once by the one validator
(:func:`apts_mpi.options.check_keys`), with one message style: ``<key> <rule>; got <value>``.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re

import yaml

from . import options
from .errors import ConfigError
from .options import Option
from .problems import DATASETS, PROBLEMS

__all__ = ["ConfigError", "load", "resolve", "apply_overrides", "digest", "RESUMABLE"]


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


# The config's own keys, as :class:`~apts_mpi.options.Option` lines: one validator (and one message
# style) for the config's sections, the problems' ``data.*`` keys and the optimiser's keywords.
_NUMBER = options.NUMBER
_POSITIVE = options.POSITIVE_INT

TOP = {o.name: o for o in (
    Option("name", "run", str),
    Option("seed", 0, int, check=lambda v: 0 <= v < 2**63,  # torch and HDF5 take int64
           rule="must be in [0, 2**63)"),
    Option("epochs", 10, int, **_POSITIVE),
    Option("checkpoint_every", 1, int, **_POSITIVE),
    Option("target_accuracy", None, (float, int, type(None)), check=lambda v: 0 < v <= 1,
           rule="must be in (0, 1]"),
    Option("target", None, (float, int, type(None))),
    Option("stall_iterations", 100, int, **_POSITIVE),
    Option("device", "auto", str, **options.choice("auto", "cpu", "cuda")),
    # seconds without progress before a rank ends the run for a requeue (apts_mpi/watchdog.py);
    # null: 10 x the slowest iteration, at least 5 minutes; 0: off
    Option("watchdog_s", None, (float, int, type(None)), check=lambda v: v >= 0,
           rule="must be >= 0 (0: off)"),
)}
DATA = {o.name: o for o in (
    Option("dataset", "digits", str, check=lambda v: v in PROBLEMS,  # the registry as it is now
           rule=f"must be one of {', '.join(DATASETS)}"),
    Option("root", None, (str, type(None))),
    Option("download", False, bool),
    Option("batch_size", 100000, int, **_POSITIVE),
    Option("overlap", 0.0, _NUMBER, check=lambda v: 0 <= v < 1, rule="must be in [0, 1)"),
    Option("test_batch_size", 10000, int, **_POSITIVE),
)}
MODEL = {o.name: o for o in (
    Option("name", "mlp-digits", str),  # checked against the problem's networks
    Option("head", "logits", str, **options.choice("logits", "sigmoid")),
    Option("dtype", "float32", str, **options.choice("float32", "float64")),
)}


def _section(name, given, known):
    if not isinstance(given, dict):
        raise ConfigError(f"{name} must be a mapping; got {given!r}")
    return options.check_keys(known, given, prefix=f"{name}.")


def resolve(raw: dict) -> dict:
    """The fully resolved config: defaults filled in, every key checked once; raises ConfigError."""
    try:
        return _resolve({} if raw is None else raw)
    except options.OptionError as e:
        raise ConfigError(str(e)) from None


def _resolve(raw):
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping at the top level; got {type(raw).__name__}")
    known = set(TOP) | {"data", "model", "optimizer"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key{options.did_you_mean(unknown[0], known)} "
                          f"(known: {', '.join(sorted(known))})")
    config = options.check_keys(TOP, {k: v for k, v in raw.items() if k in TOP})
    data = raw.get("data", {})
    dataset = data.get("dataset", DATA["dataset"].default) if isinstance(data, dict) else None
    problem = PROBLEMS.get(dataset) if isinstance(dataset, str) else None
    config["data"] = _section("data", data, {**DATA, **(problem.data_keys if problem else {})})
    model = raw.get("model", {})
    config["model"] = _section("model", model, {**MODEL, "name": Option(
        "name", MODEL["name"].default, str, **options.choice(*problem.models))})
    for key, message in problem.config_rules(config):
        raise ConfigError(message)
    opt = raw.get("optimizer")
    if not isinstance(opt, (dict, type(None))):
        raise ConfigError(f"optimizer must be a mapping; got {opt!r}")
    opt = dict(opt or {})
    method = opt.pop("method", "apts")
    if not isinstance(method, str) or method not in options.TRAINABLE:
        raise ConfigError(f"optimizer.method must be one of {', '.join(options.TRAINABLE)}; "
                          f"got {method!r}")
    config["optimizer"] = {"method": method, **options.resolve(method, opt, prefix="optimizer.",
                                                               config_only=True)}
    return config


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
        raise ConfigError(f"config {path} must be a mapping at the top level; got "
                          f"{type(raw).__name__}")
    return resolve(apply_overrides(raw, overrides))


# keys that say where a run stops or how often it writes, not which trajectory it follows: a run
# may be resumed with other values (e.g. more epochs)
RESUMABLE = ("epochs", "checkpoint_every", "name", "target_accuracy", "target", "stall_iterations",
             "watchdog_s")


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


def _describe(option) -> tuple:
    """(default, rule in words) of a key's :class:`~apts_mpi.options.Option`."""
    rule = options.type_name(option.types) + (f", {option.rule}" if option.rule else "")
    return option.default, rule + (f"; {option.help}" if option.help else "")


def keys(config: dict | None = None) -> list:
    """Every key a config may hold, as ``(key, default, rule)`` rows: the top level, ``data`` (with
    the keys of the config's data set), ``model`` (with its networks) and ``optimizer`` (the
    keywords of the config's method).  Without ``config``, those of the defaults (digits, apts)."""
    config = config or resolve({})
    dataset, method = config["data"]["dataset"], config["optimizer"]["method"]
    problem = PROBLEMS[dataset]
    rows = [(k, *_describe(spec)) for k, spec in TOP.items()]
    rows += [(f"data.{k}", *_describe(spec)) for k, spec in {**DATA, **problem.data_keys}.items()]
    for k, spec in MODEL.items():
        default, rule = _describe(spec)
        if k == "name":
            rule = f"one of {', '.join(problem.models)} (data set {dataset})"
        rows.append((f"model.{k}", default, rule))
    rows.append(("optimizer.method", "apts", f"one of {', '.join(options.TRAINABLE)}"))
    rows += [(f"optimizer.{k}", *_describe(o))
             for k, o in options.options(method, config_only=True).items()]
    return rows


def dump(config: dict) -> str:
    """A resolved config as YAML that :func:`load` reads back to the same config."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
