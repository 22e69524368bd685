"""The kernel shared by the closed-form covariance rules (ALGORITHMS.md §1), used by actmat and wudi_cfs.

Per (out, in) = (m, n) matrix it keeps two fp64 sums over experts and one scalar,
    A = Σ_t w_t Δtᵀ Δt                       (n×n)
    N = Σ_t w_t Δt (Δtᵀ Δt + ε I)            (m×n)
    s = Σ_t w_t ε                            (so that Σ_t w_t (ΔtᵀΔt + ε I) = A + s·I)
and solves Δ* = N (A + (s + r)·I)⁻¹ (``spd_solve``: an fp64 Cholesky solve in A's memory), r being an extra ridge
of the rule; a zero total ridge means the pseudo-inverse, reached without eigh.
fp64 sums because rounding A and N to fp32 alone moves Δ* by ~κ·u32, 5e-3 on LoRA experts (issue 17).
Memory is 2·(n² + m·n) fp32-sized values per matrix plus temporaries, whatever the number of experts. Where n² fp64
values exceed 1 GiB (a 13B+ down_proj), the sums and the solve are tiled (tiled_sums.py, tiled_spd.py): A packed,
~n²/2 fp64 values, factored in place in fp64, and Δ* written over N: n²/2 + m·n fp64 values in all.

A LIN tensor with more than two dims (mixture-of-experts weights stored (E, out, in), ALGORITHMS.md §13) is a batch of
independent matrices: each gets its own weights, statistics and ridge. A plain matrix is a batch of one.

LoRA experts (ALGORITHMS.md §2, "core space"): when every expert of a matrix arrives as factors Δt = b_t a_t (rank r),
A = Σ w_t a_tᵀ(b_tᵀb_t)a_t lives in the row span of the stacked a_t. With Q an orthonormal basis of that span
(k ≤ rT columns), A = Q K Qᵀ and N's rows lie in span(Q), so Δ* = (N Q)(K + ridge·I)⁻¹ Qᵀ exactly, for any ridge:
O(m·n·k) work and a k×k solve instead of O(m·n²) and an n×n one. A dense expert among them turns the kept factors into
dense deltas (the plain path); the result is the same up to fp32 rounding.

Tall matrices (m ≥ 3n: an LM head) are merged in row chunks (tall.py): a per-tensor prepass gathers each expert's
fp64 Gram G_t, the first chunk forms A = Σ w_t G_t and M_t = w_t (G_t + εI) and factors A + ridge once, and each
chunk solves its rows of N = Σ_t Δt[rows] M_t. The same arithmetic in another order: within the tolerances of the
whole-tensor path (tests/test_tall.py), not bitwise.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..info import TensorClass, TensorInfo
from .gram import add_gram
from .matrix_rule import MatrixRule, as_matrices
from .spd_solve import SOLVE_TEMPS, SpdSystem, merge_stats, row_block, solve_spd_right
from .tiled_spd import PackedLower
from .tall import ExpertGrams, TallRowChunks, TallState
from .tiled_sums import TiledGramSums, is_tiled, tiled_phase_bytes

_EPS32 = torch.finfo(torch.float32).eps


def rows_first(m: int, n: int) -> bool:
    """Form Δ(ΔᵀΔ) as (ΔΔᵀ)Δ? That costs 4m²n flops against 2mn² on top of the Gram A needs anyway."""
    return 2 * m < n


def covariance_state_bytes(shape: tuple[int, ...]) -> int:
    """Peak bytes for one tensor, the larger of ``covariance_phase_bytes``; on the tiled path less the fp32 result,
    which lives in N's storage there while budget.piece_bytes counts it beside Δ."""
    *lead, m, n = shape
    in_n = 4 * math.prod(lead) * m * n if is_tiled(n) else 0
    return max(covariance_phase_bytes(shape)) - in_n


def covariance_phase_bytes(shape: tuple[int, ...]) -> tuple[int, int]:
    """(adding, finishing) as MergeMethod.phase_bytes: fp64 A and N of every matrix, plus the largest temporaries of
    one matrix in that phase (the tiled path: tiled_sums.tiled_phase_bytes).

    In ``add``: the expert's fp64 copy (m·n) and its fp64 Gram product (n², or m² < n² when rows go first). In
    ``solve``: the fp32 result of every matrix (B·m·n), LAPACK's fp64 factor before it is copied into A's place (n²)
    and a row block's fp64 temporaries.
    """
    *lead, m, n = shape
    if is_tiled(n):
        return tiled_phase_bytes(shape, rows_first(m, n))
    batch = math.prod(lead)
    held = 8 * batch * (n * n + m * n)
    adding = 8 * (m * n + min(n * n, m * m if rows_first(m, n) else n * n))
    solving = 4 * batch * m * n + 8 * n * n + 8 * SOLVE_TEMPS * min(m, row_block(n)) * n
    return held + adding, held + solving


