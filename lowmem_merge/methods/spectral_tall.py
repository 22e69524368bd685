"""TSV-M, Iso-C and Iso-CTS on a tall LIN tensor (m ≥ 3n: an LM head, gate/up_proj) in row chunks (tall.py;
ALGORITHMS.md §5, §6 for the rules themselves).

A tall matrix's right factors live in n×n: every spectral quantity the rules need is a function of n×n Grams summed
over row chunks, and each output row is its own input rows times one n×n (or r×n) matrix:
    Iso-C   round 0: G = SᵀS (S = Σ Δt);  Δ*[rows] = S[rows] · α·mean(σ)·G^{-1/2}.
    TSV-M   round 0: G_t = ΔtᵀΔt → top-k V_t, s_t;  round 1: Ū[rows] = [Δt[rows] V_t / s_t]_t, gathering ŪᵀŪ;
            Δ*[rows] = Ū[rows] · α·(ŪᵀŪ)^{-1/2} diag(s̄) polar(V̄).
    Iso-CTS four rounds to the same form (cts_tall.py).
Each factor is the Gram route of the whole path (matrix_rule.thin_svd, polar_and_values): the same fp64 Grams summed
chunk by chunk, so within the whole path's tolerances, not bitwise. Where a route's condition fails (a σ used below
σ_max/GRAM_COND, or σ_min below σ_max/POLAR_COND) the whole path takes LAPACK (on the matrix's R factor); a chunk never
sees the whole matrix, so the tall path keeps the Gram route (stats: ``gram_unproven`` counts them), with the directions
whose Gram eigenvalue is within fp64 rounding of 0 (λ ≤ λ_max·n·eps64) left out: they have no defined singular
vector (the whole path adds LAPACK's arbitrary choice there) and add nothing here. The others keep the Gram route's
accuracy, eps64·(σ_max/σ)² for a polar factor and ·(σ_max/σ)³ for a triplet. An expert whose Δt is 0 gets the unit
vectors LAPACK gives a zero matrix, as in the whole path (``unit_rows``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..info import TensorClass, TensorInfo
from .base import Prepass
from .gram import add_gram, mirror_lower
from .matrix_rule import BLOCK, EIGH_FLOATS, GRAM_COND, POLAR_COND, side_gram
from .tall import is_tall

_EPS64 = torch.finfo(torch.float64).eps
EIGH_F64 = EIGH_FLOATS / 2   # n×n fp64 matrices an eigh holds beside its input


def top_eigen(gram: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(V (n, top) fp64, σ (top) fp64, proven): the ``top`` leading eigenvectors of a fp64 Gram and σ = √λ, with
    thin_svd's route condition σ_top ≥ σ_max / GRAM_COND. σ within rounding of 0 is set to 0 (see module doc)."""
    evals, vecs = torch.linalg.eigh(gram)       # ascending
    n = evals.shape[0]
    vals = evals.flip(0)[:top].clamp(min=0)
    keep = vecs[:, n - top:].flip(1).clone()     # a copy: the full vectors are freed
    del vecs
    vals[vals <= float(evals[-1]) * n * _EPS64] = 0
    s = vals.sqrt()
    proven = top == 0 or float(s[-1]) > float(s[0]) / GRAM_COND
    return keep, s, proven


