"""ACE on a tall LIN tensor (m ≥ 3n: an LM head) in row chunks (tall.py; ALGORITHMS.md §3 for the rule itself).

Every quantity of ace.py's whole-tensor path is either a sum over rows or row-local once those sums are known:
    round 0: s_t = ‖Δt‖F² and the column sums of Δt (μt = their mean over the m rows), per expert;
    round 1: Ŝt = Σ_rows (Δt − 1μtᵀ)ᵀ(Δt − 1μtᵀ) per expert (fp32, as the whole path); then γ, the branch, the
             weights, A_acc, E, c and the LU factors of A = A_acc + E I + 1cᵀ, once;
    round 2: (heterogeneous branch with k > 0) F's rows, F = Δ_pre + R, each from its own rows of N, R1 and SΔ,
             and FᵀF in fp64: its top k eigenpairs give σ_i and V_k;
    merge:   Δ*[rows] = Δ_pre[rows] + mean(σ[:k])·F[rows] V_k diag(1/σ) V_kᵀ   (= U_k V_kᵀ restricted to the rows).
Memory: T Grams and A's factors of n², instead of N, R1, SΔ and F of m·n. Not bitwise the whole path: the top k
come from fp64 FᵀF (the whole path's ``thin_svd`` takes LAPACK when σ_k < σ_1/1e3), and the Grams are summed by
chunk; within the rule's tolerance (tests/test_tall.py). Directions of F with σ_i = 0 among the top k have no
defined singular vectors (the whole path adds LAPACK's arbitrary choice there): they add nothing here.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from ..info import TensorClass, TensorInfo
from .base import Prepass
from .gram import add_gram, mirror_lower
from .matrix_rule import EIGH_FLOATS
from .tall import TallState, is_tall

_TINY = 1e-12  # the reference's guards (ace.py)


class AceSystem:
    """What every chunk of one tall tensor shares: μt, the weighted Grams M_t = w_t Ŝt, ε_t, the regularized sum
    A_acc + E I (for R), A's LU factors and, once round 2 ran, σ[:k] and V_k."""

    def __init__(self, means: list[torch.Tensor], grams: list[torch.Tensor], norms: list[float], m: int,
                 params: Any, n_experts: int) -> None:
        n = grams[0].shape[0]
        self.means = means
        gamma = heterogeneity(norms)
        self.flag = gamma > params.tau                     # NaN > τ is False
        self.k = math.floor(params.k_frac * min(m, n))
        self.n_experts = n_experts
        self.eps: list[float] = []
        for g in grams:
            r = float(g.diagonal().sum()) + _TINY
            w, eps_t = (1.0 / r, params.eps / r) if self.flag else (1.0, params.eps)
            g.mul_(w)
            self.eps.append(eps_t)
        self.m_t = grams
        acc = grams[0].clone()                              # A_acc (n, n)
        for g in grams[1:]:
            acc.add_(g)
        c = acc.mean(0)
        if self.flag:
            c.div_(statistics.fmean(norms) + _TINY)
        acc.diagonal().add_(sum(self.eps))                  # Σ_t Σt_reg
        self.reg = acc if self.flag else None
        a = acc.add(c) if self.flag else acc.add_(c)        # + 1 cᵀ
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(a.T)
        self.pinv = torch.linalg.pinv(a) if int(info) != 0 else None
        del a
        self.refines = self.flag and self.k > 0
        self.values: torch.Tensor | None = None            # σ[:k] (fp64), after round 2
        self.vk: torch.Tensor | None = None                # V_k (n, k) fp64
        self.gamma = gamma

    def rows(self, nn: torch.Tensor, r1: torch.Tensor | None, total: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Δ_pre, F) of one chunk from its N, R1 and SΔ rows (fp32); F is None without refinement."""
        if self.pinv is None:
            pre = torch.linalg.lu_solve(self.lu, self.pivots, nn.T).T
        else:
            pre = nn @ self.pinv
        if not self.refines:
            return pre, None
        return pre, r1.addmm_(total, self.reg, alpha=-1.0 / self.n_experts).add_(pre)   # R + Δ_pre

    def top(self, ftf: torch.Tensor) -> None:
        """σ[:k] and V_k from FᵀF (fp64)."""
        evals, vecs = torch.linalg.eigh(ftf)                # ascending
        del ftf
        k = min(self.k, evals.shape[0])
        values = evals.flip(0)[:k].clamp(min=0).sqrt()
        self.scale = float(values.mean())                   # mean(σ[:k]), zeros included
        live = values > 0                                   # a zero σ_i has no singular vector
        self.values = values[live]
        self.vk = vecs[:, evals.shape[0] - k:].flip(1)[:, live]   # V_k (n, k'): a copy, vecs is freed

    def merged(self, pre: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
        if f is None:
            return pre
        coef = (f.double() @ self.vk).div_(self.values) @ self.vk.T   # U_k V_kᵀ, these rows
        return pre.add_(coef.to(pre.dtype), alpha=self.scale)


def heterogeneity(norms: list[float]) -> float:
    """γ from the experts' squared norms s_t; NaN for one expert (the unbiased variance of one value)."""
    logs = [math.log(s + _TINY) for s in norms]
    if len(logs) < 2:
        return math.nan
    return statistics.variance(logs) / (statistics.fmean(logs) ** 2 + _TINY)


