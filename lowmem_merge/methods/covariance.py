"""The kernel shared by the closed-form covariance rules (ALGORITHMS.md §1), used by actmat and wudi_cfs.

Per (out, in) = (m, n) matrix it keeps two fp32 sums over experts and one scalar,
    A = Σ_t w_t Δtᵀ Δt                       (n×n)
    N = Σ_t w_t Δt (Δtᵀ Δt + ε I)            (m×n)
    s = Σ_t w_t ε                            (so that Σ_t w_t (ΔtᵀΔt + ε I) = A + s·I)
and solves Δ* = N (A + (s + r)·I)⁻¹ by Cholesky, r being an extra ridge of the rule; a zero total ridge, or a failed
Cholesky, takes an eigh pseudo-inverse instead. A rule defined with ``torch.linalg.pinv`` (``LIKE_PINV``) gets pinv's
cut-off of tiny eigenvalues, and Cholesky only where that provably cuts nothing.
Memory is n² + m·n per matrix plus one temporary, whatever the number of experts.

A LIN tensor with more than two dims (mixture-of-experts weights stored (E, out, in), ALGORITHMS.md §13) is a batch of
independent matrices: each gets its own weights, statistics and ridge. A plain matrix is a batch of one.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..info import TensorClass, TensorInfo
from .matrix_rule import MatrixRule, as_matrices

_EPS32 = torch.finfo(torch.float32).eps


def rows_first(m: int, n: int) -> bool:
    """Form Δ(ΔᵀΔ) as (ΔΔᵀ)Δ? That costs 4m²n flops against 2mn² on top of the Gram A needs anyway."""
    return 2 * m < n


def covariance_state_bytes(shape: tuple[int, ...], eigh: bool) -> int:
    """Peak fp32 bytes for one tensor: A and N of every matrix, plus the largest temporary of one matrix.

    The temporary is the per-expert product in ``add`` (n², or m² < n² when rows go first), or in ``solve`` the
    Cholesky factor (n²; the solution overwrites N). ``eigh`` (a rule that may take the eigh pseudo-inverse) needs
    eigenvectors and eigh's workspace (~3n²) and one m×n product instead.
    """
    *lead, m, n = shape
    batch = math.prod(lead)
    temporary = 3 * n * n + m * n if eigh else n * n
    return 4 * (batch * (n * n + m * n) + temporary)


class CovarianceMethod(MatrixRule):
    """A rule with the §1 kernel on LIN tensors and the mean of Δt on every other class (ALGORITHMS.md §13)."""

    LIKE_PINV: ClassVar[bool] = False  # True: Δ* = N pinv(A + ridge I) with pinv's cut-off, as the reference code

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self._sums = GramSums(info.shape) if self._mean is None else None

    def _finalize_matrices(self) -> torch.Tensor:
        merged, self._stats = self._sums.solve(self._ridges(), like_pinv=self.LIKE_PINV)
        return merged

    @classmethod
    def state_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> int:
        if info.cls != TensorClass.LIN:
            return 4 * info.numel
        return covariance_state_bytes(info.shape, eigh=cls.LIKE_PINV or cls._exact(params))

    def _ridges(self) -> list[float] | None:
        """Ridge per matrix on top of the accumulated shift; None = none."""
        return None

    @staticmethod
    def _exact(params: Any) -> bool:
        """True when the parameters ask for the unregularized pseudo-inverse (eigh: more memory to solve)."""
        raise NotImplementedError


class GramSums:
    """Running A and N of one LIN tensor; ``add`` reads Δt and keeps no reference to it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.m, self.n = shape[-2], shape[-1]
        self.A: torch.Tensor | None = None  # (B, n, n) fp32
        self.N: torch.Tensor | None = None  # (B, m, n) fp32
        self.shift: list[float] = []         # s = Σ_t w_t ε per matrix

    def add(self, delta: torch.Tensor, weights: Sequence[float] | None = None, eps: float = 0.0) -> None:
        """A += w ΔᵀΔ, N += w Δ(ΔᵀΔ + ε I), s += w ε per matrix; weights: one per matrix, default 1; 0 skips it."""
        d = as_matrices(delta)  # (B, m, n) fp32
        if self.A is None:
            self.A = d.new_zeros(d.shape[0], self.n, self.n)
            self.N = d.new_zeros(d.shape[0], self.m, self.n)
            self.shift = [0.0] * d.shape[0]
        for e, x in enumerate(d):  # x: (m, n)
            w = 1.0 if weights is None else weights[e]
            if w == 0:
                continue
            if eps:
                self.N[e].add_(x, alpha=w * eps)
                self.shift[e] += w * eps
            if rows_first(self.m, self.n):
                self.A[e].addmm_(x.T, x, alpha=w)
                self.N[e].addmm_(x @ x.T, x, alpha=w)  # temporary (m, m)
            else:
                gram = x.T @ x  # temporary (n, n)
                self.A[e].add_(gram, alpha=w)
                self.N[e].addmm_(x, gram, alpha=w)

    def traces(self) -> list[float]:
        """tr A per matrix (without the shift s)."""
        return self.A.diagonal(dim1=-2, dim2=-1).sum(-1).tolist()

    def solve(self, ridges: Sequence[float] | None = None,
              like_pinv: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Δ* = N (A + (s_e + ridge_e) I)⁻¹ per matrix, written over N (returned, (B, m, n)); A is overwritten.

        A matrix with tr A = 0 had only zero deltas, so its N is 0 and stays the answer. Stats are over the matrices:
        the worst condition estimate, the largest ridge, and how many needed the eigh pseudo-inverse.
        """
        stats = {"cond_est": 1.0, "ridge": 0.0, "eigh": 0.0}
        traces = self.traces()
        for e, (trace, extra) in enumerate(zip(traces, ridges or [0.0] * len(traces))):
            if trace == 0:
                continue
            ridge = self.shift[e] + extra
            cond, used_eigh = _solve_one(self.A[e], self.N[e], ridge, like_pinv)
            stats["cond_est"] = max(stats["cond_est"], cond)
            stats["ridge"] = max(stats["ridge"], ridge)
            stats["eigh"] += used_eigh
        self.A = None
        return self.N, stats


def _solve_one(a: torch.Tensor, nn: torch.Tensor, ridge: float, like_pinv: bool) -> tuple[float, bool]:
    """nn ← nn (a + ridge I)⁻¹ in place, for symmetric PSD a (n, n) and nn (m, n); a is overwritten.

    ridge > 0 makes a positive definite: Cholesky, whose diagonal gives a cheap condition estimate
    (max L_ii / min L_ii)². If Cholesky still fails, or ridge = 0, use the eigh pseudo-inverse.
    Returns the condition estimate and whether eigh was used.

    like_pinv: the rule is nn · pinv(a + ridge I), and pinv drops eigenvalues below max_eig·n·eps. In fp32 such
    eigenvalues are rounding noise of the accumulated a, and inverting them exactly would amplify that noise (a single
    rank-deficient expert came back 120 % off). Cholesky equals pinv only when nothing is dropped, which is sure when
    the ridge (a lower bound of every eigenvalue) exceeds n·eps·‖a + ridge I‖F (a bound of the cut-off); else eigh.
    """
    if ridge > 0:
        a.diagonal().add_(ridge)
        if not like_pinv or ridge > a.shape[0] * _EPS32 * float(torch.linalg.matrix_norm(a)):
            chol, info = torch.linalg.cholesky_ex(a)  # (n, n) lower
            if int(info) == 0:
                # X A = N  ⇔  L (Lᵀ Xᵀ) = Nᵀ: two triangular solves on the (n, m) view Nᵀ, in place (no m×n copy)
                rhs = nn.T
                torch.linalg.solve_triangular(chol, rhs, upper=False, out=rhs)
                torch.linalg.solve_triangular(chol.T, rhs, upper=True, out=rhs)
                diag = chol.diagonal()
                return float(diag.max() / diag.min()) ** 2, False
            del chol
    return _pinv_solve(a, nn), True


def _pinv_solve(a: torch.Tensor, nn: torch.Tensor) -> float:
    """nn ← nn a⁺ in place, through eigh; eigenvalues at or below max_eig·n·eps(fp32) count as zero (rounding, not
    signal). Returns the condition number of a on the eigenvalues kept."""
    evals, vecs = torch.linalg.eigh(a)  # ascending; vecs (n, n)
    cut = float(evals[-1]) * a.shape[0] * _EPS32
    kept = evals > cut
    inverse = torch.where(kept, evals.reciprocal(), torch.zeros_like(evals))
    torch.matmul((nn @ vecs).mul_(inverse), vecs.T, out=nn)  # one (m, n) temporary
    return float(evals[-1] / evals[kept].min()) if bool(kept.any()) else 1.0
