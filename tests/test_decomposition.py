"""Decompositions cover every parameter exactly once; balanced is the exact min-max split."""
import itertools

import numpy as np
import pytest
import torch

from apts_mpi.decomposition import STRATEGIES, Subdomain, decompose
from apts_mpi.models import build_model


def coverage(model, parts):
    """How many subdomains own each coordinate of the flattened parameters."""
    params = [p for p in model.parameters()]
    counts = [np.zeros(p.numel(), dtype=int) for p in params]
    for sd in parts:
        for piece in sd.pieces:
            counts[piece.index][piece.start:piece.stop] += 1
    return np.concatenate(counts)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name, n_max", [("mnist-fc", 6), ("mlp-digits", 4), ("cifar-lenet5", 10)])
def test_every_parameter_exactly_once(strategy, name, n_max):
    shape = {"mnist-fc": (1, 28, 28), "mlp-digits": (1, 8, 8), "cifar-lenet5": (3, 32, 32)}[name]
    model = build_model(name, shape, 10)
    if strategy == "stages":  # whole top-level children: at most one block per layer
        n_max = min(n_max, sum(any(True for _ in child.parameters()) for child in model))
    for n in range(1, n_max + 1):
        parts = decompose(model, n, strategy, seed=5)
        assert len(parts) == n
        assert (coverage(model, parts) == 1).all()
        assert sum(sd.numel for sd in parts) == sum(p.numel() for p in model.parameters())


def test_same_seed_same_split_other_seed_may_differ():
    model = build_model("cifar-lenet5", (3, 32, 32), 10)
    a = decompose(model, 3, "random-tensors", seed=1)
    b = decompose(model, 3, "random-tensors", seed=1)
    assert [sd.pieces for sd in a] == [sd.pieces for sd in b]
    splits = {tuple(tuple(p.index for p in sd.pieces) for sd in decompose(model, 3, "random-tensors", seed=s))
              for s in range(10)}
    assert len(splits) > 1


def test_balanced_is_the_exact_min_max_contiguous_split():
    """Against brute force over every placement of the cuts: layers (weight + bias) as units
    while N <= 5 layers, tensors beyond."""
    model = build_model("cifar-lenet5", (3, 32, 32), 10)
    tensors = [p.numel() for p in model.parameters()]
    layers = [a + b for a, b in zip(tensors[::2], tensors[1::2])]
    for n in (2, 3, 4, 5, 6, 7, 9):
        sizes = layers if n <= len(layers) else tensors
        parts = decompose(model, n, "balanced")
        got = max(sd.numel for sd in parts)
        best = min(max(sum(sizes[a:b]) for a, b in zip((0,) + cuts, cuts + (len(sizes),)))
                   for cuts in itertools.combinations(range(1, len(sizes)), n - 1))
        assert got == best
        indices = [p.index for sd in parts for p in sd.pieces]
        assert indices == sorted(indices)  # contiguous runs in model order


def test_balanced_keeps_weight_and_bias_together_when_it_can():
    model = build_model("mnist-fc", (1, 28, 28), 10)
    parts = decompose(model, 2, "balanced")
    assert [[p.index for p in sd.pieces] for sd in parts] == [[0, 1], [2, 3, 4, 5]]


def test_flat_sizes_differ_by_at_most_one():
    model = build_model("mlp-digits", (1, 8, 8), 10)
    for n in (1, 3, 7, 100):
        sizes = [sd.numel for sd in decompose(model, n, "flat")]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("strategy, n, unit", [("balanced", 5, "parameter tensors"),
                                               ("random-tensors", 5, "parameter tensors"),
                                               ("flat", 2411, "parameters")])
def test_too_many_subdomains_is_a_clear_error(strategy, n, unit):
    model = build_model("mlp-digits", (1, 8, 8), 10)  # 4 tensors, 2410 parameters
    with pytest.raises(ValueError, match=f"subdomains={n} exceeds the .* {unit}"):
        decompose(model, n, strategy)


def test_gather_scatter_add_round_trip():
    torch.manual_seed(0)
    model = build_model("mlp-digits", (1, 8, 8), 10).double()
    reference = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    for sd in decompose(model, 3, "flat"):
        v = sd.gather(torch.empty(sd.numel, dtype=torch.float64))
        expected = torch.cat([reference[sum(p.numel() for p in list(model.parameters())[:q.index]) + q.start:
                                        sum(p.numel() for p in list(model.parameters())[:q.index]) + q.stop]
                              for q in sd.pieces])
        assert torch.equal(v, expected)
        sd.add_(torch.ones_like(v), alpha=0.5)
        assert torch.equal(sd.gather(torch.empty_like(v)), v + 0.5)
        sd.scatter(v)
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), reference)