class CovarianceGrams(ExpertGrams):
    """The fp64 Grams of a tall tensor's experts (tall.py); a LoRA expert's chunk comes as factors."""

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor | Factors) -> None:
        super().observe(round_, info, t, delta.dense() if isinstance(delta, Factors) else delta)

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int:
        """T Grams and A in fp64, LAPACK's fp64 factor while it is made (it then takes A's place); per chunk: N and Δ's
        fp64 copy, the fp32 result and a row block's temporaries."""
        n = whole.shape[-1]
        rows = piece.shape[0]
        return 8 * (n_experts + 2) * n * n + 20 * rows * n + 8 * SOLVE_TEMPS * min(rows, row_block(n)) * n


class CovarianceMethod(TallRowChunks, MatrixRule):
    """A rule with the §1 kernel on LIN tensors and the mean of Δt on every other class (ALGORITHMS.md §13).

    A rule says how expert t enters: ``_weights`` (w_t per matrix, from ‖Δt‖F²) and ``_eps`` (ε of §1); ``_ridges``
    adds a ridge from tr A. The same three serve the dense path, the LoRA core-space path and tall row chunks.
    """

    prepass = CovarianceGrams

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self._tall: TallState | None = state if self._mean is None else None  # a chunk of a tall tensor
        self._sums = make_sums(info.shape) if self._mean is None and self._tall is None else None
        self._rows: torch.Tensor | None = None  # this chunk's N rows, (rows, n) fp64, on the tall path
        self._factors: CoreSums | None = None  # LoRA experts of a plain matrix, while every expert is one

    @classmethod
    def takes_factors(cls, info: TensorInfo) -> bool:
        return info.cls == TensorClass.LIN and len(info.shape) == 2

    def add(self, t: int, delta: torch.Tensor | Factors, pass_: int = 0) -> None:
        if self._tall is not None:
            return self._add_rows(t, delta.dense() if isinstance(delta, Factors) else delta)
        if not isinstance(delta, Factors):
            self._flush_factors()
            return super().add(t, delta, pass_)
        if self._sums.A is not None:  # a dense expert came first: join it
            return super().add(t, delta.dense(), pass_)
        self._factors = self._factors or CoreSums(self.info.shape[-1])
        weight = self._weights(delta.frobenius_sq())[0]
        if weight:
            self._factors.add(delta, weight, self._eps())

    def _add_rows(self, t: int, delta: torch.Tensor) -> None:
        """N[rows] += Δt[rows] M_t in fp64 (tall path)."""
        self._device = delta.device
        system = self._tall.system(self._tall_system)
        if system is None or system.m[t] is None:
            return
        x = delta.double()                       # (rows, n)
        if self._rows is None:
            self._rows = x.new_zeros(x.shape)
        self._rows.addmm_(x, system.m[t])

    def _tall_system(self, grams: list[torch.Tensor | None]) -> TallSystem | None:
        """A = Σ w_t G_t shifted and factored, M_t = w_t (G_t + εI) in place of G_t; None when every Δt is 0."""
        traces = [float(g.trace()) if g is not None else 0.0 for g in grams]
        weights = self._weights(traces)
        a = None
        for g, w in zip(grams, weights):
            if g is not None and w:
                a = g.mul(w) if a is None else a.add_(g, alpha=w)
        if a is None or float(a.trace()) == 0:
            return None
        eps = self._eps()
        shift = sum(w * eps for g, w in zip(grams, weights) if g is not None and w)
        ridge = shift + ((self._ridges([float(a.trace())]) or [0.0])[0])
        for t, (g, w) in enumerate(zip(grams, weights)):
            if g is None or not w:
                grams[t] = None
            elif eps:
                g.diagonal().add_(eps)
                g.mul_(w)
            else:
                g.mul_(w)
        return TallSystem(grams, SpdSystem(PackedLower.whole(a), ridge), ridge)

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        norms = torch.linalg.vector_norm(d, dim=(1, 2)).square().tolist()  # ‖Δt‖F² per matrix
        self._sums.add(d, self._weights(norms), eps=self._eps())

    def _flush_factors(self) -> None:
        """Dense deltas for the experts kept as factors (another expert of this matrix is dense)."""
        if self._factors is not None:
            for f, _, _ in self._factors.items:
                self._add_matrices(0, as_matrices(f.dense()), 0)  # weights from the dense Δ, as for a dense expert
            self._factors = None

    def _finalize_matrices(self) -> torch.Tensor:
        if self._tall is not None:
            return self._finalize_rows().unsqueeze(0)
        if self._factors is not None:
            merged, self._stats = self._factors.solve(self.info.shape[-2], self._ridges)
            self._stats["core_dim"] = float(self._factors.core_dim)
            return merged.unsqueeze(0)
        if self._sums.A is None:  # only zero-rank adapters: every Δt is 0
            return torch.zeros((1, *self.info.shape), dtype=torch.float32, device=self._device)
        merged, self._stats = self._sums.solve(self._ridges(self._sums.traces()))
        return merged

    def _finalize_rows(self) -> torch.Tensor:
        """This chunk's Δ* rows (rows, n) fp32 from the tensor's factored system; the stats so far (tall path)."""
        system = self._tall.system(self._tall_system)
        if system is None or self._rows is None:
            return torch.zeros(self.info.shape, dtype=torch.float32, device=self._device)
        merged = system.spd.solve(self._rows)
        self._rows = None
        self._stats = {"cond_est": system.spd.stats["cond_est"], "ridge": system.ridge, "eigh": 0.0,
                       "steps": system.spd.stats["steps"], "pinv": system.spd.stats["pinv"]}
        return merged

    @classmethod
    def state_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> int:
        if info.cls != TensorClass.LIN:
            return 4 * info.numel
        return covariance_state_bytes(info.shape)

    @classmethod
    def phase_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> tuple[int, int] | None:
        return covariance_phase_bytes(info.shape) if info.cls == TensorClass.LIN else None

    def _weights(self, norms_sq: list[float]) -> list[float]:
        """w_t per matrix from ‖Δt‖F² per matrix; 0 leaves the expert out of that matrix."""
        return [1.0] * len(norms_sq)

    def _eps(self) -> float:
        """ε of §1: each expert's Gram gets ε·I (and N gets ε·Δt)."""
        return 0.0

    def _ridges(self, traces: list[float]) -> list[float] | None:
        """Ridge per matrix on top of the accumulated shift, from tr A per matrix; None = none."""
        return None


