"""LimitedMemoryMatrix against dense float64 references built independently with NumPy/SciPy.

References: B by the recursive BFGS / SR1 update formulas (Nocedal & Wright eqs. 6.19, 6.24)
applied oldest-first to gamma*I; the trust-region subproblem by eigen-decomposition of the dense B
and the More-Sorensen characterisation (N&W Theorem 4.1) with the shift found by SciPy's brentq.
"""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from apts_mpi.quasi_newton import LimitedMemoryMatrix

F64 = torch.float64


# ----------------------------------------------------------------------------- references
def dense_bfgs(pairs, gamma, n):
    B = gamma * np.eye(n)
    for s, y in pairs:
        Bs = B @ s
        B = B - np.outer(Bs, Bs) / (s @ Bs) + np.outer(y, y) / (y @ s)
    return B


def dense_sr1(pairs, gamma, n):
    B = gamma * np.eye(n)
    for s, y in pairs:
        v = y - B @ s
        B = B + np.outer(v, v) / (v @ s)
    return B


def dense_tr(B, g, radius):
    """Global minimiser of g^T s + s^T B s / 2, ||s|| <= radius; returns (s, sigma, hard)."""
    lam, V = np.linalg.eigh(B)
    c = V.T @ g
    lam_min = lam[0]
    if lam_min > 0:
        s = -V @ (c / lam)
        if np.linalg.norm(s) <= radius:
            return s, 0.0, False
    # sigma = sigma_low + delta; lam + sigma formed as (lam - lam_min) + delta near the pole
    sigma_low = max(0.0, -lam_min)
    shifted = lam - lam_min if lam_min < 0 else lam
    J = lam - lam_min <= 1e-9 * max(1.0, np.abs(lam).max())
    if lam_min < 0 and np.linalg.norm(c[J]) <= 1e-10 * np.linalg.norm(g):
        c = np.where(J, 0.0, c)
        p = np.where(J, 0.0, -c / np.where(J, 1.0, shifted))
        if np.linalg.norm(p) <= radius:
            tau = math.sqrt(radius**2 - p @ p)
            return V @ p + tau * V[:, 0], sigma_low, True

    def x_of(delta):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(c == 0, 0.0, -c / (shifted + delta))

    def phi(delta):
        return 1.0 / np.linalg.norm(x_of(delta)) - 1.0 / radius

    delta = scipy.optimize.brentq(phi, 0.0, np.linalg.norm(g) / radius + 1.0,
                                  xtol=1e-300, maxiter=2000)
    return V @ x_of(delta), sigma_low + delta, False


def objective(B, g, s):
    return g @ s + 0.5 * s @ B @ s


def assert_kkt(B, g, s, radius, hits, tol):
    """More-Sorensen conditions, checked directly on the dense B (N&W Theorem 4.1)."""
    scale = max(1.0, np.abs(np.linalg.eigvalsh(B)).max())
    ns = np.linalg.norm(s)
    r = B @ s + g
    sigma = -(s @ r) / (s @ s)                     # least-squares multiplier
    assert sigma >= -tol * scale
    assert np.linalg.norm(r + sigma * s) <= tol * (np.linalg.norm(g) + scale * ns)
    assert np.linalg.eigvalsh(B)[0] + sigma >= -tol * scale
    assert ns <= radius * (1 + tol)
    if hits:
        assert abs(ns - radius) <= tol * radius
    else:
        assert abs(sigma) <= tol * scale
    assert abs(sigma * (radius - ns)) <= tol * scale * radius


# ----------------------------------------------------------------------------- problems
def spd(rng, n, lo=0.5, hi=5.0):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * rng.uniform(lo, hi, n)) @ Q.T


def symmetric(rng, n, lo=-3.0, hi=3.0):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * rng.uniform(lo, hi, n)) @ Q.T


def quadratic_pairs(rng, H, count, noise=0.0):
    pairs = []
    for _ in range(count):
        s = rng.standard_normal(H.shape[0])
        pairs.append((s, H @ s + noise * rng.standard_normal(H.shape[0])))
    return pairs