class RowSums:
    """One chunk's pass-1 sums: N = Σ W̃t M_t + ε_t W̃t, and R1 = Σ Δt M_t, SΔ = Σ Δt when refining (fp32)."""

    def __init__(self, system: AceSystem, like: torch.Tensor) -> None:
        self.system = system
        self.nn = like.new_zeros(like.shape)
        self.r1 = like.new_zeros(like.shape) if system.refines else None
        self.total = like.new_zeros(like.shape) if system.refines else None

    def add(self, t: int, x: torch.Tensor) -> None:
        s = self.system
        centred = x - s.means[t]
        self.nn.addmm_(centred, s.m_t[t]).add_(centred, alpha=s.eps[t])
        if s.refines:
            self.r1.addmm_(x, s.m_t[t])
            self.total.add_(x)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.system.rows(self.nn, self.r1, self.total)


class AceGrams(Prepass):
    """Rounds 0-2 of the module doc over one tall tensor's chunks; its state is a TallState holding the AceSystem."""

    scope = "tensor"
    rounds = 3

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.norms = [0.0] * n_experts
        self.colsums: list[torch.Tensor | None] = [None] * n_experts
        self.grams: list[torch.Tensor | None] = [None] * n_experts
        self.rows = 0
        self.info: TensorInfo | None = None
        self.system: AceSystem | None = None
        self.chunk: RowSums | None = None
        self.ftf: torch.Tensor | None = None

    @classmethod
    def covers(cls, params: Any, info: TensorInfo) -> bool:
        return is_tall(info)

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int:
        """fp32: T Grams, A_acc + E I, A's LU and A or its pinv; fp64: FᵀF and its eigh (EIGH_FLOATS), then
        V_k; per chunk: N, R1, SΔ, the centred Δ, Δ_pre, F (fp32) and F's products (fp64)."""
        m, n = whole.shape
        k = math.floor(params.k_frac * min(m, n))
        rows = piece.shape[0]
        eigh = int((2 + EIGH_FLOATS) * 4 * n * n)                # FᵀF, then eigh's vectors and workspace
        return 4 * (n_experts + 3) * n * n + eigh + 8 * n * k + 4 * 6 * rows * n + 8 * 3 * rows * n

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if info.cls != TensorClass.LIN or len(info.shape) != 2:
            return
        if round_ == 0:
            self.norms[t] += float(delta.double().square().sum())
            part = delta.sum(0, dtype=torch.float64)
            self.colsums[t] = part if self.colsums[t] is None else self.colsums[t].add_(part)
            if t == 0:
                self.rows += delta.shape[0]
                self.info = info
        elif round_ == 1:
            centred = delta - self.colsums[t].div(self.rows).float()
            g = self.grams[t]
            self.grams[t] = add_gram(g, centred, mirror=False)
        elif self.system is not None and self.system.refines:
            if t == 0:
                self.chunk = RowSums(self.system, delta)
            self.chunk.add(t, delta)
            if t == self.n_experts - 1:
                _, f = self.chunk.finish()
                f64 = f.double()
                self.ftf = add_gram(self.ftf, f64, mirror=False)
                self.chunk = None

    def end_round(self, round_: int) -> None:
        if round_ == 1 and self._tall():
            means = [s.div(self.rows).float() for s in self.colsums]
            grams = [None if g is None else mirror_lower(g) for g in self.grams]
            self.system = AceSystem(means, grams, self.norms, self.rows, self.params, self.n_experts)
            self.grams = []
        elif round_ == 2 and self.system is not None and self.ftf is not None:
            self.system.top(mirror_lower(self.ftf))
            self.ftf = None

    def _tall(self) -> bool:
        return self.info is not None and is_tall(TensorInfo(self.info.name, (self.rows, self.info.shape[1]),
                                                            TensorClass.LIN))

    def state(self) -> TallState | None:
        if self.system is None:
            return None
        state = TallState([], self.rows)
        state.system(lambda _: self.system)
        return state
