"""RegMean (ALGORITHMS.md §8.1), delta form, and the solve it shares with Chain of Merges (§8.3).

LIN inside a block:  Δ* = (Σ_t w_t Δt C_t)(Σ_t w_t C_t + r·I)⁻¹ with C_t expert t's input Gram from calibration data
(``lowmem_merge.calib``), w_t = 1 and r = 0 for RegMean. Equal to the weight form W* = (Σ W_t C_t)(Σ C_t)⁻¹ whenever
Σ C_t is invertible; a singular Σ C_t takes the pseudo-inverse, so directions no data reached keep W0.
RegMean's C_t: the token mean of x xᵀ over expert t's own activations on task t, its off-diagonal times ``alpha``.
Other tensors (embeddings, norms, biases, linear layers outside the blocks such as lm_head): mean of Δt.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorClass, TensorInfo
from .average import Average
from .base import NoParams
from .calibrated import GramState
from .covariance import eigh_pinv, pinv_apply
from .matrix_rule import EIGH_FLOATS, MatrixRule


@dataclasses.dataclass(frozen=True)
class RegMeanParams:
    alpha: float = 0.9

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"regmean: alpha={self.alpha} must be in [0, 1]",
                              hint="alpha scales the Grams' off-diagonal (reduce_non_diagonal_ratio), e.g. 0.9")


class GramRule(MatrixRule):
    """Δ* = (Σ w_t Δt C_t)(Σ w_t C_t + ridge·I)⁻¹ from a ``GramState`` (C_t, w_t) per LIN tensor."""

    data_free = False

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        if info.cls == TensorClass.LIN and state is None:   # no Gram for it (outside the blocks): the mean
            self._mean = Average(info, n_experts, NoParams())
        self._n: torch.Tensor | None = None

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        if d.shape[0] != 1:
            raise ValueError(f"{self.name}: {self.info.name} is a batch of matrices")
        w = self.state.weights[t]
        if self._n is None:
            self._n = torch.zeros_like(d[0])
        if w:
            self._n.addmm_(d[0], self.state.grams[t].to(d.device), alpha=w)

    def _finalize_matrices(self) -> torch.Tensor:
        if self.state.solver is None:           # the first layer of its group: q of {q, k, v}
            a = sum(w * g for w, g in zip(self.state.weights, self.state.grams)).to(self._n.device)
            self.state.solver = Inverse(a, self._relative_ridge() * float(a.trace()) / a.shape[0])
        solver = self.state.solver
        solver.apply(self._n)
        self._stats = {"cond_est": solver.cond, "ridge": solver.ridge, "eigh": float(solver.vecs is not None)}
        return self._n.unsqueeze(0)

    def _relative_ridge(self) -> float:
        return 0.0

    @classmethod
    def calib_rows(cls, params: Any, x: torch.Tensor) -> torch.Tensor:
        """The rows (tokens × features, fp32) whose Σ x xᵀ the calibration sums for one linear layer's input."""
        return x

    @classmethod
    def calib_state(cls, params: Any, raw: list[tuple[torch.Tensor, int]]) -> GramState:
        """(Σ x xᵀ, token count) per expert -> the ``GramState`` this rule solves with."""
        raise NotImplementedError

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        # the experts' Grams and A; then the larger of an fp64 copy of A with its factor, and the eigh pseudo-inverse
        # of a singular A (EIGH_FLOATS / 2: an eigh holds about 3.5 of its own n² beside its input); N and fp64 N
        return (n_experts + 1) * n * n + max(4 * n * n, math.ceil(EIGH_FLOATS / 2 * n * n)) + 3 * m * n


class Inverse:
    """X ↦ X (A + ridge·I)⁻¹ for a symmetric PSD A, factorized once for every layer that shares the input.

    Cholesky in fp32, else in fp64 (a Gram of fewer tokens than inputs plus a small relative ridge is positive
    definite in exact arithmetic, but its fp32 rounding may not be); else (A singular: RegMean with alpha = 1 and
    too few tokens) the eigh pseudo-inverse, which drops eigenvalues at rounding level: about ten times slower.
    """

    def __init__(self, a: torch.Tensor, ridge: float) -> None:
        self.ridge = ridge
        self.chol = self.vecs = self.inv = None
        a.diagonal().add_(ridge)
        for dtype in (torch.float32, torch.float64):
            chol, info = torch.linalg.cholesky_ex(a.to(dtype))
            if int(info) == 0:
                self.chol = chol
                diag = chol.diagonal()
                self.cond = float(diag.max() / diag.min()) ** 2
                return
            del chol        # a failed factor is freed before the next attempt (measured 5.36 n² fp32 held without)
        self.vecs, self.inv, self.cond = eigh_pinv(a, a.shape[0])

    def apply(self, nn: torch.Tensor) -> None:
        """nn ← nn (A + ridge·I)⁻¹ in place."""
        if self.chol is None:
            pinv_apply(nn, self.vecs, self.inv)
            return
        rhs = nn.T.to(self.chol.dtype)          # X A = N  ⇔  L Lᵀ Xᵀ = Nᵀ
        rhs = torch.linalg.solve_triangular(self.chol, rhs, upper=False)
        nn.copy_(torch.linalg.solve_triangular(self.chol.T, rhs, upper=True).T)


class RegMean(GramRule):
    name = "regmean"
    summary = ("LIN: (Σ Δt C_t)(Σ C_t)^-1, C_t = expert t's input Gram on its own data (--calib); "
               "other tensors: mean")
    Params = RegMeanParams
    calibration = "own"
    param_help = {"alpha": "α: the Grams' off-diagonal is multiplied by α (1 = exact Grams, 0 = diagonal only)"}

    @classmethod
    def calib_state(cls, params: Any, raw: list[tuple[torch.Tensor, int]]) -> GramState:
        grams = []
        for total, rows in raw:
            g = total / rows
            if params.alpha != 1:
                diag = g.diagonal().clone()
                g.mul_(params.alpha).diagonal().copy_(diag)
            grams.append(g)
        return GramState(grams, [1.0] * len(grams))


def check_ridge(method: str, ridge: float) -> None:
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ConfigError(f"{method}: ridge={ridge} must be a finite number >= 0",
                          hint="the ridge is relative to tr(A)/n, e.g. -p ridge=1e-6")