def build(kind, pairs, memory, n, dtype=F64):
    lm = LimitedMemoryMatrix(kind, memory, n, dtype=dtype)
    stored = []
    for s, y in pairs:
        assert lm.update(torch.tensor(s, dtype=dtype), torch.tensor(y, dtype=dtype))
        stored.append((s, y))
    return lm, stored[-memory:]


def dense_of(lm, stored, n):
    return (dense_bfgs if lm.kind == "lbfgs" else dense_sr1)(stored, lm.gamma, n)


def matrix_of(lm, n):
    """B assembled column by column through matvec."""
    return torch.stack([lm.matvec(e) for e in torch.eye(n, dtype=F64)], 1).numpy()


# ----------------------------------------------------------------------------- matvec
@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
@pytest.mark.parametrize("n,memory,count", [(20, 3, 2), (30, 4, 4), (50, 5, 12), (40, 3, 7)])
def test_matvec_matches_recursive_update(kind, n, memory, count):
    rng = np.random.default_rng(n + memory + count)
    H = spd(rng, n) if kind == "lbfgs" else symmetric(rng, n)
    pairs = quadratic_pairs(rng, H, count, noise=0.1)     # not a quadratic: S^T Y not symmetric
    lm, stored = build(kind, pairs, memory, n)
    assert len(lm) == min(count, memory)
    B = dense_of(lm, stored, n)
    v = rng.standard_normal(n)
    np.testing.assert_allclose(lm.matvec(torch.tensor(v)).numpy(), B @ v,
                               rtol=1e-10, atol=1e-10 * np.abs(B).max() * np.linalg.norm(v))
    np.testing.assert_allclose(matrix_of(lm, n), B, rtol=0, atol=1e-10 * np.abs(B).max())


def test_lbfgs_gamma_is_latest_ratio():
    rng = np.random.default_rng(1)
    pairs = quadratic_pairs(rng, spd(rng, 25), 6, noise=0.05)
    lm, _ = build("lbfgs", pairs, 4, 25)
    s, y = pairs[-1]
    assert lm.gamma == pytest.approx((y @ y) / (s @ y), rel=1e-12)


def test_sr1_gamma_is_latest_ratio():
    """gamma = y^T y / s^T y of the newest pair (as L-BFGS; SciPy's SR1 initial scaling), not a
    fraction of the smallest curvature seen, which underestimates every unexplored direction."""
    rng = np.random.default_rng(2)
    n, memory = 30, 4
    pairs = quadratic_pairs(rng, spd(rng, n), 6)
    lm, stored = build("lsr1", pairs, memory, n)
    assert lm.gamma == pytest.approx(sr1_gamma_reference(stored), rel=1e-10)
    np.testing.assert_allclose(matrix_of(lm, n), dense_of(lm, stored, n), rtol=0, atol=1e-9)


def sr1_gamma_reference(stored):
    """y^T y / s^T y of the newest pair, or 1.25 lambda_max when every curvature seen (pencil
    (D + L + L^T, S^T S), SciPy's generalised eigh) is positive and the ratio lies among them."""
    S = np.array([s for s, _ in stored]).T
    Y = np.array([y for _, y in stored]).T
    SY = S.T @ Y
    lam = scipy.linalg.eigh(np.tril(SY) + np.tril(SY, -1).T, S.T @ S, eigvals_only=True)
    s, y = stored[-1]
    ratio = (y @ y) / (s @ y)
    return 1.25 * lam[-1] if lam[0] > 0 and lam[0] <= ratio <= lam[-1] else ratio


def test_sr1_gamma_safeguard_keeps_b_positive_definite_on_a_convex_quadratic():
    """With every curvature seen positive, gamma > the largest of them: the SR1 middle matrix is
    negative definite, B <= gamma I, and here B has no negative curvature (gamma = y^T y / s^T y
    alone would leave it indefinite)."""
    rng = np.random.default_rng(12)
    n = 30
    H = spd(rng, n)
    lm, stored = build("lsr1", quadratic_pairs(rng, H, 5), 4, n)
    B = dense_of(lm, stored, n)
    assert lm.gamma == pytest.approx(sr1_gamma_reference(stored), rel=1e-10)
    s, y = stored[-1]
    assert lm.gamma != pytest.approx((y @ y) / (s @ y))            # the safeguard acted
    assert np.linalg.eigvalsh(dense_sr1(stored, (y @ y) / (s @ y), n))[0] < 0
    lam = np.linalg.eigvalsh(B)
    assert lam[0] > 0 and lam[-1] <= lm.gamma * (1 + 1e-10)


