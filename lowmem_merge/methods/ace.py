"""ACE-Merging, as the authors' code implements it (ALGORITHMS.md §3; `unravel-xu/ACE-Merging` strategy.py).

LIN, per (m, n) matrix:
    pass 0: s_t = ‖Δt‖F²; γ = Var_unbiased(ln(s + 1e-12)) / (mean(ln(s + 1e-12))² + 1e-12); flag = γ > τ (strict;
            T = 1 gives NaN, so the homogeneous branch); s̄ = mean s_t.
    pass 1: W̃t = Δt − 1 μtᵀ (columns centred), Ŝt = W̃tᵀW̃t, r_t = tr Ŝt + 1e-12; Σ̃t = Ŝt/r_t and ε_t = eps/r_t if
            flag, else Ŝt and eps. Accumulate A_acc = Σ Σ̃t, E = Σ ε_t, N = Σ W̃t (Σ̃t + ε_t I), and if flag
            R1 = Σ Δt Σ̃t, SΔ = Σ Δt.
    finalize: cᵀ = row mean of A_acc (/ (s̄ + 1e-12) if flag); A = A_acc + E I + 1 cᵀ (not symmetric: LU, never
            Cholesky; pinv only if A is singular); Δ_pre = N A⁻¹. If flag: R = R1 − SΔ (A_acc + E I)/T,
            F = Δ_pre + R = U S Vᵀ, k = ⌊k_frac·min(m, n)⌋, Δ* = Δ_pre + mean(S[:k]) U[:, :k] V[:, :k]ᵀ;
            k = 0 skips the refinement (the reference gives NaN there: a documented deviation).
Other tensors: mean of Δt. T = 1 does not return the expert (centring and the prior 1cᵀ).
Memory: n² + 3mn per matrix in the heterogeneous branch (n² + mn otherwise) plus the temporaries of one step.
Tall matrices (m ≥ 3n: an LM head) run in row chunks from three per-tensor prepass rounds (ace_tall.py).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

import torch

from ..errors import ConfigError
from .ace_tall import AceGrams, RowSums, heterogeneity
from .matrix_rule import MatrixRule, svd_floats, thin_svd
from .tall import TallRowChunks, TallState

_TINY = 1e-12  # the reference's guards


@dataclasses.dataclass(frozen=True)
class AceParams:
    eps: float = 1e-2
    tau: float = 0.3
    k_frac: float = 0.3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"ace: eps={self.eps} must be a finite number >= 0", hint="e.g. -p eps=1e-2")
        if not math.isfinite(self.tau):
            raise ConfigError(f"ace: tau={self.tau} must be a finite number", hint="e.g. -p tau=0.3")
        if not 0.0 <= self.k_frac <= 1.0:
            raise ConfigError(f"ace: k_frac={self.k_frac} must be in [0, 1]", hint="e.g. -p k_frac=0.3")


class _Stats:
    """One matrix's pass-1 accumulators."""

    def __init__(self, m: int, n: int, flag: bool, like: torch.Tensor) -> None:
        self.flag = flag
        self.a = like.new_zeros(n, n)                          # A_acc = Σ Σ̃t
        self.e = 0.0                                           # E = Σ ε_t
        self.nn = like.new_zeros(m, n)                         # N = Σ W̃t Σ̃t + ε_t W̃t
        self.r1 = like.new_zeros(m, n) if flag else None       # R1 = Σ Δt Σ̃t
        self.sum = like.new_zeros(m, n) if flag else None      # SΔ = Σ Δt


