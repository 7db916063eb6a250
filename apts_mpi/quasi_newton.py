"""Limited-memory quasi-Newton matrices in compact form, with an exact 2-norm trust-region solver.

The quasi-Newton model of section 4 of the method card is m(s) = f + g^T s + 1/2 s^T B s with

    B = gamma I + Psi M Psi^T                          (Byrd, Nocedal, Schnabel 1994, compact form)

built from the last ``memory`` accepted pairs (s_i, y_i) = (step, gradient change), oldest first.
With S = [s_1 .. s_k], Y = [y_1 .. y_k], L the strictly lower triangle of S^T Y (L_ij = s_i^T y_j,
i > j) and D its diagonal:

- L-BFGS ("lbfgs", BNS section 2): Psi = [gamma S, Y],  M = -[[gamma S^T S, L], [L^T, -D]]^{-1};
- L-SR1  ("lsr1",  BNS section 5):  Psi = Y - gamma S,   M = (D + L + L^T - gamma S^T S)^{-1}.

Both equal the recursive BFGS / SR1 updates (Nocedal & Wright, Numerical Optimization, 2nd ed.,
eqs. 6.19 and 6.24; compact forms in their section 7.2) applied oldest-first to gamma I, with gamma
the *current* value of the initial scaling.

Choice of gamma (B on the orthogonal complement of range(Psi), i.e. every direction no pair has
explored), always finite and > 0 for matrices built by ``update``:

- no pairs stored: gamma = 1.0;
- both kinds: gamma = y^T y / s^T y of the newest pair (the reciprocal of Nocedal & Wright
  eq. 7.20; SciPy's ``SR1`` and ``BFGS`` initial scaling), the curvature of the quadratic that
  fits the newest pair.  L-SR1 keeps the previous gamma when s^T y <= 0 or the ratio is not finite
  (negative curvature seen: B may then be indefinite, which is the point of SR1), and takes
  1.25 x the largest curvature seen when every curvature seen is positive and the ratio lies among
  them (``_sr1_safeguard``: B would otherwise get negative curvature that no pair showed).

``update`` skips a pair (returns False, state unchanged) when s or y is not finite, when
s^T s, s^T y or y^T y overflows, or when the kind's own test fails (L-BFGS: s^T y <= 1e-4 ||s|| ||y||,
i.e. cos(s, y) <= 1e-4: a near-saddle pair would set gamma = ||y|| / (||s|| cos) huge; L-SR1:
|s^T (y - B s)| <= 1e-8 ||s|| ||y - B s||, Nocedal & Wright eq. 6.26, with ``<=`` so that
y = B s is skipped too).  When the middle matrix of the new set of pairs, scaled symmetrically to
unit row maxima, is singular or has a 2-norm condition number above 0.01 / eps(dtype) (8.4e4 in
float32, 4.5e13 in float64), the oldest pairs are dropped until it is not (this is what happens
when memory > n: the pairs are linearly dependent); only if the newest pair alone fails is it
skipped.

The trust-region solver works in the eigen-representation of B (``solve``); ``model_decrease``
and ``curvature`` use that same representation, so that the decrease the engine predicts is the
one of the model the step minimises (the compact form and the eigen-form can differ by more than
the decrease when M is badly conditioned).

Precision and devices: the n-length work (products with the (memory, numel) buffers, the thin QR
of Psi) runs in the buffers' dtype on their device; the small (2m x 2m) matrices (Gram matrices,
middle matrix, R M R^T and its eigen-decomposition) are float64 on the same device. ``update``,
``model_decrease`` and ``solve`` synchronise with the host for a few scalars (skip tests, gamma,
the secular equation, which is solved on the host in float64 over at most 2m + 1 numbers).
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

__all__ = ["LimitedMemoryMatrix"]

_KINDS = ("lbfgs", "lsr1")
_DEFAULT_GAMMA = 1.0
_CURVATURE_COS = 1e-4      # L-BFGS: store only if s^T y > cos ||s|| ||y||
_SR1_SKIP = 1e-8           # r in Nocedal & Wright eq. 6.26
_SR1_ABOVE = 1.25          # safeguarded L-SR1 gamma = 1.25 x the largest curvature seen
_COND_FACTOR = 0.01        # skip if cond(scaled middle matrix) > factor / eps(dtype)
_NEWTON_MAXITER = 100
_NEWTON_RTOL = 1e-12       # stop when | radius / ||s(sigma)|| - 1 | <= rtol


class LimitedMemoryMatrix:
    """B = gamma*I + Psi M Psi^T, limited-memory SR1 ("lsr1") or BFGS ("lbfgs"), compact form.

    Byrd, Nocedal, Schnabel, "Representations of quasi-Newton matrices and their use in limited
    memory methods", Math. Program. 63 (1994). Stores at most ``memory`` pairs in preallocated
    (memory, numel) buffers (ring order), so memory scales with ``numel`` (a rank's subdomain),
    not with the whole network. See the module docstring for gamma and the skip rules.

    Parameters
    ----------
    kind : {"lsr1", "lbfgs"}
    memory : int
        Maximum number of stored pairs, >= 1.
    numel : int
        Length n of the flat vectors, >= 1.
    dtype, device
        Of the (memory, numel) buffers and of every n-length operation. Input vectors are cast
        to them.

    Raises
    ------
    ValueError
        Unknown ``kind``, ``memory < 1``, ``numel < 1`` or a non-floating ``dtype``.
    """

    def __init__(self, kind: str, memory: int, numel: int, dtype=torch.float32, device="cpu"):
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        memory, numel = _positive_int(memory, "memory"), _positive_int(numel, "numel")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self._kind, self._memory, self._numel = kind, memory, numel
        self._dtype, self._device = dtype, torch.device(device)
        self._cond_max = _COND_FACTOR / torch.finfo(dtype).eps
        self._S = torch.zeros(memory, numel, dtype=dtype, device=self._device)
        self._Y = torch.zeros_like(self._S)
        # Gram matrices in slot order: SS[i, j] = s_i^T s_j, SY[i, j] = s_i^T y_j.
        self._SS = torch.zeros(memory, memory, dtype=torch.float64, device=self._device)
        self._SY = torch.zeros_like(self._SS)
        self.dropped = 0          # pairs dropped to keep the middle matrix well conditioned
        self.reset()

    # ------------------------------------------------------------------ state
    @property
    def kind(self) -> str:
        return self._kind

    @property
    def memory(self) -> int:
        return self._memory

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def gamma(self) -> float:
        """The initial scaling: B = gamma I on the orthogonal complement of range(Psi)."""
        return self._gamma

    def __len__(self) -> int:
        return len(self._order)

    def reset(self) -> None:
        """Forget every pair; B = 1.0 * I."""
        self._order = []          # slots of the stored pairs, oldest first
        self._gamma = _DEFAULT_GAMMA
        self._C = self._M = None  # Psi = [S; Y]^T C in slot order, middle matrix M
        self._eig = None          # cached (Q, U, lambda_par) of solve's representation

    def state_dict(self) -> dict:
        """Pairs, Gram matrices, ring order and gamma (tensors cloned)."""
        k = len(self)
        return {
            "kind": self._kind, "memory": self._memory, "numel": self._numel,
            "gamma": self._gamma, "order": list(self._order),
            "S": self._S[:k].clone(), "Y": self._Y[:k].clone(),
            "SS": self._SS[:k, :k].clone(), "SY": self._SY[:k, :k].clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the middle matrix is rebuilt exactly as ``update`` built it.

        ``gamma`` is taken from the state as given (any finite value; ``update`` itself only
        produces gamma > 0).

        Raises
        ------
        ValueError
            The state belongs to another kind/memory/numel, is inconsistent, or its middle matrix
            is singular for its gamma.
        """
        for key in ("kind", "memory", "numel"):
            if state[key] != getattr(self, "_" + key):
                raise ValueError(f"state has {key}={state[key]!r}, this matrix has "
                                 f"{getattr(self, '_' + key)!r}")
        order, gamma = [int(i) for i in state["order"]], float(state["gamma"])
        k = len(order)
        if sorted(order) != list(range(k)) or k > self._memory:
            raise ValueError(f"state order {order} is not a permutation of range(k), k <= memory")
        shapes = {"S": (k, self._numel), "Y": (k, self._numel), "SS": (k, k), "SY": (k, k)}
        if any(tuple(state[key].shape) != shape for key, shape in shapes.items()):
            raise ValueError("state tensors S, Y, SS, SY do not match its order")
        if not math.isfinite(gamma):
            raise ValueError(f"state gamma must be finite, got {gamma}")
        SS = state["SS"].to(self._SS)
        SY = state["SY"].to(self._SY)
        middle = self._middle(gamma, SS, SY, order) if k else (None, None)
        if middle is None:
            raise ValueError("the state's middle matrix is singular or ill-conditioned")
        self._S[:k].copy_(state["S"])
        self._Y[:k].copy_(state["Y"])
        self._SS[:k, :k], self._SY[:k, :k] = SS, SY
        self._order, self._gamma = order, gamma
        self._C, self._M = middle
        self._eig = None

    # ----------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, s: Tensor, y: Tensor) -> bool:
        """Store the pair (s, y) = (step, gradient change) unless it would break the update.

        Skip rules (module docstring): non-finite s or y; L-BFGS: cos(s, y) <= 1e-4 (curvature);
        L-SR1: |s^T (y - B s)| <= 1e-8 ||s|| ||y - B s|| (Nocedal & Wright eq. 6.26).  When the
        middle matrix of the new set of pairs is singular or ill-conditioned the oldest pairs are
        dropped (``dropped`` counts them); the pair is skipped only if it fails alone.  When the
        buffer is full the oldest pair makes room.

        Returns
        -------
        bool
            Whether the pair was stored (the state is unchanged otherwise).
        """
        s, y = self._vector(s, "s"), self._vector(y, "y")
        pair = torch.stack([s, y])
        gram = (pair.double() @ pair.double().T).cpu()  # [[s^T s, s^T y], [y^T s, y^T y]]
        if not bool(torch.isfinite(gram).all()):  # also catches inf or nan in s or y
            return False
        ss, sy, yy = gram[0, 0].item(), gram[0, 1].item(), gram[1, 1].item()
        if self._kind == "lbfgs":
            if not sy > _CURVATURE_COS * math.sqrt(ss) * math.sqrt(yy):
                return False
        else:
            v = y - self.matvec(s)
            sv, vv = torch.stack([s.double() @ v.double(), v.double() @ v.double()]).tolist()
            if not abs(sv) > _SR1_SKIP * math.sqrt(ss) * math.sqrt(vv):
                return False
        # 1 / (N&W eq. 7.20), newest pair; s^T y = 0 passes the SR1 test when s^T B s != 0
        gamma = yy / sy if sy != 0 else math.inf
        if not (math.isfinite(gamma) and gamma > 0):
            if self._kind == "lbfgs":
                return False
            gamma = self._gamma                      # SR1 after negative curvature: keep it

        free = [i for i in range(self._memory) if i not in self._order]
        slot = free[0] if free else self._order[0]   # full: the oldest pair makes room
        kept = [i for i in self._order if i != slot]
        SS, SY = self._SS.clone(), self._SY.clone()
        if kept:
            idx = torch.tensor(kept, device=self._device)
            s_cols = (self._S[idx].double() @ pair.double().T)   # s_i^T s, s_i^T y
            y_col = self._Y[idx].double() @ s.double()           # y_i^T s
            SS[idx, slot], SS[slot, idx] = s_cols[:, 0], s_cols[:, 0]
            SY[idx, slot], SY[slot, idx] = s_cols[:, 1], y_col
        SS[slot, slot], SY[slot, slot] = ss, sy

        order = kept + [slot]                        # a permutation of range(len(order))
        if self._kind == "lsr1":
            gamma = self._sr1_safeguard(gamma, SS, SY, order)
        middle = self._middle(gamma, SS, SY, order)
        if middle is None and kept:                  # e.g. memory > n: drop the oldest pairs,
            idx = torch.tensor(order, device=self._device)   # the others move to slots 0..k-1
            SS, SY = _padded(SS[idx][:, idx], self._memory), _padded(SY[idx][:, idx], self._memory)
            while middle is None and len(order) > 1:
                idx, order = idx[1:], order[1:]
                self.dropped += 1
                SS, SY = _padded(SS[1:, 1:], self._memory), _padded(SY[1:, 1:], self._memory)
                middle = self._middle(gamma, SS, SY, list(range(len(order))))
            if middle is not None:
                self._S[:len(order)], self._Y[:len(order)] = self._S[idx].clone(), self._Y[idx].clone()
                self._S[len(order) - 1].copy_(s)
                self._Y[len(order) - 1].copy_(y)
                slot, order = len(order) - 1, list(range(len(order)))
        if middle is None:
            return False

        self._S[slot].copy_(s)
        self._Y[slot].copy_(y)
        self._SS, self._SY = SS, SY
        self._order, self._gamma = order, gamma
        self._C, self._M = middle
        self._eig = None
        return True

    def _sr1_safeguard(self, gamma: float, SS: Tensor, SY: Tensor, order: list) -> float:
        """gamma, or SR1_ABOVE * lambda_max when every pair showed positive curvature and gamma lies
        in [lambda_min, lambda_max], the curvatures seen: the eigenvalues of the pencil
        (D + L + L^T) u = lambda S^T S u.  The SR1 middle matrix D + L + L^T - gamma S^T S is then
        indefinite and B may get negative curvature that no pair showed (B - gamma I has the
        inertia of its inverse on range(Psi)); with gamma > lambda_max it is negative definite,
        so B <= gamma I: the unexplored directions get the largest curvature seen (a short step)
        instead of a spurious negative one (a step to the boundary that is then rejected)."""
        idx = torch.tensor(order, device=self._device)
        SSc, SYc = SS[idx][:, idx], SY[idx][:, idx]
        chol, info = torch.linalg.cholesky_ex(SSc)
        if info.item() != 0:
            return gamma
        A = torch.tril(SYc) + torch.tril(SYc, -1).T
        T = torch.linalg.solve_triangular(chol, A, upper=False)
        T = torch.linalg.solve_triangular(chol, T.T, upper=False)   # L^{-1} A L^{-T}
        lam = torch.linalg.eigvalsh(0.5 * (T + T.T))
        lo, hi = lam[0].item(), lam[-1].item()
        if lo > 0 and lo <= gamma <= hi and math.isfinite(hi):
            return _SR1_ABOVE * hi
        return gamma

    def _middle(self, gamma: float, SS: Tensor, SY: Tensor, order: list):
        """Coefficients C (Psi = [S; Y]^T C) and middle matrix M, both in slot order.

        Builds the BNS middle matrix in chronological order (module docstring); returns None
        when it is singular or ill-conditioned.
        """
        k = len(order)
        idx = torch.tensor(order, device=self._device)
        SSc, SYc = SS[idx][:, idx], SY[idx][:, idx]
        eye = torch.eye(k, dtype=torch.float64, device=self._device)
        if self._kind == "lbfgs":
            L, D = torch.tril(SYc, -1), torch.diag(torch.diagonal(SYc))
            K = torch.cat([torch.cat([gamma * SSc, L], 1), torch.cat([L.T, -D], 1)], 0)
            C = torch.block_diag(gamma * eye, eye)
            pos, sign = torch.cat([idx, idx + k]), -1.0
        else:
            K = torch.tril(SYc) + torch.tril(SYc, -1).T - gamma * SSc
            C = torch.cat([-gamma * eye, eye], 0)
            pos, sign = idx, 1.0
        if _condition_number(K) > self._cond_max:
            return None
        M = torch.empty_like(K)
        M[pos[:, None], pos[None, :]] = sign * torch.linalg.inv(K)
        return C, 0.5 * (M + M.T)

    # ---------------------------------------------------------------- algebra
    def _vector(self, v: Tensor, name: str) -> Tensor:
        if v.shape != (self._numel,):
            raise ValueError(f"{name} must have shape ({self._numel},), got {tuple(v.shape)}")
        return v.to(dtype=self._dtype, device=self._device)

    def _psi(self) -> Tensor:
        """Psi = [S; Y]^T C, shape (numel, p), in the buffers' dtype."""
        k = len(self)
        C = self._C.to(self._dtype)
        return (C[:k].T @ self._S[:k] + C[k:].T @ self._Y[:k]).T

    @torch.no_grad()
    def matvec(self, v: Tensor) -> Tensor:
        """B v = gamma v + Psi (M (Psi^T v))."""
        v = self._vector(v, "v")
        k = len(self)
        if k == 0:
            return self._gamma * v
        S, Y, C = self._S[:k], self._Y[:k], self._C
        w = C @ (self._M @ (C.T @ torch.cat([S @ v, Y @ v]).double()))
        w = w.to(self._dtype)
        return self._gamma * v + S.T @ w[:k] + Y.T @ w[k:]

    def _eigen(self):
        """(Q, U, lambda_par), cached: Psi = Q R (thin QR), R M R^T = U diag(lambda_par) U^T, so that
        B = gamma I + (Q U) diag(lambda_par) (Q U)^T (Brust, Erway, Marcia 2017)."""
        if self._eig is None:
            Q, R = torch.linalg.qr(self._psi())            # reduced: Q (n, q), R (q, p)
            R = R.double()
            lam_par, U = torch.linalg.eigh(R @ self._M @ R.T)
            self._eig = Q, U, lam_par
        return self._eig

    @torch.no_grad()
    def curvature(self, v: Tensor) -> float:
        """v^T B v in float64, in the eigen-representation ``solve`` uses:
        gamma ||v||^2 + sum_i lambda_par_i ((Q U)^T v)_i^2."""
        v = self._vector(v, "v").double()
        vBv = self._gamma * float(v @ v)
        if len(self):
            Q, U, lam_par = self._eigen()
            w = U.T @ (Q.T.double() @ v)
            vBv += float(lam_par @ (w * w))
        return vBv

    @torch.no_grad()
    def model_decrease(self, g: Tensor, s: Tensor) -> float:
        """m(0) - m(s) = -(g^T s + 1/2 s^T B s) in float64, B in the representation of ``solve``."""
        g, s = self._vector(g, "g"), self._vector(s, "s")
        return -(float(g.double() @ s.double()) + 0.5 * self.curvature(s))

    @torch.no_grad()
    def solve(self, g: Tensor, radius: float) -> tuple[Tensor, bool]:
        """Global minimiser of g^T s + 1/2 s^T B s subject to ||s||_2 <= radius.

        Orthonormal-basis (OBS) method of Brust, Erway, Marcia, "On solving L-SR1 trust-region
        subproblems", Comput. Optim. Appl. 66 (2017): thin QR Psi = Q R, eigen-decomposition
        R M R^T = U Lambda U^T, so that B = (Q U) (gamma I + Lambda) (Q U)^T + gamma (I - Q Q^T).
        In that eigenbasis the More-Sorensen conditions (Nocedal & Wright Theorem 4.1)
        (B + sigma I) s = -g, sigma >= 0, sigma (radius - ||s||) = 0, B + sigma I PSD, are solved
        with Newton's method on the secular equation 1/||s(sigma)|| - 1/radius = 0 (N&W
        Algorithm 4.3), safeguarded by bisection. The hard case (g orthogonal to the eigenspace
        of the smallest eigenvalue lambda_min < 0, in range(Psi) or in its complement when
        lambda_min = gamma) returns s = -(B - lambda_min I)^+ g + tau z with z a unit
        eigenvector for lambda_min and tau >= 0 such that ||s|| = radius. Tolerances (eps of
        the dtype): eigenvalues within sqrt(eps) max|lambda| of lambda_min form its eigenspace;
        g counts as orthogonal to it when its component there is <= 100 eps ||g||. A near-hard
        case goes through Newton with the shift held as sigma + lambda_min, which loses no digits.

        Parameters
        ----------
        g : Tensor, shape (numel,)
        radius : float, > 0

        Returns
        -------
        (step, hits_boundary) : (Tensor, bool)
            ``hits_boundary`` is False exactly when the step is an interior unconstrained
            minimiser (sigma = 0); otherwise ||step|| = radius up to rounding in the dtype.

        Raises
        ------
        ValueError
            ``radius`` not a finite number > 0, or ``g`` of the wrong shape.
        """
        radius = float(radius)
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a finite number > 0, got {radius}")
        g = self._vector(g, "g")
        f64 = dict(dtype=torch.float64, device=self._device)
        if len(self):
            Q, U, lam_par = self._eigen()
            Qg = Q.T @ g
            g_par = U.T @ Qg.double()                      # g in the eigenbasis Q U
            g_perp = g - Q @ Qg
        else:
            Q = U = None
            lam_par, g_par = torch.zeros(0, **f64), torch.zeros(0, **f64)
            g_perp = g
        q = g_par.numel()
        has_perp = self._numel > q
        extra = [torch.linalg.vector_norm(g_perp).double().reshape(1)] if has_perp else []
        lam = torch.cat([lam_par + self._gamma]
                        + ([torch.full((1,), self._gamma, **f64)] if has_perp else []))
        c = torch.cat([g_par] + extra)
        lam, c = lam.cpu().numpy(), c.cpu().numpy()

        eps = torch.finfo(self._dtype).eps
        x, tau, hits = _secular_solve(lam, c, radius, eps)

        step = torch.zeros_like(g)
        if q:
            step += Q @ (U @ torch.as_tensor(x[:q], **f64)).to(self._dtype)
        if has_perp and c[q] > 0:
            step += (float(x[q]) / float(c[q])) * g_perp
        if tau > 0:
            step += tau * self._eigenvector(int(np.argmin(lam)), Q, U)
        return step, hits

    def _eigenvector(self, i: int, Q, U) -> Tensor:
        """Unit eigenvector of B: column i of Q U, or (i == q) a unit vector orthogonal to Q."""
        q = 0 if Q is None else Q.shape[1]
        if i < q:
            z = Q @ U[:, i].to(self._dtype)
        else:   # e_j minus its projection on range(Q), j the row of Q of least norm
            z = torch.zeros(self._numel, dtype=self._dtype, device=self._device)
            if q:
                j = int(torch.argmin((Q * Q).sum(1)))
                z -= Q @ Q[j]
                z[j] += 1.0
            else:
                z[0] = 1.0
        return z / torch.linalg.vector_norm(z)


def _positive_int(value, name: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _padded(A: Tensor, size: int) -> Tensor:
    """A (k x k) in the top-left corner of a (size x size) zero matrix."""
    out = A.new_zeros(size, size)
    out[:A.shape[0], :A.shape[1]] = A
    return out


def _condition_number(K: Tensor) -> float:
    """2-norm condition number of K after symmetric scaling to unit row maxima (inf if singular)."""
    d = K.abs().amax(1)
    if not bool(torch.isfinite(K).all()) or not bool((d > 0).all()):
        return math.inf
    d = d.rsqrt()
    sv = torch.linalg.svdvals(d[:, None] * K * d[None, :])
    smax, smin = sv[0].item(), sv[-1].item()
    return smax / smin if smin > 0 else math.inf


def _secular_solve(lam: np.ndarray, c: np.ndarray, radius: float, eps: float):
    """Diagonal trust-region subproblem: min c^T x + 1/2 x^T diag(lam) x s.t. ||x|| <= radius.

    More-Sorensen characterisation (Nocedal & Wright Theorem 4.1) with the shift written as
    sigma = sigma_low + delta, sigma_low = max(0, -lambda_min), so that lam_i + sigma is computed
    without cancellation near the pole. Newton on phi(delta) = 1/||x(delta)|| - 1/radius
    (concave, N&W Algorithm 4.3), bisection whenever a Newton iterate leaves the bracket.

    Parameters
    ----------
    lam, c : float64 arrays
        Eigenvalues and the gradient's coordinates (non-negative for a lumped complement).
    eps : float
        Machine epsilon of the data; sets the tolerances that decide the hard case.

    Returns
    -------
    x : array
        Step coordinates, excluding the hard-case component.
    tau : float
        Hard case: the step adds tau * (unit eigenvector of argmin(lam)); 0 otherwise.
    hits_boundary : bool
    """
    imin = int(np.argmin(lam))
    lam_min = float(lam[imin])
    gnorm = float(np.linalg.norm(c))
    if lam_min > 0:                                  # interior Newton step, if it fits
        x = -c / lam
        if np.linalg.norm(x) <= radius:
            return x, 0.0, False
    sigma_low = max(0.0, -lam_min)
    base = lam + sigma_low                           # >= 0, exactly 0 at imin if lam_min <= 0
    c = c.copy()
    delta = 0.0
    if lam_min <= 0:
        base[imin] = 0.0
        J = base <= math.sqrt(eps) * float(np.abs(lam).max())  # eigenspace of lambda_min
        cJ = float(np.linalg.norm(c[J]))
        if cJ <= 100 * eps * gnorm:                  # g orthogonal to it: maybe the hard case
            c[J] = 0.0
            x = _coordinates(c, base, 0.0)
            xnorm = float(np.linalg.norm(x))
            if xnorm <= radius:
                if lam_min < 0:                      # the hard case
                    return x, math.sqrt(max(radius**2 - xnorm**2, 0.0)), True
                return x, 0.0, False                 # lambda_min = 0: interior minimiser
        else:                                        # ||x(delta)|| >= cJ / (max base_J + delta)
            delta = max(0.0, cJ / radius - float(base[J].max()))

    lo, hi = 0.0, gnorm / radius                     # phi(lo) <= 0 <= phi(hi)
    for _ in range(_NEWTON_MAXITER):
        x = _coordinates(c, base, delta)
        xnorm = float(np.linalg.norm(x))
        phi = 1.0 / xnorm - 1.0 / radius
        if abs(phi) * radius <= _NEWTON_RTOL:
            break
        if phi < 0:
            lo = delta
        else:
            hi = delta
        with np.errstate(divide="ignore", invalid="ignore"):
            dphi = float(np.sum(x * x / (base + delta))) / xnorm**3
            newton = delta - phi / dphi
        delta = newton if lo < newton < hi else 0.5 * (lo + hi)
        if hi - lo <= 4 * np.finfo(float).eps * hi:
            x = _coordinates(c, base, delta)
            break
    return x, 0.0, True


def _coordinates(c: np.ndarray, base: np.ndarray, delta: float) -> np.ndarray:
    """x_i = -c_i / (base_i + delta), with 0 where c_i = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = -c / (base + delta)
    return np.where(c == 0, 0.0, x)
