"""The problem interface: everything the training loop needs to know about what is learnt.

A problem owns its data (loaded once, on every rank, to ``device`` and ``dtype``), builds its
network by name, defines the :class:`~apts_mpi.objective.Objective` minimised on a minibatch, turns
sample indices (drawn by the loop's seeded sampler) into a minibatch, and computes the metrics
reported after every epoch.  The loop never looks inside: classification, language modelling and a
physics-informed network differ only here.
"""
from __future__ import annotations

import torch

from ..comm import Comm
from ..objective import Objective


class Problem:
    """Base class; a subclass sets the class attributes and implements the methods.

    Class attributes
        ``datasets``: names of ``data.dataset`` this problem serves.
        ``data_keys``: extra ``data.*`` config keys, ``{key: Option}`` (:mod:`apts_mpi.options`,
            the package's one validator; e.g. a context length).
        ``models``: names of ``model.name`` it can build (the config refuses any other).
        ``metrics``: names of the per-epoch series that :meth:`evaluate` returns, in order.
        ``target``: (metric, "max" | "min"): the series a ``target`` in the config refers to.

    Instance attributes (after ``__init__``)
        ``objective``: the :class:`Objective` of a minibatch.
        ``n_train``: the number of training samples the sampler draws indices from.
    """

    datasets: tuple = ()
    data_keys: dict = {}
    models: tuple = ()
    import_models = False  # True: model.name may also be a factory 'package.module:function'
    metrics: tuple = ()
    target: tuple = ("", "max")
    data_labels: dict = {}  # attribute -> what it is, in messages (e.g. "training inputs")

    objective: Objective
    n_train: int

    @classmethod
    def config_rules(cls, cfg: dict):
        """Cross-key invariants of the resolved config's ``data`` and ``model`` sections that this
        problem needs (each key has passed its own check): ``(key, message)`` pairs, the message
        in the validator's style ``<key> <rule>; got <value>``.  None by default."""
        return ()

    def __init__(self, cfg: dict, device: torch.device, dtype: torch.dtype):
        """Load the data of the resolved config ``cfg`` (raises ``DataError`` for bad data)."""
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def build_model(self) -> torch.nn.Module:
        """The network ``cfg['model']['name']`` (the caller seeds torch first), on device and dtype."""
        raise NotImplementedError

    def batch(self, indices: torch.Tensor) -> tuple:
        """The minibatch of the training samples ``indices``: a tuple of tensors on ``device``
        sharing their first dimension.  By default the rows ``indices`` of ``train_x`` and
        ``train_y``, the samples of a problem that holds them in memory on ``device``."""
        indices = indices.to(self.device)
        return self.train_x[indices], self.train_y[indices]

    def evaluate(self, model: torch.nn.Module, comm: Comm) -> dict:
        """The per-epoch metrics ``{name: float}`` (every name of ``metrics``).

        Collective: every rank calls it; each may take a share of the work and sum with
        ``comm.sum_scalars``.  Called with the model in training mode; restore it if changed.
        """
        raise NotImplementedError

    def check_finite(self) -> None:
        """Refuse non-finite inputs (a damaged file, a fault on one node) before training: raises
        ``DataError`` naming the first floating-point data tensor of the problem that holds any."""
        from ..data import DataError
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                bad = int(value.numel() - torch.isfinite(value).sum())
                if bad:
                    label = self.data_labels.get(name, f"{name} data")
                    raise DataError(f"the {label} hold {bad} non-finite value(s) (NaN or "
                                    f"infinity) among {value.numel()}: check the data files")

    def artifacts(self, model: torch.nn.Module) -> dict:
        """Extra results written once at the end of a run as metrics attributes (rank 0 only),
        e.g. a sample of generated text; ``{}`` by default."""
        return {}