def test_add_is_the_elementwise_sum_of_the_flat_vectors():
    """add_ over the pieces (one fused kernel) equals theta + alpha * w formed on the flat vector,
    bitwise, for float32 and a split tensor."""
    torch.manual_seed(0)
    model = build_model("mlp-digits", (1, 8, 8), 10)
    for sd in decompose(model, 3, "flat"):
        v = sd.gather(torch.empty(sd.numel))
        w = torch.randn(sd.numel)
        sd.add_(w, alpha=-0.37)
        assert torch.equal(sd.gather(torch.empty(sd.numel)), torch.add(v, w, alpha=-0.37))


def test_mixed_dtypes_are_refused():
    a = torch.zeros(3, dtype=torch.float32)
    b = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="share one dtype and device"):
        Subdomain.whole([a, b])


def deep_mlp(layers=6, width=16):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*mods)


def hand_cost(i, j, k, cached=True):
    """One local gradient evaluation, in units of one layer's forward product, for layers i..j-1 of
    k equal layers: forward of layers i.. (all without the cache), input gradients of layers i+1..,
    weight gradients of layers i..j-1."""
    return (k - i if cached else k) + (k - i - 1) + (j - i)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("with_example", [False, True])
def test_cost_split_is_the_min_max_of_the_hand_cost(cached, with_example):
    """Six equal layers: by hand (cached prefix), a cut after c layers costs 11 + c on the first
    subdomain and 17 - 3c on the second, so c = 2 (13 vs 11), where the parameter count cuts at 3.
    For N = 2, 3, 4 the split equals the brute-force minimum over every placement of the cuts, and
    the predicted costs are the hand costs times one layer's forward FLOPs (2 x rows x 16 x 16 with
    an example of ``rows`` rows, the weight's 256 entries without)."""
    k, rows = 6, 5
    model = deep_mlp(k)
    example = torch.randn(rows, 16) if with_example else None
    unit = 2 * rows * 256 if with_example else 256
    from apts_mpi.decomposition import evaluation_costs
    for n in (2, 3, 4):
        parts = decompose(model, n, "cost", example=example, prefix_cached=cached)
        layers = [sorted({p.index // 2 for p in sd.pieces}) for sd in parts]
        cuts = tuple(run[0] for run in layers[1:])
        best = min(itertools.combinations(range(1, k), n - 1),
                   key=lambda c: max(hand_cost(a, b, k, cached)
                                     for a, b in zip((0,) + c, c + (k,))))
        bounds = list(zip((0,) + cuts, cuts + (k,)))
        assert max(hand_cost(a, b, k, cached) for a, b in bounds) == \
            max(hand_cost(a, b, k, cached) for a, b in zip((0,) + best, best + (k,)))
        costs = evaluation_costs(model, parts, example, prefix_cached=cached)
        assert costs == [unit * hand_cost(a, b, k, cached) for a, b in bounds]
    if cached:
        two = decompose(model, 2, "cost", example=example)
        assert [p.index for p in two[1].pieces][0] == 4  # cut after layer 2 (tensors 0-3)
        assert [p.index for p in decompose(model, 2, "balanced")[1].pieces][0] == 6


def test_cost_counts_a_convolution_by_its_flops():
    """With an example, a convolution's cost includes its spatial size (hand count: 2 x outputs x
    kernel volume), which the parameter shapes alone cannot give."""
    from apts_mpi.decomposition import _unit_flops, _units
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5))
    params = list(model.parameters())
    flops = _unit_flops(model, params, _units(model, params, True), torch.randn(2, 3, 8, 8))
    assert flops == [2 * 2 * 4 * 6 * 6 * 3 * 3 * 3, 2 * 2 * 144 * 5]


def test_cost_count_leaves_the_model_as_it_was():
    """Counting FLOPs on an example runs the network once: batch-norm running statistics and the
    train/eval flags are left as they were."""
    model = build_model("resnet18", (3, 8, 8), 10)
    model.layer1.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    decompose(model, 4, "cost", example=torch.randn(2, 3, 8, 8), prefix_cached=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert flags == [m.training for m in model.modules()]
