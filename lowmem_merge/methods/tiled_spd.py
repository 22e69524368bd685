"""A symmetric matrix's lower triangle in row stripes of tiles, factored in place by a blocked Cholesky in fp64 and
applied as F⁻¹ to row blocks: the storage and kernels of spd_solve.SpdSystem (issue 17 §3: a 70B down_proj has
n = 28672, where A alone is 6.6 GB whole; packed, about half of that, and the factor takes A's place).

One stripe is the whole matrix (``PackedLower.whole``: the dense path, where n² fp64 values stay within
tiled_sums.TILED_MIN_BYTES), factored by one LAPACK call and applied by two triangular solves. ACE (ace.py) sums
its A_acc in a PackedLower of fp32 (``add_gram_``), takes its column sums and x·A from the stripes, and unpacks it for
its non-symmetric LU.
"""
from __future__ import annotations

import math

import torch


class PackedLower:
    """The lower triangle of a symmetric (n, n) matrix (fp64 here; ACE's A_acc in fp32) as row stripes: stripe j
    holds rows edges[j]:edges[j+1], columns 0:edges[j+1]. Its diagonal tile is held whole (symmetric while A is
    summed, lower triangular once factored); about n²/2 + n·tile/2 values instead of n²."""

    def __init__(self, n: int, tile: int, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        self.n = n
        self.edges = list(range(0, n, tile)) + [n]
        self.stripes = [torch.zeros(e - s, e, dtype=dtype, device=device) for s, e in self.spans()]

    @classmethod
    def whole(cls, a: torch.Tensor) -> PackedLower:
        """One stripe that is ``a`` itself, a whole symmetric (n, n) matrix (no copy): the dense path's A."""
        packed = cls.__new__(cls)
        packed.n = a.shape[-1]
        packed.edges = [0, packed.n]
        packed.stripes = [a]
        return packed

    @staticmethod
    def nbytes(n: int, tile: int, itemsize: int = 8) -> int:
        return itemsize * sum((min(s + tile, n) - s) * min(s + tile, n) for s in range(0, n, tile))

    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.edges, self.edges[1:]))

    def diag(self, j: int) -> torch.Tensor:
        return self.stripes[j][:, self.edges[j]:]

    def trace(self) -> float:
        return sum(float(self.diag(j).diagonal().sum()) for j in range(len(self.stripes)))

    def frobenius(self) -> float:
        """‖A‖F of the whole symmetric matrix (each off-diagonal tile stands for itself and its transpose)."""
        total = 0.0
        for j, stripe in enumerate(self.stripes):
            total += 2 * float(stripe[:, :self.edges[j]].square().sum()) + float(self.diag(j).square().sum())
        return math.sqrt(total)

    def add_diagonal(self, value: float) -> None:
        for j in range(len(self.stripes)):
            self.diag(j).diagonal().add_(value)

    def add_gram_(self, x: torch.Tensor, alpha: float) -> None:
        """A += alpha·xᵀx for x (m, n), one GEMM per stripe straight into it (half of xᵀx's FLOPs, no n×n temporary;
        with one stripe the very call ``a.addmm_(x.T, x)`` on the whole matrix)."""
        for stripe, (s, e) in zip(self.stripes, self.spans()):
            stripe.addmm_(x[:, s:e].T, x[:, :e], alpha=alpha)

    def column_sums(self) -> torch.Tensor:
        """Σ_i A[i, :] (n,) of the whole symmetric matrix: a stripe's columns, and its left part's rows for the tiles
        above the diagonal that it stands for."""
        out = self.stripes[0].new_zeros(self.n)
        for stripe, (s, e) in zip(self.stripes, self.spans()):
            out[:e] += stripe.sum(0)
            if s:
                out[s:e] += stripe[:, :s].sum(1)
        return out

    def mul_into_(self, out: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """out += alpha·x·A for x, out (m, n), tile stripe by stripe into out's columns (no m×n temporary): stripe j
        gives A[rows_j, :e_j] and, transposed, the tiles above the diagonal A[:s_j, rows_j]."""
        for stripe, (s, e) in zip(self.stripes, self.spans()):
            out[:, :e].addmm_(x[:, s:e], stripe, alpha=alpha)
            if s:
                out[:, s:e].addmm_(x[:, :s], stripe[:, :s].T, alpha=alpha)
        return out

    def unpack(self) -> torch.Tensor:
        """The whole (n, n) matrix; the stripes are consumed (self holds none afterwards). One stripe is returned as
        is. Otherwise each stripe is freed once copied into a fresh matrix whose pages the CPU commits only as they
        are written (a mapping of its own: device.tune_malloc), rows and columns 0:e_j after stripe j, so the process
        holds about (n² + e_j²)/2 values after stripe j: at most n² and one stripe (``unpack_floats``; measured
        n² + 1.0 stripe at n = 8192). A CUDA allocation is whole at once: n² and every stripe there (priced so on a CUDA
        device: ``unpack_floats(cuda=True)``, ``Ace.cuda_state_bytes``)."""
        stripes, self.stripes = self.stripes, []
        if len(stripes) == 1:
            return stripes.pop()
        full = stripes[0].new_empty(self.n, self.n)
        for j, (s, e) in enumerate(self.spans()):
            stripe, stripes[j] = stripes[j], None
            full[s:e, :e] = stripe
            if s:
                full[:s, s:e] = stripe[:, :s].T
            del stripe
        return full

    @staticmethod
    def unpack_floats(n: int, tile: int, cuda: bool = False) -> int:
        """Values held at most while ``unpack`` runs (besides the caller's other buffers): on the CPU the new matrix
        and one stripe; on CUDA, whose allocator hands out the new matrix whole before the first stripe is freed,
        the matrix and every stripe (``nbytes``)."""
        if n <= tile:
            return n * n                     # one stripe: returned as it is
        return n * n + (PackedLower.nbytes(n, tile, 1) if cuda else tile * n)


def factor_in_place(a: PackedLower) -> int:
    """Left-looking blocked Cholesky over the stripes: a becomes L (fp64, lower). Returns -1, or the stripe whose
    diagonal tile was not positive definite (``unfactor`` then gives A back)."""
    for j, stripe in enumerate(a.stripes):
        start = a.edges[j]
        for k, (ks, ke) in enumerate(a.spans()[:j]):
            block = stripe[:, ks:ke]                                  # L[j, k] = (A[j, k] − L[j, :k]·L[k, :k]ᵀ)·L_kk⁻ᵀ
            if ks:
                block.sub_(stripe[:, :ks] @ a.stripes[k][:, :ks].T)
            block.copy_(torch.linalg.solve_triangular(a.diag(k).T, block, upper=True, left=False))
        schur = a.diag(j) - stripe[:, :start] @ stripe[:, :start].T if start else a.diag(j)  # not written
        chol, info = torch.linalg.cholesky_ex(schur)
        if int(info) != 0:
            return j
        a.diag(j).copy_(chol)
    return -1


def unfactor(a: PackedLower, failed: int) -> None:
    """A back in stripes 0..failed as L·Lᵀ after ``factor_in_place`` stopped at ``failed`` (whose diagonal tile still
    holds A's; later stripes were never touched). Rounding: ~u64·‖A‖, far under the floor added next."""
    for i in range(failed, -1, -1):      # bottom up: the stripes above still hold L
        stripe = a.stripes[i]
        done = a.edges[i] if i == failed else a.edges[i + 1]
        rebuilt = stripe.new_empty(stripe.shape[0], done)
        for k, (ks, ke) in enumerate(a.spans()[:i + 1]):
            if ks < done:
                rebuilt[:, ks:ke] = stripe[:, :ke] @ a.stripes[k][:, :ke].T    # L[k, c] = 0 for c ≥ ke
        stripe[:, :done] = rebuilt


def apply_inverse(a: PackedLower, rows: torch.Tensor) -> torch.Tensor:
    """rows ← rows·F⁻¹ in place for F = L·Lᵀ (a factored): Z·Lᵀ = rows forward over the stripes, then X·L = Z
    backward. rows: (r, n) fp64."""
    for j, (s, e) in enumerate(a.spans()):
        block = rows[:, s:e]
        if s:
            block.sub_(rows[:, :s] @ a.stripes[j][:, :s].T)
        block.copy_(torch.linalg.solve_triangular(a.diag(j).T, block, upper=True, left=False))
    for j in range(len(a.stripes) - 1, -1, -1):
        s, e = a.edges[j], a.edges[j + 1]
        block = rows[:, s:e]
        block.copy_(torch.linalg.solve_triangular(a.diag(j), block, upper=False, left=False))
        if s:
            rows[:, :s].sub_(block @ a.stripes[j][:, :s])
    return rows
