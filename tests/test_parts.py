"""The iteration's parts on their own: the coordinator's decisions by hand, and the one rho rule
and radius rule the host engine, the device engine and the coordinator share."""
import math

import pytest
import torch

from apts_mpi.comm import Comm
from apts_mpi.iteration.coordinator import Coordinator
from apts_mpi.trust_region import TrustRegionConfig, ratio, update_radius

RULE = dict(eta1=0.25, eta2=0.75, decrease=0.5, increase=2.0, min_radius=1e-4, max_radius=1.0)


def coordinator(acceptance="ratio", dtype=torch.float64, window=3):
    config = TrustRegionConfig(radius=0.1, **RULE)
    return Coordinator(Comm(None), config, acceptance, window, dtype)


def test_ratio_test_by_hand():
    c = coordinator()
    assert c.decide(1.0, 0.9, 0.2) == (True, pytest.approx(0.5), 0.1)        # eta1 <= rho <= eta2
    assert c.decide(1.0, 0.8, 0.2) == (True, pytest.approx(1.0), 0.2)        # very good: grows
    assert c.decide(1.0, 0.99, 0.2) == (False, pytest.approx(0.05), 0.05)    # poor: shrinks
    accept, rho, radius = c.decide(1.0, math.nan, 0.2)
    assert (accept, rho, radius) == (False, -math.inf, 0.05)
    assert c.decide(1.0, 0.5, 0.0)[:2] == (False, -math.inf)                 # no decrease predicted


def test_rounding_level_decreases_accept_in_float32():
    """Both decreases below 10 eps max(1, |f|): rho = 1, as in the engine (issue 22's defect: the
    coordinator rejected with rho = -0.40 and halved the radius)."""
    accept, rho, radius = coordinator(dtype=torch.float32).decide(1.0, 1.0 + 2e-8, 5e-8)
    assert (accept, rho, radius) == (True, 1.0, 0.2)
    accept, rho, _ = coordinator(dtype=torch.float64).decide(1.0, 1.0 + 2e-8, 5e-8)
    assert not accept and rho == pytest.approx(-0.4)   # far above float64's rounding level


def test_acceptance_none_and_nonmonotone_by_hand():
    c = coordinator("none")
    assert c.decide(1.0, 1.5, 0.2)[0] and c.decide(1.0, 1.5, 0.2)[2] == 0.1  # applied, radius kept
    assert not c.decide(1.0, math.inf, 0.2)[0]
    c = coordinator("nonmonotone")
    for loss in (3.0, 2.0):
        assert c.settle(loss + 1.0, loss, 1.0)[0]      # accepted: the window holds 3.0, 2.0
    # f(theta_k) = 1.0, trial 1.5: the reference is max(1.0, 3.0, 2.0) = 3.0, rho = 1.5 / 1.0
    accept, rho, *_ = c.settle(1.0, 1.5, 1.0)
    assert accept and rho == 1.5


@pytest.mark.parametrize("actual,pred,finite,loss", [
    (0.3, 0.2, True, 5.0), (-0.1, 0.2, True, 1.0), (1e-17, 2e-17, True, 0.5),
    (1e-17, -3e-16, True, 2.0), (0.3, 0.2, False, 1.0), (2e-15, 1e-3, True, 1.0)])
def test_one_rho_rule_on_host_floats_and_device_tensors(actual, pred, finite, loss):
    eps = torch.finfo(torch.float64).eps
    host = ratio(actual, pred, finite, loss, eps)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    device = ratio(t(actual), t(pred), torch.tensor(finite), t(loss), eps)
    assert float(device) == host or (math.isnan(host) and math.isnan(float(device)))
    expected = -math.inf if not finite else 1.0 if max(abs(actual), abs(pred)) <= 10 * eps * max(1, loss) \
        else actual / pred
    assert host == expected


@pytest.mark.parametrize("rho", [-1.0, 0.1, 0.25, 0.5, 0.75, 0.9, math.nan])
@pytest.mark.parametrize("radius", [1e-4, 0.3, 0.8])
def test_one_radius_rule_on_host_floats_and_device_tensors(rho, radius):
    host = update_radius(radius, rho, **RULE)
    device = update_radius(torch.tensor(radius, dtype=torch.float64),
                           torch.tensor(rho, dtype=torch.float64), **RULE)
    assert float(device) == host
    expected = radius if 0.25 <= rho <= 0.75 else min(2 * radius, 1.0) if rho > 0.75 \
        else max(0.5 * radius, 1e-4)
    assert host == expected