def inverse_root(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(G^{-1/2} (n, n) fp64, σ (n) descending fp64, proven) of a fp64 Gram, over its nonzero lines only (zero rows and
    columns of the result for the others, as polar_ leaves out unfilled slots), with its route condition
    σ_min ≥ σ_max / POLAR_COND. G^{-1/2} is written over ``gram`` (returned): 2 + EIGH_F64 n×n fp64 at the peak."""
    n = gram.shape[0]
    lines = gram.diagonal() != 0
    values = gram.new_zeros(n)
    if not bool(lines.any()):
        return gram, values, True
    every = bool(lines.all())
    evals, vecs = torch.linalg.eigh(gram if every else gram[lines][:, lines])   # ascending
    proven = float(evals[0]) > float(evals[-1]) / POLAR_COND ** 2
    live = evals > float(evals[-1]) * n * _EPS64
    inv = torch.where(live, evals.clamp(min=_EPS64).rsqrt(), torch.zeros_like(evals))
    if every:
        torch.matmul(vecs * inv, vecs.T, out=gram)
    else:
        idx = lines.nonzero().squeeze(1)
        gram.zero_()
        gram[idx[:, None], idx[None, :]] = (vecs * inv) @ vecs.T
    del vecs
    values[:evals.shape[0]] = evals.clamp(min=0).flip(0).sqrt().where(live.flip(0), evals.new_zeros(()))
    return gram, values, proven


def apply_left(root: torch.Tensor, x: torch.Tensor) -> None:
    """x ← root·x in place for fp32 x (r, n) and fp64 root (r, r), BLOCK columns at a time."""
    for c in range(0, x.shape[1], BLOCK):
        x[:, c:c + BLOCK] = (root @ x[:, c:c + BLOCK].double()).to(x.dtype)


class ChunkSum:
    """S[rows] = Σ_t Δt[rows] in fp32, summed in expert order as the whole path sums S."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None

    def add(self, t: int, x: torch.Tensor) -> None:
        self.sum = x.clone() if t == 0 or self.sum is None else self.sum.add_(x)

    def take(self) -> torch.Tensor:
        s, self.sum = self.sum, None
        return s


class SpectralPrepass(Prepass):
    """What the three rules' prepasses share: tall LIN tensors only, the rows seen, one chunk's S, the stats."""

    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.rows = 0
        self.info: TensorInfo | None = None
        self.chunk = ChunkSum()
        self.stats = {"gram_unproven": 0.0}

    @classmethod
    def covers(cls, params: Any, info: TensorInfo) -> bool:
        return is_tall(info)

    def _count(self, round_: int, info: TensorInfo, x: torch.Tensor, t: int) -> bool:
        """False for what this prepass does not gather (a caller may feed it every tensor)."""
        if info.cls != TensorClass.LIN or len(info.shape) != 2:
            return False
        if round_ == 0 and t == 0:
            self.rows += x.shape[0]
            self.info = info
        return True

    def _tall(self) -> bool:
        return self.info is not None and is_tall(TensorInfo(self.info.name, (self.rows, self.info.shape[1]),
                                                            TensorClass.LIN))

    def _unproven(self, proven: bool) -> None:
        self.stats["gram_unproven"] += 0.0 if proven else 1.0


class RowMap:
    """A tall tensor's state for its chunks: Δ*[rows] = L[rows] · M, L the rows the rule builds (S, or Ū), M fp64."""

    def __init__(self, right: torch.Tensor, stats: dict[str, float]) -> None:
        self.right = right        # M (r, n) fp64, the scale included
        self.stats = stats

    def apply(self, left: torch.Tensor) -> torch.Tensor:
        """(rows, r) fp32 -> (rows, n) fp32."""
        return (left.double() @ self.right).float()


# ---- Iso-C -----------------------------------------------------------------------------------------------------

class IsoCGrams(SpectralPrepass):
    """Round 0: G = SᵀS (fp64) over the chunks; the state is RowMap(α·mean(σ)·G^{-1/2})."""

    rounds = 1

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.gram: torch.Tensor | None = None

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int:
        """fp64: G, the eigh (EIGH_F64) and the root; per chunk: S (fp32) and its fp64 copy and product."""
        n, rows = whole.shape[-1], piece.shape[0]
        return int(8 * (2 + EIGH_F64) * n * n) + (4 + 8 + 8) * rows * n

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if not self._count(round_, info, delta, t):
            return
        self.chunk.add(t, delta)
        if t == self.n_experts - 1:
            s = self.chunk.take().double()
            self.gram = add_gram(self.gram, s, mirror=False)

    def state(self) -> RowMap | None:
        if not self._tall() or self.gram is None:
            return None
        gram, self.gram = mirror_lower(self.gram), None
        root, values, proven = inverse_root(gram)
        del gram
        self._unproven(proven)
        return RowMap(root.mul_(float(values.mean()) * self.params.scale), self.stats)


# ---- TSV-M -----------------------------------------------------------------------------------------------------

def unit_rows(block: torch.Tensor, row_start: int) -> None:
    """Rows [row_start, row_start + rows) of I[:, :k] into a zero (rows, k) block: LAPACK's U of a zero matrix."""
    lo, hi = row_start, min(row_start + block.shape[0], block.shape[1])
    if lo < hi:
        block[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0


class SlotRows:
    """One chunk's Ū rows (rows, r) fp32, filled expert by expert: slot block t = Δt[rows] V_t / s_t (zero where
    s_t = 0). ``right[t]`` is V_t (n, k) fp64, ``values[t]`` s_t (k) fp64; ``row_start``: the chunk's first row.

    An expert whose Δt is 0 gets the triplets LAPACK gives a zero matrix (and the whole path takes, as its Gram route
    refuses σ = 0): the first k unit vectors on both sides, σ = 0. They change the other slots' polar factor, so
    this keeps the two paths alike where a fine-tune left the head untouched."""

    def __init__(self, right: list[torch.Tensor], values: list[torch.Tensor], r: int, row_start: int) -> None:
        self.right, self.inverse = right, [torch.where(v > 0, 1 / v.clamp(min=1e-300), 0 * v) for v in values]
        self.zero = [not bool(v.any()) for v in values]
        self.r, self.row_start = r, row_start
        self.rows: torch.Tensor | None = None

    def add(self, t: int, x: torch.Tensor, start: int) -> None:
        if self.rows is None:
            self.rows = x.new_zeros(x.shape[0], self.r)
        k = self.right[t].shape[1]
        if self.zero[t]:
            unit_rows(self.rows[:, start:start + k], self.row_start)
            return
        self.rows[:, start:start + k] = (x.double() @ self.right[t]).mul_(self.inverse[t]).to(x.dtype)

    def take(self) -> torch.Tensor:
        rows, self.rows = self.rows, None
        return rows


def polar_rows(vbar: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """polar(V̄) of an fp32 (r, n) slot matrix in place (fp32), through the fp64 Gram of its rows."""
    gram = side_gram(vbar, wide=True)
    root, _, proven = inverse_root(gram)
    del gram
    apply_left(root, vbar)
    return vbar, proven


class TsvGrams(SpectralPrepass):
    """Round 0: G_t per expert → top-k V_t, s_t and V̄; round 1: ŪᵀŪ over the chunks' Ū rows. State: TsvSystem."""

    rounds = 2

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.grams: list[torch.Tensor | None] = [None] * n_experts
        self.system: TsvSystem | None = None
        self.gram_u: torch.Tensor | None = None
        self.slots: SlotRows | None = None

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int:
        """Round 0: T fp64 Grams, then each one's eigh beside the others, the V_t kept (fp64 n×r in all) and V̄;
        polar(V̄): V̄ (fp32), its Gram, eigh and root; round 1 and merge: V_t, M (fp64 r×n), ŪᵀŪ and its eigh.
        Per chunk: Δ's fp64 copy, Ū rows (fp32 and fp64) and the product."""
        n, rows = whole.shape[-1], piece.shape[0]
        r = n
        round0 = 8 * (n_experts * n * n + EIGH_F64 * n * n + n * r) + 4 * r * n
        vbar = 8 * n * r + 4 * r * n + 8 * (2 + EIGH_F64) * r * r
        final = 8 * (n * r + r * n) + 4 * r * n + 8 * (2 + EIGH_F64) * r * r
        return int(max(round0, vbar, final)) + (8 + 4 + 8 + 8) * rows * n

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if not self._count(round_, info, delta, t):
            return
        if round_ == 0:
            x = delta.double()
            self.grams[t] = add_gram(self.grams[t], x, mirror=False)
            return
        if self.system is None:
            return
        if self.slots is None:
            self.slots = SlotRows(self.system.right, self.system.values, self.system.r, info.row_start)
        self.slots.row_start = info.row_start
        self.slots.add(t, delta, t * self.system.k)
        if t == self.n_experts - 1:
            u = self.slots.take().double()
            self.gram_u = add_gram(self.gram_u, u, mirror=False)

    def end_round(self, round_: int) -> None:
        if round_ == 0 and self._tall() and all(g is not None for g in self.grams):
            self.system = TsvSystem([mirror_lower(g) for g in self.grams], self.rows, self)
            self.grams = []
        elif round_ == 1 and self.system is not None and self.gram_u is not None:
            gram, self.gram_u = mirror_lower(self.gram_u), None
            self.system.finish(gram, self.params.scale, self)

    def state(self) -> TsvSystem | None:
        return self.system if self.system is not None and self.system.map is not None else None


class TsvSystem:
    """V_t and s_t per expert (the chunks' Ū slots), then the merge's RowMap."""

    def __init__(self, grams: list[torch.Tensor], m: int, pre: SpectralPrepass) -> None:
        n = grams[0].shape[0]
        self.r = r = min(m, n)
        self.k = k = r // len(grams)
        self.right: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.vbar = grams[0].new_zeros(r, n, dtype=torch.float32)   # V̄ (r, n) fp32, as the whole path's slots
        for t in range(len(grams)):
            if bool(grams[t].any()):
                v, s, proven = top_eigen(grams[t], k)
                pre._unproven(proven)
            else:                                                   # Δt = 0: SlotRows' unit vectors
                v, s = torch.eye(n, k, dtype=torch.float64, device=grams[t].device), grams[t].new_zeros(k)
            grams[t] = None                                         # freed before the next eigh
            self.right.append(v)
            self.values.append(s)
            self.vbar[t * k:(t + 1) * k] = v.T.float()
        self.sbar = torch.cat(self.values + [self.vbar.new_zeros(r - len(grams) * k, dtype=torch.float64)])
        self.map: RowMap | None = None

    def finish(self, gram_u: torch.Tensor, scale: float, pre: SpectralPrepass) -> None:
        """M = α·(ŪᵀŪ)^{-1/2}·diag(s̄)·polar(V̄), once ŪᵀŪ is gathered; V̄ becomes polar(V̄) in place."""
        pvbar, proven_v = polar_rows(self.vbar)
        root, _, proven_u = inverse_root(gram_u)
        del gram_u
        pre._unproven(proven_v)
        pre._unproven(proven_u)
        root.mul_(self.sbar.float().double() * scale)
        self.vbar = None
        self.map = RowMap(root @ pvbar.double(), pre.stats)
