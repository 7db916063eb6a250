"""Image classification: digits, MNIST, Fashion-MNIST, CIFAR-10 (docs/method.md section 5).

Minibatches are ``(x, y)``; the objective is the mean cross-entropy; after every epoch the loss
and accuracy on the whole training set (``loss``, ``train_accuracy``) and on the test set
(``test_loss``, ``test_accuracy``), evaluated in chunks of ``data.test_batch_size`` samples, each
rank taking a share and one Allreduce summing them.
"""
from __future__ import annotations

import torch

from ..comm import Comm
from ..data import DATASETS, load_dataset
from ..models import MODELS, build_model
from ..objective import SampleLoss
from .base import Problem


class Classification(Problem):
    datasets = tuple(DATASETS)
    models = tuple(MODELS)
    metrics = ("loss", "train_accuracy", "test_accuracy", "test_loss")
    target = ("test_accuracy", "max")
    data_labels = {"train_x": "training inputs", "test_x": "test inputs"}
    import_models = True  # factory(input_shape, classes)

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        data = cfg["data"]
        loaded = load_dataset(data["dataset"], data["root"], data["download"])
        self.input_shape, self.classes = loaded.input_shape, loaded.classes
        self.train_x, self.train_y = loaded.train_x.to(device, dtype), loaded.train_y.to(device)
        self.test_x, self.test_y = loaded.test_x.to(device, dtype), loaded.test_y.to(device)
        self.objective = SampleLoss(torch.nn.functional.cross_entropy)
        self.n_train = len(self.train_y)

    def build_model(self):
        model = self.cfg["model"]
        if ":" in model["name"]:  # the user's factory (apts_mpi/problems/__init__.py)
            from .tensors import build_imported
            return build_imported(model["name"], self.input_shape, self.classes).to(self.device, self.dtype)
        return build_model(model["name"], self.input_shape, self.classes, model["head"]).to(
            self.device, self.dtype)

    def batch(self, indices):
        indices = indices.to(self.device)
        return self.train_x[indices], self.train_y[indices]

    def evaluate(self, model, comm: Comm):
        chunk = self.cfg["data"]["test_batch_size"]
        loss, train_accuracy = evaluate(model, self.train_x, self.train_y, comm, chunk)
        test_loss, test_accuracy = evaluate(model, self.test_x, self.test_y, comm, chunk)
        return dict(loss=loss, train_accuracy=train_accuracy, test_accuracy=test_accuracy,
                    test_loss=test_loss)


@torch.no_grad()
def evaluate(model, x, y, comm: Comm, batch_size: int):
    """(mean loss, accuracy) over (x, y), each rank taking a share, summed by one Allreduce."""
    n = len(y)
    share = slice(n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        out = model(x[start:stop])
        totals[0] += float(torch.nn.functional.cross_entropy(out, y[start:stop], reduction="sum"))
        totals[1] += float((out.argmax(1) == y[start:stop]).sum())
    model.train(was_training)
    loss, correct = comm.sum_scalars(totals.tolist())
    return loss / n, correct / n
