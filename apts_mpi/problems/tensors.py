"""Your own tensors: ``data.dataset: tensors``, inputs and targets from a ``.pt`` or ``.npz`` file.

    data:  {dataset: tensors, train: train.npz, test: test.npz}   # test: optional
    model: {name: mypackage.nets:make_net}                        # factory(input_shape, outputs)

A ``.npz`` file holds the arrays ``x`` and ``y``; a ``.pt`` file (read with
``torch.load(weights_only=True)``) a dict with the tensors ``x`` and ``y`` or a pair ``(x, y)``.
``x``: ``(n, *input_shape)`` floating inputs.  Integer ``y`` of shape ``(n,)``: classification
(``outputs`` = the largest label + 1; mean cross-entropy; metrics ``loss``, ``train_accuracy`` and,
with a test file, ``test_accuracy``, ``test_loss``).  Floating ``y`` of shape ``(n, ...)``:
regression (``outputs`` = the numel of one target; mean squared error; metrics ``loss`` and, with
a test file, ``test_loss``).  The target of a run is the test metric, else the training one.
Relative paths are taken from the working directory.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..comm import Comm
from ..data import DataError
from ..objective import SampleLoss
from ..options import Option
from ..plugins import build_imported
from .base import Problem
from .classification import evaluate as evaluate_classification



def load_tensors(path) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a .npz or .pt file; DataError (one line) for a file that does not hold them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if not {"x", "y"} <= set(f.files):
                    raise DataError(f"{path}: expected arrays 'x' and 'y', found {', '.join(f.files) or 'none'}")
                x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
        elif path.suffix == ".pt":
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict) and {"x", "y"} <= set(loaded):
                x, y = loaded["x"], loaded["y"]
            elif isinstance(loaded, (tuple, list)) and len(loaded) == 2:
                x, y = loaded
            else:
                raise DataError(f"{path}: expected a dict with 'x' and 'y' or a pair (x, y)")
        else:
            raise DataError(f"{path}: expected a .npz or .pt file")
    except DataError:
        raise
    except Exception as e:  # a damaged file: numpy's, zipfile's or torch's error
        raise DataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise DataError(f"{path}: 'x' and 'y' must be tensors")
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"{path}: 'x' {tuple(x.shape)} and 'y' {tuple(y.shape)} must share a "
                        "non-empty first dimension")
    if not x.is_floating_point():
        raise DataError(f"{path}: 'x' must be floating point, got {x.dtype}")
    if not (y.is_floating_point() or (y.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8)
                                      and y.ndim == 1)):
        raise DataError(f"{path}: 'y' must be integer class labels of shape (n,) or floating "
                        f"targets, got {y.dtype} {tuple(y.shape)}")
    return x, y


class TensorProblem(Problem):
    datasets = ("tensors",)
    data_keys = {k: Option(k, None, (str, type(None))) for k in ("train", "test")}
    models = ()           # a factory by import path only
    import_models = True
    data_labels = {"train_x": "training inputs", "test_x": "test inputs",
                   "train_y": "training targets", "test_y": "test targets"}

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        data = cfg["data"]
        if not data["train"]:
            raise DataError("data.train: give the training tensors (a .npz or .pt file with x and y)")
        x, y = load_tensors(data["train"])
        self.classify = not y.is_floating_point()
        test = load_tensors(data["test"]) if data["test"] else None
        if test is not None and (test[0].shape[1:] != x.shape[1:] or test[1].shape[1:] != y.shape[1:]
                                 or test[1].is_floating_point() == self.classify):
            raise DataError(f"{data['test']}: shapes or kind of 'x' {tuple(test[0].shape)} and 'y' "
                            f"{tuple(test[1].shape)} do not match the training file's")
        if self.classify and int(y.min()) < 0:
            raise DataError(f"{data['train']}: class labels must be >= 0, found {int(y.min())}")
        self.input_shape = tuple(x.shape[1:])
        labels = [y] + ([test[1]] if test is not None else [])
        self.outputs = int(max(int(t.max()) for t in labels)) + 1 if self.classify else \
            math.prod(y.shape[1:])
        as_y = (lambda t: t.to(device, torch.int64)) if self.classify else (lambda t: t.to(device, dtype))
        self.train_x, self.train_y = x.to(device, dtype), as_y(y)
        self.test_x, self.test_y = (test[0].to(device, dtype), as_y(test[1])) if test else (None, None)
        loss = torch.nn.functional.cross_entropy if self.classify else torch.nn.functional.mse_loss
        self.objective = SampleLoss(loss)
        self.n_train = len(self.train_y)
        if self.classify:
            self.metrics = ("loss", "train_accuracy") + (("test_accuracy", "test_loss") if test else ())
            self.target = ("test_accuracy", "max") if test else ("train_accuracy", "max")
        else:
            self.metrics = ("loss",) + (("test_loss",) if test else ())
            self.target = ("test_loss", "min") if test else ("loss", "min")

    def build_model(self):
        return build_imported(self.cfg["model"]["name"], self.input_shape, self.outputs).to(
            self.device, self.dtype)

    def evaluate(self, model, comm: Comm):
        chunk = self.cfg["data"]["test_batch_size"]
        if self.classify:
            loss, accuracy = evaluate_classification(model, self.train_x, self.train_y, comm, chunk)
            metrics = dict(loss=loss, train_accuracy=accuracy)
            if self.test_x is not None:
                test_loss, test_accuracy = evaluate_classification(model, self.test_x, self.test_y,
                                                                   comm, chunk)
                metrics.update(test_accuracy=test_accuracy, test_loss=test_loss)
            return metrics
        metrics = dict(loss=_mean_squared_error(model, self.train_x, self.train_y, comm, chunk))
        if self.test_x is not None:
            metrics["test_loss"] = _mean_squared_error(model, self.test_x, self.test_y, comm, chunk)
        return metrics


@torch.no_grad()
def _mean_squared_error(model, x, y, comm: Comm, batch_size: int) -> float:
    """The objective's mean squared error over (x, y), each rank a share, one Allreduce."""
    n = len(y)
    share = slice(n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        total += float(torch.nn.functional.mse_loss(model(x[start:stop]), y[start:stop])) * (stop - start)
    model.train(was_training)
    return comm.sum_scalars([total])[0] / n