def test_sr1_gamma_kept_after_negative_curvature():
    rng = np.random.default_rng(3)
    n = 20
    lm = LimitedMemoryMatrix("lsr1", 3, n, dtype=F64)
    s = torch.tensor(rng.standard_normal(n))
    assert lm.update(s, -2.0 * s)                  # s^T y < 0: y^T y / s^T y = -2 is no scaling
    assert lm.gamma == 1.0
    B = dense_sr1([(s.numpy(), -2.0 * s.numpy())], 1.0, n)
    assert np.linalg.eigvalsh(B)[0] == pytest.approx(-2.0)


@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
def test_memory_above_numel_drops_oldest_pairs_and_keeps_updating_gamma(kind):
    """memory > n: the (n + 1)-th SR1 pair makes the middle matrix singular; the oldest pairs make
    room instead of the newest being skipped, and gamma still follows the newest pair."""
    rng = np.random.default_rng(9)
    n, memory = 3, 6
    H = spd(rng, n)
    lm = LimitedMemoryMatrix(kind, memory, n, dtype=F64)
    pairs = quadratic_pairs(rng, H, 8)              # exact: more than n pairs are dependent
    gammas = []
    for s, y in pairs:
        assert lm.update(torch.tensor(s), torch.tensor(y))
        gammas.append(lm.gamma)
        if kind == "lbfgs":
            assert lm.gamma == pytest.approx((y @ y) / (s @ y), rel=1e-12)
    assert len(set(gammas[n:])) == len(gammas) - n and all(0 < g < math.inf for g in gammas)
    if kind == "lsr1":    # D + L + L^T - gamma S^T S = S^T (H - gamma I) S has rank <= n
        assert lm.dropped > 0 and len(lm) < memory
    else:                 # the BFGS middle matrix is nonsingular whenever s_i^T y_i > 0 (BNS Thm 2.3)
        assert lm.dropped == 0 and len(lm) == memory
    k = len(lm)
    stored = pairs[-k:]
    np.testing.assert_allclose(matrix_of(lm, n), dense_of(lm, stored, n), rtol=0,
                               atol=1e-8 * np.abs(H).max())
    copy = LimitedMemoryMatrix(kind, memory, n, dtype=F64)
    copy.load_state_dict(lm.state_dict())          # slots compacted: the state round-trips
    np.testing.assert_allclose(matrix_of(copy, n), matrix_of(lm, n), rtol=0, atol=1e-12)


def test_lbfgs_skips_near_saddle_pair():
    """cos(s, y) = 1e-6 passes a 1e-8 test but would set gamma = ||y|| / (||s|| cos) = 1e6."""
    lm = LimitedMemoryMatrix("lbfgs", 3, 2, dtype=F64)
    s = torch.tensor([1.0, 0.0], dtype=F64)
    y = torch.tensor([1e-6, 1.0], dtype=F64)
    assert not lm.update(s, y) and len(lm) == 0 and lm.gamma == 1.0


@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
def test_model_decrease_uses_the_solver_representation(kind):
    """pred of the solver's step is the solver's own objective value: >= 0 and equal to
    -(c^T x + 1/2 x^T diag(lam) x) in the eigenbasis, i.e. >= the Cauchy decrease."""
    rng = np.random.default_rng(10)
    n = 30
    H = spd(rng, n) if kind == "lbfgs" else symmetric(rng, n)
    lm, stored = build(kind, quadratic_pairs(rng, H, 4, noise=0.1), 3, n)
    B = dense_of(lm, stored, n)
    g = rng.standard_normal(n)
    for radius in (0.01, 0.5, 50.0):
        step, _ = lm.solve(torch.tensor(g), radius)
        pred = lm.model_decrease(torch.tensor(g), step)
        assert pred == pytest.approx(-objective(B, g, step.numpy()), rel=1e-9)
        gBg = g @ B @ g
        t = radius / np.linalg.norm(g) if gBg <= 0 else min(radius / np.linalg.norm(g), (g @ g) / gBg)
        assert pred >= -objective(B, g, -t * g) * (1 - 1e-9)
        assert lm.curvature(torch.tensor(g)) == pytest.approx(gBg, rel=1e-9)


