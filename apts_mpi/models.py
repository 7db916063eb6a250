"""The networks of the benchmarks, built by name.

Every network maps a batch ``(b, *input_shape)`` to ``(b, classes)`` scores for
``torch.nn.functional.cross_entropy``.  Two heads:

* ``head="logits"`` (default): the scores are plain logits.
* ``head="sigmoid"``: the authors' head, kept for like-for-like comparisons with their published
  runs (method notes, section 7).  The logits go through a sigmoid, so ``cross_entropy`` applies
  ``log_softmax`` to values in (0, 1): even a perfect prediction (1 for the true class, 0 for the
  other nine) costs ``log(1 + 9 / e) ~= 1.461`` on 10 classes, so the loss cannot fall below about
  1.46 and its gradients are damped by ``sigmoid'``.

The sigmoid has no parameters and is added at the end of the same module, so both heads of a
network have the same parameter names and shapes, and one initial state loads into either.

Networks are built in float32 on the CPU with PyTorch's default initialisation; seeding is the
caller's business (``torch.manual_seed`` before :func:`build_model`).  ``resnet18`` contains batch
normalisation, so its output depends on ``train()`` / ``eval()`` mode and its running statistics
are buffers, not parameters.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .plugins import build_imported

__all__ = ["MODELS", "HEADS", "build_model", "count_parameters", "ResNet18", "BasicBlock"]

MODELS = {
    "mlp-digits": "MLP 64-32-10, ReLU, for the 8x8 digits",
    "mnist-fc-small": "MLP 784-32-32-10, ReLU",
    "mnist-fc": "MLP 784-512-256-10, ReLU (535,818 parameters on MNIST)",
    "mnist-cnn": "CNN conv 20 5x5, pool, conv 50 5x5, pool, fc 800-500-10, for 28x28 inputs",
    "cifar-fc": "MLP 3072-512-256-10, ReLU",
    "cifar-lenet5": "LeNet-5 style CNN conv 6 5x5, pool, conv 16 5x5, pool, fc 400-120-84-10",
    "resnet18": "CIFAR-style ResNet-18: 3x3 stem, no max-pool, BasicBlock [2, 2, 2, 2]",
}

HEADS = {
    "logits": "plain logits for cross-entropy",
    "sigmoid": "sigmoid of the logits (the authors' head; cross-entropy cannot fall below ~1.46)",
}

# Hidden widths of the fully connected networks; the input width is prod(input_shape).
_MLP_HIDDEN = {
    "mlp-digits": (32,),
    "mnist-fc-small": (32, 32),
    "mnist-fc": (512, 256),
    "cifar-fc": (512, 256),
}


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters of ``model`` (buffers such as batch-norm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def build_model(name: str, input_shape, classes: int, head: str = "logits") -> nn.Module:
    """Build the network ``name`` (one of ``MODELS``) for inputs ``input_shape = (channels,
    height, width)`` and ``classes`` outputs, with ``head`` one of ``HEADS``.

    The fully connected networks flatten their input and take ``prod(input_shape)`` features (784
    for MNIST, 3072 for CIFAR-10); the CNNs take ``input_shape[0]`` channels.  Raises ValueError
    for an unknown name or head, a bad ``classes`` or an input too small for the network.
    A name ``package.module:factory`` is the user's own network, ``factory(input_shape, classes)``
    (:func:`apts_mpi.plugins.build_imported`; its head is the factory's).
    """
    if ":" in name:
        return build_imported(name, input_shape, classes)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    if int(classes) != classes or classes < 1:
        raise ValueError(f"classes must be a positive integer, got {classes!r}")
    classes = int(classes)
    sigmoid = head == "sigmoid"
    channels, height, width = input_shape

    if name in _MLP_HIDDEN:
        return _mlp(math.prod(input_shape), _MLP_HIDDEN[name], classes, sigmoid)
    if name == "mnist-cnn":
        # conv 5x5 (valid), max-pool 2, ReLU, twice: 28 -> 24 -> 12 -> 8 -> 4, 50 * 4 * 4 = 800
        h, w = _conv_pool_size(name, input_shape, height), _conv_pool_size(name, input_shape, width)
        layers = [
            nn.Conv2d(channels, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(50 * h * w, 500), nn.ReLU(),
            nn.Linear(500, classes),
        ]
        return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))
    if name == "cifar-lenet5":
        # conv 5x5 (valid), ReLU, max-pool 2, twice: 32 -> 28 -> 14 -> 10 -> 5, 16 * 5 * 5 = 400
        h, w = _conv_pool_size(name, input_shape, height), _conv_pool_size(name, input_shape, width)
        layers = [
            nn.Conv2d(channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * h * w, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, classes),
        ]
        return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))
    assert name == "resnet18"
    return ResNet18(channels, classes, sigmoid=sigmoid)


def _mlp(features: int, hidden: tuple[int, ...], classes: int, sigmoid: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, classes))
    if sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def _conv_pool_size(name: str, input_shape, size: int) -> int:
    """Side length after two rounds of (valid 5x5 convolution, 2x2 max-pool)."""
    out = ((size - 4) // 2 - 4) // 2
    if out < 1:
        raise ValueError(f"{name} needs inputs of at least 16x16 pixels, got input_shape "
                         f"{input_shape}")
    return out


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut
    (He et al. 2016, "Deep residual learning", figure 2)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stride-1 stem convolution to 64 channels (no max-pool),
    four stages of two BasicBlocks with 64, 128, 256, 512 channels (stride 1, 2, 2, 2), global
    average pooling and one linear layer; optionally a sigmoid on the logits (``sigmoid=True``)."""

    def __init__(self, in_channels: int = 3, classes: int = 10, sigmoid: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride),
                                        BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = self.fc(torch.flatten(self.avgpool(out), 1))
        return torch.sigmoid(out) if self.sigmoid else out
