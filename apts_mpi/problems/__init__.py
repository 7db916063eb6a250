"""Problems: what is learnt (data, network, objective, minibatches, per-epoch metrics).

:class:`~apts_mpi.problems.base.Problem` is the interface the training loop sees; each problem is
one module, registered in :data:`PROBLEMS` under the names of the data sets it serves
(``data.dataset`` in a config picks the problem).

Your own problem, without editing this package: write a :class:`Problem` subclass in a module of
your own and name it in the config as an import path, ``data.dataset: mypackage.mymodule:MyProblem``
(the module must be importable: installed, or on ``PYTHONPATH``); its ``data_keys`` and ``models``
are then checked like the built-in ones.  From Python, :func:`register` adds it under the names in
its ``datasets``.  Your own network on a built-in or tensor data set: ``model.name:
mypackage.mymodule:factory`` (:func:`import_object`; ``factory(input_shape, outputs)`` returns the
``nn.Module``).  Your own tensors: ``data.dataset: tensors`` (:mod:`apts_mpi.problems.tensors`).
"""
from __future__ import annotations

from ..errors import InputError
from ..plugins import import_object
from .base import Problem
from .classification import Classification
from .language import LanguageProblem
from .pinn import PoissonProblem
from .tensors import TensorProblem

PROBLEMS: dict[str, type[Problem]] = {name: cls for cls in (Classification, LanguageProblem,
                                                            PoissonProblem, TensorProblem)
                                      for name in cls.datasets}
DATASETS = tuple(PROBLEMS)


def lookup(dataset: str) -> type[Problem]:
    """The problem of ``data.dataset``: a registered name, or an import path of a Problem subclass."""
    if dataset in PROBLEMS:
        return PROBLEMS[dataset]
    if ":" not in dataset:
        raise InputError(f"data.dataset: must be one of {', '.join(PROBLEMS)} or an import path "
                         f"'package.module:Problem', got {dataset!r}")
    cls = import_object(dataset, "data.dataset")
    if not (isinstance(cls, type) and issubclass(cls, Problem)):
        raise InputError(f"data.dataset {dataset!r}: not a subclass of apts_mpi.problems.Problem")
    return cls


def register(cls: type[Problem]) -> type[Problem]:
    """Add ``cls`` under each name of its ``datasets`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Problem)) or not cls.datasets:
        raise TypeError("register: expected a Problem subclass with a non-empty 'datasets'")
    for name in cls.datasets:
        PROBLEMS[name] = cls
    return cls


__all__ = ["PROBLEMS", "DATASETS", "Problem", "import_object", "lookup", "register"]