def test_ring_buffer_len_and_reset():
    rng = np.random.default_rng(4)
    pairs = quadratic_pairs(rng, spd(rng, 10), 5)
    lm, _ = build("lbfgs", pairs, 3, 10)
    assert len(lm) == 3
    lm.reset()
    assert len(lm) == 0 and lm.gamma == 1.0
    v = torch.tensor(rng.standard_normal(10))
    assert torch.equal(lm.matvec(v), v)


# ----------------------------------------------------------------------------- skip rules
def test_lbfgs_skips_negative_curvature():
    rng = np.random.default_rng(5)
    n = 20
    lm, _ = build("lbfgs", quadratic_pairs(rng, spd(rng, n), 2), 3, n)
    before = lm.state_dict()
    s = torch.tensor(rng.standard_normal(n))
    assert not lm.update(s, -s + 0.01 * torch.tensor(rng.standard_normal(n)))
    assert not lm.update(s, torch.zeros(n, dtype=F64))
    assert len(lm) == 2 and lm.gamma == before["gamma"]


def test_sr1_skips_zero_denominator():
    rng = np.random.default_rng(6)
    n = 20
    lm, _ = build("lsr1", quadratic_pairs(rng, symmetric(rng, n), 2), 4, n)
    s = torch.tensor(rng.standard_normal(n))
    w = torch.tensor(rng.standard_normal(n))
    w -= (w @ s) / (s @ s) * s                     # w orthogonal to s
    y = lm.matvec(s) + w                           # s^T (y - B s) = 0, y - B s = w != 0
    assert not lm.update(s, y)
    assert not lm.update(s, lm.matvec(s))          # y = B s
    assert len(lm) == 2


@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_pair_skipped(kind, bad):
    rng = np.random.default_rng(7)
    n = 15
    lm, stored = build(kind, quadratic_pairs(rng, spd(rng, n), 2), 3, n)
    s, y = torch.tensor(rng.standard_normal(n)), torch.tensor(rng.standard_normal(n))
    s_bad, y_bad = s.clone(), y.clone()
    s_bad[3], y_bad[7] = bad, bad
    assert not lm.update(s_bad, y)
    assert not lm.update(s, y_bad)
    assert len(lm) == 2
    np.testing.assert_allclose(matrix_of(lm, n), dense_of(lm, stored, n), atol=1e-10)


# ----------------------------------------------------------------------------- solve
def random_g(rng, n):
    return rng.standard_normal(n)


def positive_definite(kind, rng, n, memory, count, noise=0.0):
    """Pairs of an SPD H (spectrum in [0.5, 5]).  L-SR1 with gamma = y^T y / s^T y may be
    indefinite; gamma = 0.4 < lambda_min(H) makes B = gamma I + (H - gamma I) S [S^T (H - gamma I)
    S]^{-1} S^T (H - gamma I) positive definite, so it is set through the state."""
    lm, stored = build(kind, quadratic_pairs(rng, spd(rng, n), count, noise), memory, n)
    if kind == "lsr1":
        lm.load_state_dict({**lm.state_dict(), "gamma": 0.4})
    B = dense_of(lm, stored, n)
    assert np.linalg.eigvalsh(B)[0] > 0
    return lm, B


def compare_solve(lm, B, g, radius, tol=1e-6, kkt_tol=1e-8):
    s, hits = lm.solve(torch.tensor(g, dtype=F64), radius)
    s = s.double().numpy()
    s_ref, _, hard = dense_tr(B, g, radius)
    assert hits == (np.linalg.norm(s_ref) >= radius * (1 - 1e-12))
    if not hard:
        assert np.linalg.norm(s - s_ref) <= tol * np.linalg.norm(s_ref)
    f, f_ref = objective(B, g, s), objective(B, g, s_ref)
    assert abs(f - f_ref) <= tol * abs(f_ref)
    assert_kkt(B, g, s, radius, hits, kkt_tol)
    return s, s_ref, hits, hard


