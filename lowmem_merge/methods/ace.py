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
Memory: A_acc, N, R1, SΔ per matrix in the heterogeneous branch (A_acc, N otherwise) plus the temporaries of one
step (issue 17 §3: a 70B down_proj, n = 28672, m = 8192, must fit 8 GB with the stream's buffers), in two phases
(``phase_bytes``: a whole LIN tensor is merged alone, the stream reading nothing ahead of it):
    pass 1, 2m < n: W̃t centred in Δt's own memory (SΔ takes Δt first); A_acc's lower triangle packed in fp32
            stripes of TILE rows (n²/2 + n·TILE/2), summed from W̃ᵀW̃ stripe by stripe without Ŝt; N's rows from row blocks of W̃W̃ᵀ (m×m) as (W̃[rows]W̃ᵀ)W̃ = W̃[rows]Ŝt, and
            if flag R1's from that same product, Δ[rows]Ŝt = W̃[rows]Ŝt + 1 (Ŝt μt)ᵀ with Ŝt μt = W̃ᵀ(W̃ μt);
            otherwise W̃t a copy, A_acc whole and through Ŝt, fewer FLOPs there;
    finalize: c and R (in R1's memory) from A_acc's stripes, SΔ freed, then A unpacked stripe by stripe into a fresh
            n×n whose pages are touched as it fills (at most n² and one stripe); its LU in place (torch writes
            lu_factor_ex's out= over Aᵀ), Δ_pre in N's memory from row blocks of N; F's top k from the fp64 Gram
            of its smaller side gathered in blocks, when σ_k ≥ σ_1/GRAM_COND (``thin_svd``'s Gram route and
            condition), and U_k V_kᵀ = U_k diag(1/σ) U_kᵀ F (or F V_k diag(1/σ) V_kᵀ when m ≥ n) added in blocks,
            never U or Vᵀ whole; otherwise LAPACK's SVD of F.
Bitwise as before where 2m ≥ n, and where 2m < n in the homogeneous branch with n ≤ TILE (A_acc one stripe, the
same call); the solve is split by rows (bitwise on this CPU, though BLAS may round a block otherwise). Elsewhere
(A_acc by stripes, R1 from N's product, r_t as ‖W̃t‖F², F's Gram summed by blocks, the refinement in fp64) within
the rule's tolerance of the fp64 reference (tests/test_wide_rows.py).
Tall matrices (m ≥ 3n: an LM head) run in row chunks from three per-tensor prepass rounds (ace_tall.py).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorClass, TensorInfo
from .ace_tall import AceGrams, RowSums, heterogeneity
from .covariance import rows_first
from .gram import add_gram, mirror_lower
from .matrix_rule import EIGH_FLOATS, GRAM_COND, MatrixRule, _lapack_svd
from .tall import TallRowChunks, TallState
from .tiled_spd import PackedLower
from .wudi import block_rows, row_blocks

_TINY = 1e-12  # the reference's guards
TILE = 1024    # A_acc's packed stripes (rows first): GEMMs of 1024 rows are efficient; the packing wastes n·TILE/2


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
    """One matrix's pass-1 accumulators; A_acc packed (its lower triangle in fp32 stripes) when rows go first."""

    def __init__(self, m: int, n: int, flag: bool, like: torch.Tensor) -> None:
        self.flag = flag
        self.a: torch.Tensor | PackedLower = (PackedLower(n, TILE, like.device, like.dtype) if rows_first(m, n)
                                              else like.new_zeros(n, n))   # A_acc = Σ Σ̃t
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
        for x, acc in zip(d, self._acc):  # x: (m, n)
            mu = x.mean(0)                                     # μt, (n,)
            if rows_first(*x.shape):
                self._add_rows_first(acc, x, mu)
                continue
            centred = x - mu                                   # W̃t, (m, n)
            gram = centred.T @ centred                         # Ŝt, (n, n)
            w, eps_t = self._weight(acc, float(gram.diagonal().sum()) + _TINY)
            acc.a.add_(gram, alpha=w)
            acc.nn.addmm_(centred, gram, alpha=w).add_(centred, alpha=eps_t)
            if acc.flag:
                acc.r1.addmm_(x, gram, alpha=w)
                acc.sum.add_(x)

    def _weight(self, acc: _Stats, r: float) -> tuple[float, float]:
        """(w_t, ε_t) for r_t = tr Ŝt + 1e-12, and E += ε_t."""
        w, eps_t = (1.0 / r, self.params.eps / r) if acc.flag else (1.0, self.params.eps)
        acc.e += eps_t
        return w, eps_t

    def _add_rows_first(self, acc: _Stats, x: torch.Tensor, mu: torch.Tensor) -> None:
        """Pass 1 for one wide matrix (2m < n) without its n×n Ŝt, W̃t centred in Δt's own memory (the caller's,
        read no more; SΔ takes Δt first): A_acc's packed stripes, and W̃[rows]Ŝt = (W̃[rows]W̃ᵀ)W̃. When flagged that
        one product gives R1's rows too: Δ[rows]Ŝt = W̃[rows]Ŝt + 1 (Ŝt μt)ᵀ with Ŝt μt = W̃ᵀ(W̃ μt), half the FLOPs
        of a second product."""
        if acc.flag:
            acc.sum.add_(x)
        centred = x.sub_(mu)                                   # W̃t, (m, n), over Δt
        w, eps_t = self._weight(acc, float(torch.linalg.vector_norm(centred)) ** 2 + _TINY)
        acc.a.add_gram_(centred, w)
        m = x.shape[0]
        if acc.flag:
            spread = centred.T @ (centred @ mu)                # Ŝt μt, (n,)
            for rows in row_blocks(*x.shape):
                part = (centred[rows] @ centred.T) @ centred   # W̃[rows]Ŝt, (rows, n)
                acc.nn[rows].add_(part, alpha=w)
                acc.r1[rows].add_(part.add_(spread), alpha=w)
        else:
            for rows in row_blocks(m, m):
                acc.nn[rows].addmm_(centred[rows] @ centred.T, centred, alpha=w)   # (rows, m) @ (m, n)
        acc.nn.add_(centred, alpha=eps_t)

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
        if len(acc_all) == 1:                                  # a plain matrix: Δ* in N's memory
            return self._finalize_one(acc_all.pop(), self._means[0]).unsqueeze(0)
        m, n = self.info.shape[-2:]
        merged = acc_all[0].nn.new_empty(len(acc_all), m, n)
        for e, mean in enumerate(self._means):
            merged[e] = self._finalize_one(acc_all[e], mean)
            acc_all[e] = None  # frees this matrix's statistics before the next one's solve
        return merged

    def _finalize_one(self, acc: _Stats, mean_norm: float) -> torch.Tensor:
        """Δ* (m, n) in N's memory; takes the matrix's statistics (A_acc becomes A's LU, R1 becomes R, then F). A
        packed A_acc gives c and R from its stripes, SΔ is freed, and only then is it unpacked for the LU."""
        m, n = acc.nn.shape
        packed = isinstance(acc.a, PackedLower)
        c = acc.a.column_sums().div_(n) if packed else acc.a.mean(0)   # row mean of the unregularized Σ Σ̃t, (n,)
        if acc.flag:
            c.div_(mean_norm + _TINY)
        if packed:
            acc.a.add_diagonal(acc.e)
        else:
            acc.a.diagonal().add_(acc.e)                       # Σ_t Σt_reg
        refine = None
        if acc.flag:                                           # R = R1 − SΔ Σ̄_reg
            alpha = -1.0 / self.n_experts
            refine = acc.a.mul_into_(acc.r1, acc.sum, alpha) if packed else acc.r1.addmm_(acc.sum, acc.a, alpha=alpha)
            acc.sum = acc.r1 = None
        a, pre, acc.a, acc.nn = acc.a.unpack() if packed else acc.a, acc.nn, None, None
        _solve_rows(a.add_(c), pre)                            # A = Σ_t Σt_reg + 1 cᵀ: every row gets cᵀ
        del a
        k = math.floor(self.params.k_frac * min(m, n))
        if refine is None or k == 0:
            return pre
        f = refine.add_(pre)                                   # F = Δ_pre + R
        if not _add_top_gram(pre, f, k):
            u, s, vh = _lapack_svd(f)
            pre.addmm_(u[:, :k], vh[:k], alpha=float(s[:k].mean()))
        return pre

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any, cuda: bool = False) -> int:
        """The larger phase less the result, which budget.piece_bytes counts beside Δ (a plain matrix's is N's
        memory, a batch's is in the finishing phase); ``cuda``: the phases as a CUDA device holds them."""
        return max(cls._phase_floats(batch, m, n, params, cuda)) - batch * m * n

    @classmethod
    def cuda_state_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> int:
        """As on the CPU, but A unpacked next to all of its stripes (``PackedLower.unpack_floats``)."""
        if info.cls != TensorClass.LIN:
            return cls.state_bytes(info, n_experts, params)
        *lead, m, n = info.shape
        return 4 * cls._matrix_floats(math.prod(lead), m, n, n_experts, params, cuda=True)

    @classmethod
    def phase_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> tuple[int, int] | None:
        if info.cls != TensorClass.LIN:
            return None
        *lead, m, n = info.shape
        adding, finishing = cls._phase_floats(math.prod(lead), m, n, params)
        return 4 * adding, 4 * finishing

    @staticmethod
    def _phase_floats(batch: int, m: int, n: int, params: Any, cuda: bool = False) -> tuple[int, int]:
        """fp32 values of (adding, finishing), the heterogeneous branch (the larger). Adding: every matrix's
        statistics (A_acc, packed when rows go first; N, R1, SΔ) and one add's temporaries: a row block of W̃W̃ᵀ and
        W̃Ŝt (W̃t is centred in Δt's memory), or W̃t and Ŝt. Finishing: the result (a batch's own buffer; a plain matrix's is N's memory) and the statistics of
        the matrices still to come beside one matrix's finalize: its statistics while c and R are formed, A unpacked
        beside N and R, A's LU with N, R and a row block of the solve, or the refinement (Δ_pre, F and its
        temporaries; A and SΔ are freed by then)."""
        wide = rows_first(m, n)
        stats = (PackedLower.nbytes(n, TILE, 4) // 4 if wide else n * n) + 3 * m * n
        add = max(block_rows(m, m) * m, block_rows(m, n) * (m + n)) if wide else m * n + n * n
        unpack = PackedLower.unpack_floats(n, TILE, cuda) + 2 * m * n if wide else 0
        solve = n * n + 2 * m * n + 2 * block_rows(m, n) * n   # a row block of Nᵀ's solution and its copy back
        k = math.floor(params.k_frac * min(m, n))
        finish = max(stats, unpack, solve, 2 * m * n + _refine_floats(m, n, k))
        result = batch * m * n if batch > 1 else 0
        return batch * stats + add, result + (batch - 1) * stats + finish


def _solve_rows(a: torch.Tensor, nn: torch.Tensor) -> None:
    """N ← N A⁻¹ (Δ_pre) in place, A (n, n) factored in its own memory: Aᵀ's LU by LAPACK over the Fortran-ordered
    view Aᵀ, then one row block of N at a time (Aᵀ Δ_pre[rows]ᵀ = N[rows]ᵀ). A singular A (an exactly zero pivot) is
    rebuilt from its factors for the pseudo-inverse, as the reference's pinv fallback."""
    lu = a.T
    pivots = torch.empty(a.shape[0], dtype=torch.int32, device=a.device)
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.lu_factor_ex(lu, out=(lu, pivots, info))
    if int(info) != 0:
        perm, lower, upper = torch.lu_unpack(lu, pivots)
        nn.copy_(nn @ torch.linalg.pinv((perm @ lower @ upper).T))
        return
    for rows in row_blocks(*nn.shape):
        nn[rows] = torch.linalg.lu_solve(lu, pivots, nn[rows].T).T


def _add_top_gram(pre: torch.Tensor, f: torch.Tensor, k: int) -> bool:
    """Δ_pre += mean(σ[:k]) U_k V_kᵀ of F (m, n), from the fp64 Gram of F's smaller side gathered in blocks of its
    lines, as ``thin_svd``'s Gram route: only when σ_k ≥ σ_1 / GRAM_COND (False, untouched, otherwise)."""
    wide = f.shape[0] < f.shape[1]
    side, out = (f.T, pre.T) if wide else (f, pre)            # (lines, s): U_k V_kᵀ = side P with P = V diag(1/σ) Vᵀ
    s = side.shape[1]
    gram = side.new_zeros(s, s, dtype=torch.float64)
    for rows in row_blocks(*side.shape):
        add_gram(gram, side[rows].double(), mirror=False)
    evals, vecs = torch.linalg.eigh(mirror_lower(gram))                     # ascending
    del gram
    values = evals.flip(0)[:k].clamp(min=0).sqrt()
    if not float(values[-1]) > float(values[0]) / GRAM_COND:
        return False
    top = vecs[:, s - k:].flip(1)                             # (s, k), a copy: vecs is freed
    del vecs
    proj = (top / values) @ top.T                             # (s, s) fp64
    del top
    scale = float(values.mean())
    for rows in row_blocks(*side.shape):
        out[rows].add_((side[rows].double() @ proj).mul_(scale).to(out.dtype))
    return True


def _refine_floats(m: int, n: int, k: int) -> int:
    """fp32-sized values of the refinement beside Δ_pre and F: the larger of the Gram route (the fp64 Gram, eigh's
    eigenvectors and workspace, then V_k and P, and a block's fp64 copy, product and cast) and LAPACK's fp32 SVD
    (U, S, Vh, a copy of F and gesdd's workspace of about 7·min(m, n)²)."""
    s, lines = min(m, n), max(m, n)
    eigh = int((2 + EIGH_FLOATS) * s * s)                     # Gram, then eigh's vectors and workspace
    project = 2 * s * s + 4 * s * k + 2 * s * s               # eigenvectors, V_k and V_k/σ, P
    gram = max(eigh, project) + 5 * block_rows(lines, s) * s
    lapack = s * (m + n) + s + m * n + 7 * s * s
    return max(gram, lapack) if k else 0
