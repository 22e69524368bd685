"""The §1 sums of a LIN matrix whose n×n fp64 statistic is large (n² · 8 bytes > TILED_MIN_BYTES: 13B and larger
down_proj), held for the tiled solver (tiled_spd.py): A packed in stripes, N (m·n fp64) as in covariance.GramSums,
both summed from column blocks of each Δt so that no fp64 copy of Δt nor any n×n temporary exists, and Δ* written
as fp32 over N's own storage. A 70B down_proj (8192x28672) holds 3.4 GB of A and 1.9 GB of N, where the dense path
peaked at 19.4 GB. Smaller n keeps covariance.GramSums (bitwise as before).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .matrix_rule import as_matrices
from .spd_solve import SOLVE_TEMPS, SpdSystem, merge_stats, row_block
from .tiled_spd import PackedLower

TILED_MIN_BYTES = 1 << 30   # n = 11585; 7B's n = 11008 keeps the dense path
TILE = 1024                 # tile side: GEMMs of 1024 are efficient, and the packing wastes n·TILE/2 values
K_ROW_VALUES = 1 << 23      # rows of ΔΔᵀ formed at once (rows-first products): about this many fp64 values; each
                            # block converts Δ to fp64 twice more (column block by column block)


def is_tiled(n: int) -> bool:
    return 8 * n * n > TILED_MIN_BYTES


def tiled_phase_bytes(shape: tuple[int, ...], rows_first: bool) -> tuple[int, int]:
    """(adding, finishing) as MergeMethod.phase_bytes: A packed and N (fp64) of every matrix, plus the largest
    temporaries of the phase; the result is written over N. Adding (rows first): rows of ΔΔᵀ, two fp64 column
    blocks of Δ and the products' tiles; (columns first) a column block of ΔᵀΔ (n, b), two fp64 column blocks and
    an (m, b) product. Finishing: factoring (a tile's Schur complement and factor, and a stripe while A is rebuilt
    after a failed tile) or solving (a row block's fp64 temporaries and its fp32 copy)."""
    *lead, m, n = shape
    held = math.prod(lead) * (PackedLower.nbytes(n, TILE) + 8 * m * n)
    b = min(TILE, n)
    if rows_first:
        k = min(m, _k_rows(m))
        adding = 8 * (k * m + 2 * m * b + b * b + k * b)
    else:
        adding = 8 * (n * b + 3 * m * b + b * b)
    factoring = 8 * (3 * b * b + b * n)
    r = min(m, row_block(n))
    solving = 8 * SOLVE_TEMPS * r * n + 4 * r * n
    return held + adding, held + max(factoring, solving)


def _k_rows(m: int) -> int:
    return max(1, K_ROW_VALUES // max(m, 1))


class TiledGramSums:
    """covariance.GramSums for a large n: the same ``add``, ``traces`` and ``solve``; ``A`` is None until an add."""

    def __init__(self, shape: tuple[int, ...], rows_first: bool) -> None:
        self.m, self.n = shape[-2], shape[-1]
        self.rows_first = rows_first
        self.A: list[PackedLower] | None = None   # per matrix
        self.N: torch.Tensor | None = None         # (B, m, n) fp64
        self.shift: list[float] = []

    def add(self, delta: torch.Tensor, weights: Sequence[float] | None = None, eps: float = 0.0) -> None:
        """A += w ΔᵀΔ, N += w Δ(ΔᵀΔ + ε I), s += w ε per matrix; weights: one per matrix, default 1; 0 skips it."""
        d = as_matrices(delta)  # (B, m, n) fp32
        if self.A is None:
            self.A = [PackedLower(self.n, TILE, d.device) for _ in range(d.shape[0])]
            self.N = d.new_zeros(d.shape[0], self.m, self.n, dtype=torch.float64)
            self.shift = [0.0] * d.shape[0]
        for e, x in enumerate(d):  # x: (m, n) fp32
            w = 1.0 if weights is None else weights[e]
            if w == 0:
                continue
            self.shift[e] += w * eps
            if self.rows_first:
                _add_gram(self.A[e], x, w)
                _add_rows_first(self.A[e], self.N[e], x, w, eps)
            else:
                _add_columns_first(self.A[e], self.N[e], x, w, eps)

    def traces(self) -> list[float]:
        return [a.trace() for a in self.A]

    def solve(self, ridges: Sequence[float] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Δ* (B, m, n) fp32, written over N's storage (its first half, matrix by matrix: behind what is still read);
        A and N are consumed. Stats as GramSums.solve's."""
        stats = {"cond_est": 1.0, "ridge": 0.0, "eigh": 0.0, "steps": 0.0, "pinv": 0.0}
        out = self.N.view(-1).view(torch.float32)[:self.N.numel()].view(self.N.shape)
        for e, (trace, extra) in enumerate(zip(self.traces(), ridges or [0.0] * len(self.A))):
            if trace == 0:      # only zero deltas: N is 0 and stays the answer
                out[e].zero_()
                continue
            ridge = self.shift[e] + extra
            system = SpdSystem(self.A[e], ridge)
            self.A[e] = None
            system.solve(self.N[e], out[e])
            merge_stats(stats, system.stats, ridge)
        self.A = self.N = None
        return out, stats


def _add_gram(a: PackedLower, x: torch.Tensor, w: float) -> None:
    """A += w xᵀx tile by tile, from fp64 column blocks of x (m, n) fp32."""
    spans = a.spans()
    for j, (s, e) in enumerate(spans):
        xj = x[:, s:e].double()
        for k, (ks, ke) in enumerate(spans[:j + 1]):
            xk = xj if k == j else x[:, ks:ke].double()
            a.stripes[j][:, ks:ke].addmm_(xj.T, xk, alpha=w)


def _add_rows_first(a: PackedLower, nn: torch.Tensor, x: torch.Tensor, w: float, eps: float) -> None:
    """N += w (x xᵀ) x + w ε x, rows of x xᵀ at a time (4m²n flops, against 4mn² columns first when 2m < n)."""
    m = x.shape[0]
    step = _k_rows(m)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        k = x.new_zeros(r1 - r0, m, dtype=torch.float64)      # rows r0:r1 of x xᵀ
        for s, e in a.spans():
            xj = x[:, s:e].double()
            k.addmm_(xj[r0:r1], xj.T)
        for s, e in a.spans():
            xj = x[:, s:e].double()
            nn[r0:r1, s:e].addmm_(k, xj, alpha=w)
            if eps:
                nn[r0:r1, s:e].add_(xj[r0:r1], alpha=w * eps)


def _add_columns_first(a: PackedLower, nn: torch.Tensor, x: torch.Tensor, w: float, eps: float) -> None:
    """A += w xᵀx and N += w x (xᵀx + ε I) by column blocks J of xᵀx (n, b): its tiles at or below the diagonal are
    A's, and N[:, J] += w x·(xᵀx)[:, J]."""
    spans = a.spans()
    for j, (s, e) in enumerate(spans):
        xj = x[:, s:e].double()
        g = xj.new_empty(x.shape[1], e - s)                  # (xᵀx)[:, J]
        for ks, ke in spans:
            g[ks:ke] = x[:, ks:ke].double().T @ xj
        for k in range(j, len(spans)):
            ks, ke = spans[k]
            a.stripes[k][:, s:e].add_(g[ks:ke], alpha=w)
        block = nn[:, s:e]
        for ks, ke in spans:
            block.addmm_(x[:, ks:ke].double(), g[ks:ke], alpha=w)
        if eps:
            block.add_(xj, alpha=w * eps)