@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
@pytest.mark.parametrize("seed", range(3))
def test_solve_positive_definite_interior(kind, seed):
    rng = np.random.default_rng(10 + seed)
    lm, B = positive_definite(kind, rng, 30, 4, 6)
    g = random_g(rng, 30)
    radius = 2.0 * np.linalg.norm(np.linalg.solve(B, g))
    _, _, hits, _ = compare_solve(lm, B, g, radius)
    assert not hits


@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
@pytest.mark.parametrize("seed", range(3))
def test_solve_positive_definite_boundary(kind, seed):
    rng = np.random.default_rng(20 + seed)
    lm, B = positive_definite(kind, rng, 40, 5, 7, noise=0.05)
    g = random_g(rng, 40)
    radius = 0.3 * np.linalg.norm(np.linalg.solve(B, g))
    _, _, hits, _ = compare_solve(lm, B, g, radius)
    assert hits


@pytest.mark.parametrize("seed", range(4))
def test_solve_indefinite_sr1(seed):
    rng = np.random.default_rng(30 + seed)
    n, memory = 30, 5
    lm, stored = build("lsr1", quadratic_pairs(rng, symmetric(rng, n), 7, noise=0.05), memory, n)
    B = dense_of(lm, stored, n)
    assert np.linalg.eigvalsh(B)[0] < 0
    for radius in (0.1, 1.0, 10.0):
        _, _, hits, hard = compare_solve(lm, B, random_g(rng, n), radius)
        assert hits and not hard


def test_solve_hard_case_in_range_of_psi():
    rng = np.random.default_rng(40)
    n, memory = 30, 5
    lm, stored = build("lsr1", quadratic_pairs(rng, symmetric(rng, n), 5), memory, n)
    B = dense_of(lm, stored, n)
    lam, V = np.linalg.eigh(B)
    assert lam[0] < 0 < lm.gamma and lam[1] - lam[0] > 1e-3
    g = random_g(rng, n)
    g -= (g @ V[:, 0]) * V[:, 0]                   # g orthogonal to the lambda_min eigenvector
    pinv = -np.linalg.pinv(B - lam[0] * np.eye(n)) @ g
    radius = 2.0 * np.linalg.norm(pinv)
    s, s_ref, hits, hard = compare_solve(lm, B, g, radius)
    assert hard and hits
    P = np.eye(n) - np.outer(V[:, 0], V[:, 0])     # the step is unique up to the sign of z
    np.testing.assert_allclose(P @ s, P @ s_ref, atol=1e-8 * radius)
    np.testing.assert_allclose(P @ s, pinv, atol=1e-8 * radius)


def test_solve_hard_case_in_complement():
    """gamma < 0 is the smallest eigenvalue, with eigenspace the complement of range(Psi)."""
    rng = np.random.default_rng(41)
    n, memory, gamma = 25, 4, -1.0
    lm, stored = build("lsr1", quadratic_pairs(rng, spd(rng, n), 4), memory, n)
    state = lm.state_dict()
    state["gamma"] = gamma                          # a state that update() never produces
    lm.load_state_dict(state)
    B = dense_sr1(stored, gamma, n)
    lam = np.linalg.eigvalsh(B)
    assert lam[0] == pytest.approx(gamma) and lam[n - memory - 1] == pytest.approx(gamma)
    assert lam[n - memory] > gamma + 1e-3
    Psi = np.array([y - gamma * s for s, y in stored]).T
    g = Psi @ rng.standard_normal(memory)           # g in range(Psi)
    pinv = -np.linalg.pinv(B - gamma * np.eye(n)) @ g
    radius = 3.0 * np.linalg.norm(pinv)
    s, s_ref, hits, hard = compare_solve(lm, B, g, radius)
    assert hard and hits
    Qpsi, _ = np.linalg.qr(Psi)                     # component in range(Psi) is unique
    np.testing.assert_allclose(Qpsi @ (Qpsi.T @ s), pinv, atol=1e-8 * radius)