class Ace(TallRowChunks, MatrixRule):
    name = "ace"
    summary = "LIN: ACE-Merging (authors' code): centred-Gram solve with a collective prior, refined when norms " \
              "differ; other: mean"
    passes = 2
    Params = AceParams
    param_help = {
        "eps": "ridge added to each expert's (normalized) Gram; 1e-2 is the authors' code default, the paper uses "
               "4e-2 for GPT-2, 2e-4 for RoBERTa-Base and 1e-5 for all other models",
        "tau": "τ, heterogeneity threshold: γ > τ takes the normalized branch with spectral refinement",
        "k_frac": "refined rank k = floor(k_frac·min(m, n)); k = 0 skips the refinement",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._norms: list[list[float]] = []     # per expert, s_t of each matrix
        self._acc: list[_Stats] | None = None
        self._means: list[float] = []           # s̄ of each matrix
        self._tall: TallState | None = self.state if self._mean is None else None   # a chunk of a tall tensor
        self._rows: RowSums | None = None

    prepass = AceGrams

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        if self._tall is not None:   # pass 0's norms came from the prepass
            if pass_ == 1:
                self._rows = self._rows or RowSums(self._tall.system(None), d[0])
                self._rows.add(t, d[0])
            return
        if pass_ == 0:
            self._norms.append([float(v) ** 2 for v in torch.linalg.vector_norm(d, dim=(1, 2)).tolist()])
            return
        if self._acc is None:
            self._start(d)
        eps = self.params.eps
        for x, acc in zip(d, self._acc):  # x: (m, n)
            centred = x - x.mean(0)                           # W̃t, (m, n)
            gram = centred.T @ centred                         # Ŝt, (n, n)
            r = float(gram.diagonal().sum()) + _TINY
            w, eps_t = (1.0 / r, eps / r) if acc.flag else (1.0, eps)
            acc.a.add_(gram, alpha=w)
            acc.e += eps_t
            acc.nn.addmm_(centred, gram, alpha=w).add_(centred, alpha=eps_t)
            if acc.flag:
                acc.r1.addmm_(x, gram, alpha=w)
                acc.sum.add_(x)

    def _start(self, like: torch.Tensor) -> None:
        """Pass 1 begins: γ and the branch of every matrix from the norms of pass 0."""
        _, m, n = like.shape
        per_matrix = list(zip(*self._norms))
        gammas = [heterogeneity(list(norms)) for norms in per_matrix]
        flags = [g > self.params.tau for g in gammas]  # NaN > τ is False
        self._means = [statistics.fmean(norms) for norms in per_matrix]  # s̄
        self._acc = [_Stats(m, n, flag, like[0]) for flag in flags]
        finite = [g for g in gammas if not math.isnan(g)]
        self._stats = {"gamma": max(finite) if finite else 0.0, "branch": float(any(flags))}

    def _finalize_matrices(self) -> torch.Tensor:
        if self._tall is not None:
            system = self._tall.system(None)
            self._stats = {"gamma": 0.0 if math.isnan(system.gamma) else system.gamma, "branch": float(system.flag)}
            rows, self._rows = self._rows, None
            return system.merged(*rows.finish()).unsqueeze(0)
        acc_all, self._acc = self._acc, None
        m, n = self.info.shape[-2:]
        merged = acc_all[0].nn.new_empty(len(acc_all), m, n)
        for e, mean in enumerate(self._means):
            merged[e] = self._finalize_one(acc_all[e], mean)
            acc_all[e] = None  # frees this matrix's statistics before the next one's solve
        return merged

    def _finalize_one(self, acc: _Stats, mean_norm: float) -> torch.Tensor:
        m, n = acc.nn.shape
        c = acc.a.mean(0)                                      # row mean of the unregularized Σ Σ̃t, (n,)
        if acc.flag:
            c.div_(mean_norm + _TINY)
        acc.a.diagonal().add_(acc.e)                           # Σ_t Σt_reg
        refine = None
        if acc.flag:
            refine = acc.r1.addmm_(acc.sum, acc.a, alpha=-1.0 / self.n_experts)  # R = R1 − SΔ Σ̄_reg
            acc.sum = None
        acc.a.add_(c)                                          # + 1 cᵀ: every row gets cᵀ
        # Δ_pre A = N  ⇔  Aᵀ Δ_preᵀ = Nᵀ, by LU
        solution, info = torch.linalg.solve_ex(acc.a.T, acc.nn.T)
        pre = solution.T if int(info) == 0 else acc.nn @ torch.linalg.pinv(acc.a)
        acc.nn = None
        k = math.floor(self.params.k_frac * min(m, n))
        if refine is None or k == 0:
            return pre
        u, s, vh = thin_svd(refine.add_(pre), top=k)  # F = Δ_pre + R
        return pre.addmm_(u[:, :k], vh[:k], alpha=float(s[:k].mean()))

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        stats = batch * (n * n + 3 * m * n)                    # A_acc, N, R1, SΔ (heterogeneous branch)
        add = m * n + n * n                                    # W̃t and Ŝt
        finish = 2 * n * n + 2 * m * n + svd_floats(m, n)      # Aᵀ's LU and copy, Δ_pre, SVD of F
        return stats + batch * m * n + max(add, finish)        # + the result
