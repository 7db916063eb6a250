"""The user's own code by import path (``package.module:name``): a problem class for
``data.dataset``, a model factory for ``model.name``; see apts_mpi/problems/__init__.py."""
from __future__ import annotations

import importlib

import torch

from .errors import InputError


def import_object(path: str, what: str):
    """The object named by ``package.module:name``; InputError (one line) if it cannot be imported."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise InputError(f"{what} {path!r}: expected an import path 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised by the module itself
        raise InputError(f"{what} {path!r}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise InputError(f"{what} {path!r}: module {module_name} has no {name!r}") from None


def build_imported(path: str, input_shape: tuple, outputs: int) -> torch.nn.Module:
    """``factory(input_shape, outputs)`` of the import path ``package.module:factory``."""
    factory = import_object(path, "model.name")
    if not callable(factory):
        raise InputError(f"model.name {path!r}: not callable")
    model = factory(tuple(input_shape), int(outputs))
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model.name {path!r}: factory(input_shape, outputs) returned "
                         f"{type(model).__name__}, not a torch.nn.Module")
    return model
