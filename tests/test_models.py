"""Networks of apts_mpi.models: shapes, parameter counts against hand counts, the sigmoid head."""
import math

import pytest
import torch
import torch.nn.functional as F

from apts_mpi.models import HEADS, MODELS, build_model, count_parameters

NATURAL_INPUT = {
    "mlp-digits": (1, 8, 8),
    "mnist-fc-small": (1, 28, 28),
    "mnist-fc": (1, 28, 28),
    "mnist-cnn": (1, 28, 28),
    "cifar-fc": (3, 32, 32),
    "cifar-lenet5": (3, 32, 32),
    "resnet18": (3, 32, 32),
}


def linear(n_in, n_out):
    return n_in * n_out + n_out


def conv(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def batchnorm(c):
    return 2 * c  # weight and bias; running statistics are buffers


def resnet18_hand_count(in_channels, classes):
    total = conv(in_channels, 64, 3, bias=False) + batchnorm(64)
    c_in = 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        # first block: two 3x3 convolutions, projection shortcut where the shape changes
        total += conv(c_in, c, 3, bias=False) + batchnorm(c)
        total += conv(c, c, 3, bias=False) + batchnorm(c)
        if stride != 1 or c_in != c:
            total += conv(c_in, c, 1, bias=False) + batchnorm(c)
        # second block: identity shortcut
        total += 2 * (conv(c, c, 3, bias=False) + batchnorm(c))
        c_in = c
    return total + linear(512, classes)


HAND_COUNTS = {
    "mlp-digits": linear(64, 32) + linear(32, 10),
    "mnist-fc-small": linear(784, 32) + linear(32, 32) + linear(32, 10),
    "mnist-fc": linear(784, 512) + linear(512, 256) + linear(256, 10),
    "mnist-cnn": conv(1, 20, 5) + conv(20, 50, 5) + linear(800, 500) + linear(500, 10),
    "cifar-fc": linear(3072, 512) + linear(512, 256) + linear(256, 10),
    "cifar-lenet5": conv(3, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84)
    + linear(84, 10),
    "resnet18": resnet18_hand_count(3, 10),
}


def test_models_table_is_complete():
    assert set(MODELS) == set(NATURAL_INPUT)
    assert set(HEADS) == {"logits", "sigmoid"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shape_and_dtype(name):
    torch.manual_seed(0)
    model = build_model(name, NATURAL_INPUT[name], 10)
    x = torch.randn(3, *NATURAL_INPUT[name])
    out = model(x)
    assert out.shape == (3, 10)
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    assert torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_matches_hand_count(name):
    assert count_parameters(build_model(name, NATURAL_INPUT[name], 10)) == HAND_COUNTS[name]


def test_mnist_fc_has_535818_parameters():
    # 784*512 + 512 + 512*256 + 256 + 256*10 + 10
    assert 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10 == 535_818
    assert count_parameters(build_model("mnist-fc", (1, 28, 28), 10)) == 535_818


def test_resnet18_count_is_the_known_cifar_value():
    # the widely quoted size of the CIFAR-style ResNet-18 with 10 classes
    assert resnet18_hand_count(3, 10) == 11_173_962
    model = build_model("resnet18", (3, 32, 32), 100)
    assert count_parameters(model) == resnet18_hand_count(3, 100)


def test_classes_and_input_shape_are_used():
    model = build_model("mnist-fc", (3, 32, 32), 7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert count_parameters(model) == linear(3072, 512) + linear(512, 256) + linear(256, 7)
    cnn = build_model("mnist-cnn", (1, 32, 32), 4)  # 32 -> 28 -> 14 -> 10 -> 5
    assert cnn(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert count_parameters(cnn) == (conv(1, 20, 5) + conv(20, 50, 5) + linear(1250, 500)
                                     + linear(500, 4))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sigmoid_head_is_sigmoid_of_logits(name):
    shape = NATURAL_INPUT[name]
    torch.manual_seed(1)
    plain = build_model(name, shape, 10)
    squashed = build_model(name, shape, 10, head="sigmoid")
    # same parameter names and shapes: one initial state serves both heads
    squashed.load_state_dict(plain.state_dict())
    plain.eval(), squashed.eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        logits, probs = plain(x), squashed(x)
    assert ((probs > 0) & (probs < 1)).all()
    torch.testing.assert_close(probs, torch.sigmoid(logits))


def test_sigmoid_head_loss_floor():
    model = build_model("mlp-digits", (1, 8, 8), 10, head="sigmoid")
    last = model[-2]
    with torch.no_grad():  # saturate: output 1 for class 3, 0 for the others
        last.weight.zero_()
        last.bias.fill_(-50.0)
        last.bias[3] = 50.0
    loss = F.cross_entropy(model(torch.randn(5, 1, 8, 8)), torch.full((5,), 3))
    floor = math.log(1 + 9 / math.e)  # -log(e / (e + 9))
    assert abs(floor - 1.4612) < 1e-4
    assert loss.item() == pytest.approx(floor, abs=1e-5)


def test_unknown_model_or_head_raises():
    with pytest.raises(ValueError, match="valid models: .*mnist-fc.*resnet18"):
        build_model("vgg16", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="valid heads: logits, sigmoid"):
        build_model("mnist-fc", (1, 28, 28), 10, head="softmax")
    with pytest.raises(ValueError, match="at least 16x16"):
        build_model("mnist-cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mnist-fc", (784,), 10)
    with pytest.raises(ValueError, match="classes"):
        build_model("mnist-fc", (1, 28, 28), 0)