@pytest.mark.parametrize("offset", [1e-4, 1e-8])
def test_solve_near_hard_case(offset):
    rng = np.random.default_rng(42)
    n, memory = 30, 5
    lm, stored = build("lsr1", quadratic_pairs(rng, symmetric(rng, n), 5), memory, n)
    B = dense_of(lm, stored, n)
    lam, V = np.linalg.eigh(B)
    g = random_g(rng, n)
    g += (offset * np.linalg.norm(g) - g @ V[:, 0]) * V[:, 0]
    radius = 2.0 * np.linalg.norm(np.linalg.pinv(B - lam[0] * np.eye(n)) @ g)
    _, _, hits, hard = compare_solve(lm, B, g, radius, tol=1e-6)
    assert hits and not hard


def test_solve_no_pairs():
    rng = np.random.default_rng(50)
    n = 20
    lm = LimitedMemoryMatrix("lsr1", 3, n, dtype=F64)
    g = random_g(rng, n)
    for radius, hits_ref in ((0.5 * np.linalg.norm(g), True), (2.0 * np.linalg.norm(g), False)):
        s, hits = lm.solve(torch.tensor(g), radius)
        s_ref, _, _ = dense_tr(np.eye(n), g, radius)
        assert hits == hits_ref
        np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-12, atol=1e-14)


def test_solve_no_pairs_negative_gamma_and_zero_gradient():
    n = 12
    lm = LimitedMemoryMatrix("lbfgs", 2, n, dtype=F64)
    state = lm.state_dict()
    state["gamma"] = -0.5
    lm.load_state_dict(state)                      # B = -0.5 I: every direction is the hard case
    s, hits = lm.solve(torch.zeros(n, dtype=F64), 0.7)
    assert hits and torch.linalg.vector_norm(s).item() == pytest.approx(0.7)
    assert lm.model_decrease(torch.zeros(n, dtype=F64), s) == pytest.approx(0.25 * 0.49)


def test_solve_memory_exceeding_numel():
    """2 * memory > numel: range(Psi) fills the space and the complement is empty."""
    rng = np.random.default_rng(51)
    n, memory = 6, 5
    lm, stored = build("lbfgs", quadratic_pairs(rng, spd(rng, n), 5), memory, n)
    B = dense_of(lm, stored, n)
    g = random_g(rng, n)
    for radius in (0.05, 100.0):
        compare_solve(lm, B, g, radius)


# ----------------------------------------------------------------------------- float32, state
@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
def test_float32(kind):
    rng = np.random.default_rng(60)
    n, memory = 40, 4
    H = spd(rng, n) if kind == "lbfgs" else symmetric(rng, n)
    pairs32 = [(s.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64))
               for s, y in quadratic_pairs(rng, H, 6, noise=0.05)]
    lm, stored = build(kind, pairs32, memory, n, dtype=torch.float32)
    B = dense_of(lm, stored, n)
    g = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    v = lm.matvec(torch.tensor(g, dtype=torch.float32))
    assert v.dtype == torch.float32
    np.testing.assert_allclose(v.double().numpy(), B @ g, rtol=0,
                               atol=1e-4 * np.abs(B).max() * np.linalg.norm(g))
    for radius in (0.1, 1.0, 100.0):
        s, hits = lm.solve(torch.tensor(g, dtype=torch.float32), radius)
        assert s.dtype == torch.float32
        s = s.double().numpy()
        s_ref, _, _ = dense_tr(B, g, radius)
        assert np.linalg.norm(s - s_ref) <= 1e-3 * np.linalg.norm(s_ref)
        assert objective(B, g, s) == pytest.approx(objective(B, g, s_ref), rel=1e-4)