class TallSystem:
    """A tall tensor's system, shared by its chunks: M_t (n, n) fp64 per expert (None: no weight) and S factored."""

    def __init__(self, m: list[torch.Tensor | None], spd: SpdSystem, ridge: float) -> None:
        self.m, self.spd, self.ridge = m, spd, ridge


def make_sums(shape: tuple[int, ...]) -> GramSums | TiledGramSums:
    """The dense sums, or the tiled ones where the n×n fp64 statistic is large (tiled_sums.py)."""
    m, n = shape[-2], shape[-1]
    return TiledGramSums(shape, rows_first(m, n)) if is_tiled(n) else GramSums(shape)


class GramSums:
    """Running fp64 A and N of one LIN tensor; ``add`` reads Δt (fp32) and keeps no reference to it."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.m, self.n = shape[-2], shape[-1]
        self.A: torch.Tensor | None = None  # (B, n, n) fp64
        self.N: torch.Tensor | None = None  # (B, m, n) fp64
        self.shift: list[float] = []         # s = Σ_t w_t ε per matrix

    def add(self, delta: torch.Tensor, weights: Sequence[float] | None = None, eps: float = 0.0) -> None:
        """A += w ΔᵀΔ, N += w Δ(ΔᵀΔ + ε I), s += w ε per matrix; weights: one per matrix, default 1; 0 skips it."""
        d = as_matrices(delta)  # (B, m, n) fp32
        if self.A is None:
            self.A = d.new_zeros(d.shape[0], self.n, self.n, dtype=torch.float64)
            self.N = d.new_zeros(d.shape[0], self.m, self.n, dtype=torch.float64)
            self.shift = [0.0] * d.shape[0]
        for e, x32 in enumerate(d):  # x32: (m, n)
            w = 1.0 if weights is None else weights[e]
            if w == 0:
                continue
            x = x32.double()  # temporary (m, n): fp32 products would round A and N at ~u32 (module doc)
            if eps:
                self.N[e].add_(x, alpha=w * eps)
                self.shift[e] += w * eps
            if rows_first(self.m, self.n):
                add_gram(self.A[e], x, alpha=w)
                self.N[e].addmm_(add_gram(None, x.T), x, alpha=w)  # temporary (m, m)
            else:
                gram = add_gram(None, x)  # temporary (n, n)
                self.A[e].add_(gram, alpha=w)
                self.N[e].addmm_(x, gram, alpha=w)

    def traces(self) -> list[float]:
        """tr A per matrix (without the shift s)."""
        return self.A.diagonal(dim1=-2, dim2=-1).sum(-1).tolist()

    def solve(self, ridges: Sequence[float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Δ* = N (A + (s_e + ridge_e) I)⁻¹ per matrix as (B, m, n) fp32; A and N are dropped.

        A matrix with tr A = 0 had only zero deltas, so its N is 0 and stays the answer. Stats are over the matrices:
        the worst condition estimate, the largest ridge, Tikhonov steps, how many took the pseudo-inverse, and eigh (0:
        no eigendecomposition is taken any more).
        """
        stats = {"cond_est": 1.0, "ridge": 0.0, "eigh": 0.0, "steps": 0.0, "pinv": 0.0}
        traces = self.traces()
        out = torch.zeros(self.N.shape, dtype=torch.float32, device=self.N.device)
        for e, (trace, extra) in enumerate(zip(traces, ridges or [0.0] * len(traces))):
            if trace == 0:
                continue
            ridge = self.shift[e] + extra
            _, one = solve_spd_right(self.A[e], self.N[e], ridge, out=out[e])
            merge_stats(stats, one, ridge)
        self.A = self.N = None
        return out, stats


