"""Image classification: digits, MNIST, Fashion-MNIST, CIFAR-10 (docs/method.md section 5).

Minibatches are ``(x, y)``; the objective is the mean cross-entropy; after every epoch the loss
and accuracy on the whole training set (``loss``, ``train_accuracy``) and on the test set
(``test_loss``, ``test_accuracy``), evaluated in chunks of ``data.test_batch_size`` samples, each
rank taking a share of the chunks; the chunks' sums are gathered and added in chunk order, so that
the metrics are bitwise the same on any number of ranks.
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
        return build_model(model["name"], self.input_shape, self.classes, model["head"]).to(
            self.device, self.dtype)

    def evaluate(self, model, comm: Comm):
        chunk = self.cfg["data"]["test_batch_size"]
        loss, train_accuracy = evaluate(model, self.train_x, self.train_y, comm, chunk)
        test_loss, test_accuracy = evaluate(model, self.test_x, self.test_y, comm, chunk)
        return dict(loss=loss, train_accuracy=train_accuracy, test_accuracy=test_accuracy,
                    test_loss=test_loss)


@torch.no_grad()
def evaluate(model, x, y, comm: Comm, batch_size: int):
    """(mean loss, accuracy) over (x, y) in chunks of ``batch_size`` samples, each rank taking a
    contiguous share of the chunks; the chunks' (loss, correct) sums are gathered and added in chunk
    order, as one process adds them: the same bits on any number of ranks (a rank with no chunk
    idles)."""
    n = len(y)
    starts = range(0, n, batch_size)
    mine = starts[len(starts) * comm.rank // comm.size:len(starts) * (comm.rank + 1) // comm.size]
    was_training = model.training
    model.eval()
    sums = []
    for start in mine:
        out = model(x[start:start + batch_size])
        sums.append((float(torch.nn.functional.cross_entropy(out, y[start:start + batch_size],
                                                             reduction="sum")),
                     float((out.argmax(1) == y[start:start + batch_size]).sum())))
    model.train(was_training)
    if comm.size > 1:
        sums = [chunk for share in comm.allgather_object(sums) for chunk in share]
    loss = correct = 0.0
    for chunk_loss, chunk_correct in sums:
        loss, correct = loss + chunk_loss, correct + chunk_correct
    return loss / n, correct / n
