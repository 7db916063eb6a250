"""Problems: what is learnt (data, network, objective, minibatches, per-epoch metrics).

:class:`~apts_mpi.problems.base.Problem` is the interface the training loop sees; each problem is
one module, registered in :data:`PROBLEMS` under the names of the data sets it serves
(``data.dataset`` in a config picks the problem).
"""
from .base import Problem
from .classification import Classification
from .language import LanguageProblem
from .pinn import PoissonProblem

PROBLEMS: dict[str, type[Problem]] = {name: cls for cls in (Classification, LanguageProblem,
                                                            PoissonProblem) for name in cls.datasets}
DATASETS = tuple(PROBLEMS)

__all__ = ["PROBLEMS", "DATASETS", "Problem"]