@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
def test_state_dict_round_trip_is_bitwise(kind):
    rng = np.random.default_rng(70)
    n, memory = 30, 3
    H = spd(rng, n) if kind == "lbfgs" else symmetric(rng, n)
    lm, _ = build(kind, quadratic_pairs(rng, H, 5, noise=0.1), memory, n, dtype=torch.float32)
    state = lm.state_dict()
    copy = LimitedMemoryMatrix(kind, memory, n, dtype=torch.float32)
    copy.load_state_dict(state)
    g = torch.tensor(rng.standard_normal(n), dtype=torch.float32)
    for radius in (0.01, 1.0, 1e3):
        (s1, h1), (s2, h2) = lm.solve(g, radius), copy.solve(g, radius)
        assert h1 == h2 and torch.equal(s1, s2)
    s, y = (torch.tensor(v, dtype=torch.float32) for v in quadratic_pairs(rng, H, 1, 0.1)[0])
    assert lm.update(s, y) == copy.update(s, y)     # identical after a further (wrapping) update
    assert torch.equal(lm.solve(g, 1.0)[0], copy.solve(g, 1.0)[0])
    assert len(state["order"]) == memory and not torch.equal(state["S"], lm.state_dict()["S"])


def test_load_state_dict_rejects_other_shape():
    lm = LimitedMemoryMatrix("lbfgs", 3, 10)
    with pytest.raises(ValueError, match="memory"):
        LimitedMemoryMatrix("lbfgs", 4, 10).load_state_dict(lm.state_dict())
    with pytest.raises(ValueError, match="kind"):
        LimitedMemoryMatrix("lsr1", 3, 10).load_state_dict(lm.state_dict())


# ----------------------------------------------------------------------------- model decrease
@pytest.mark.parametrize("kind", ["lbfgs", "lsr1"])
def test_model_decrease_matches_dense(kind):
    rng = np.random.default_rng(80)
    n = 30
    lm, stored = build(kind, quadratic_pairs(rng, symmetric(rng, n) if kind == "lsr1"
                                             else spd(rng, n), 4, noise=0.1), 3, n)
    B = dense_of(lm, stored, n)
    g, s = rng.standard_normal(n), rng.standard_normal(n)
    assert lm.model_decrease(torch.tensor(g), torch.tensor(s)) == pytest.approx(
        -objective(B, g, s), rel=1e-10)
    step, _ = lm.solve(torch.tensor(g), 0.5)
    assert lm.model_decrease(torch.tensor(g), step) > 0


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("args,match", [
    (("dfp", 3, 10), "kind must be one of"),
    (("lbfgs", 0, 10), "memory must be an integer >= 1"),
    (("lsr1", 2.5, 10), "memory must be an integer >= 1"),
    (("lsr1", 3, 0), "numel must be an integer >= 1"),
])
def test_bad_constructor_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        LimitedMemoryMatrix(*args)


@pytest.mark.parametrize("radius", [0.0, -1.0, math.nan, math.inf])
def test_bad_radius(radius):
    lm = LimitedMemoryMatrix("lbfgs", 3, 5)
    with pytest.raises(ValueError, match="radius must be a finite number > 0"):
        lm.solve(torch.ones(5), radius)


def test_bad_vector_shape():
    lm = LimitedMemoryMatrix("lsr1", 3, 5)
    with pytest.raises(ValueError, match=r"s must have shape \(5,\)"):
        lm.update(torch.ones(4), torch.ones(5))
    with pytest.raises(ValueError, match=r"g must have shape \(5,\)"):
        lm.solve(torch.ones(5, 1), 1.0)


def test_sr1_pair_orthogonal_to_its_step_is_stored_with_the_gamma_kept():
    """s^T y = 0 (y orthogonal to s) passes SR1's test, since s^T (y - B s) = -gamma s^T s: the
    pair is stored, gamma is kept, and B is the dense SR1 update of gamma I.  (Once raised
    ZeroDivisionError in y^T y / s^T y: TrustRegion, lsr1, memory 5, 2-norm, on Wood.)"""
    n = 6
    lm = LimitedMemoryMatrix("lsr1", 5, n, dtype=F64)
    s, y = np.eye(n)[0] * 0.5, np.eye(n)[1] * 2.0
    assert lm.update(torch.tensor(s), torch.tensor(y))
    assert lm.gamma == 1.0
    np.testing.assert_allclose(matrix_of(lm, n), dense_sr1([(s, y)], 1.0, n), rtol=0, atol=1e-14)