def eigh_pinv(a: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """a⁺ = V diag(inverse) Vᵀ through eigh: (V, inverse, condition number on the eigenvalues kept). Eigenvalues at
    or below max_eig·n·eps(fp32) count as zero (rounding, not signal); n is the full matrix's size. (RegMean's
    pseudo-inverse of calibration Grams; the covariance rules above no longer take eigh.)"""
    evals, vecs = torch.linalg.eigh(a)  # ascending; vecs (n, n)
    kept = evals > float(evals[-1]) * n * _EPS32
    inverse = torch.where(kept, evals.reciprocal(), torch.zeros_like(evals))
    return vecs, inverse, float(evals[-1] / evals[kept].min()) if bool(kept.any()) else 1.0


def pinv_apply(nn: torch.Tensor, vecs: torch.Tensor, inverse: torch.Tensor) -> None:
    """nn ← nn V diag(inverse) Vᵀ in place (one (m, n) temporary)."""
    torch.matmul((nn @ vecs).mul_(inverse), vecs.T, out=nn)


class Factors:
    """One expert's Δ of a plain (m, n) matrix as fp32 factors on the device: Δ = b a, b (m, r) scaled, a (r, n)."""

    def __init__(self, b: torch.Tensor, a: torch.Tensor) -> None:
        self.b, self.a = b, a

    def dense(self) -> torch.Tensor:
        return self.b @ self.a

    def frobenius_sq(self) -> list[float]:
        """‖b a‖F² = tr((bᵀb)(a aᵀ)), without forming b a; a list of one, like the per-matrix norms."""
        return [float(((self.b.T @ self.b) * (self.a @ self.a.T)).sum())]


class CoreSums:
    """The §1 system of one matrix whose experts are all factors, kept as the factors until ``solve`` (§2 core space).

    Memory: the factors, T·r·(m + n) values, instead of n² + m·n.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[Factors, float, float]] = []  # (factors, w_t, ε)
        self.core_dim = 0

    def add(self, f: Factors, weight: float, eps: float) -> None:
        self.items.append((f, weight, eps))

    def solve(self, m: int, ridges: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Δ* (m, n) = (N Q)(K + (s + ridge)·I)⁻¹ Qᵀ, solved as ``solve_spd_right`` does for the full n×n system."""
        stats = {"cond_est": 1.0, "ridge": 0.0, "eigh": 0.0, "steps": 0.0, "pinv": 0.0}
        stacked = torch.cat([f.a for f, _, _ in self.items]) if self.items else None
        if stacked is None or not bool(stacked.any()):
            device = stacked.device if stacked is not None else None
            return torch.zeros(m, self.n, dtype=torch.float32, device=device), stats
        q, _ = torch.linalg.qr(stacked.T.double())  # (n, k): orthonormal, spans every a_t's rows
        self.core_dim = k = q.shape[1]
        core = q.new_zeros(k, k)           # K = Qᵀ A Q
        nq = q.new_zeros(m, k)             # N Q
        shift = 0.0
        for f, w, eps in self.items:
            a, b = f.a.double(), f.b.double()
            aq = a @ q                     # (r, k)
            btb = b.T @ b                  # (r, r)
            gq = btb @ aq                  # bᵀb a Q: (r, k)
            core.addmm_(aq.T, gq, alpha=w)
            nq.addmm_(b, (a @ a.T) @ gq, alpha=w)  # Δ (ΔᵀΔ) Q = b (a aᵀ)(bᵀb)(a Q)
            if eps:
                nq.addmm_(b, aq, alpha=w * eps)     # ε Δ Q
                shift += w * eps
        extra = ridges([float(core.trace())])
        ridge = shift + (extra[0] if extra else 0.0)
        merged, one = solve_spd_right(core, nq, ridge, full_dim=self.n)
        merge_stats(stats, one, ridge)
        self.items = []
        return merged @ q.T.float(), stats
