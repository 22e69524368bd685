"""What every per-matrix rule shares (covariance rules, ace, wudi, tsv, iso_c, iso_cts): the class split of §13.

LIN tensors go to the rule as a (B, m, n) batch of independent matrices (a plain matrix is a batch of one; 3-D
mixture-of-experts weights are B = E matrices). Every other class gets scale·mean of Δt (scale = the rule's α where
it has one, else 1), read in pass 0 only: a two-pass rule still reads those tensors twice (the stream's choice),
but adds them once. ``polar`` and ``SlotBuffers`` are TSV-M's and Iso-CTS's slot-filling steps (§5, §6).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..info import TensorClass, TensorInfo
from .average import Average
from .base import MergeMethod, NoParams


def as_matrices(x: torch.Tensor) -> torch.Tensor:
    """(..., m, n) -> (B, m, n); a view whenever the layout allows (always for a plain matrix)."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


class MatrixRule(MergeMethod):
    """LIN: ``_add_matrices`` per expert and pass, ``_finalize_matrices``; other classes: scale·mean of Δt."""

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self._mean = None if info.cls == TensorClass.LIN else Average(info, n_experts, NoParams())
        self._stats: dict[str, float] = {}
        self._device: torch.device | None = None  # of the deltas, for a result built from nothing

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        self._device = delta.device
        if self._mean is None:
            self._add_matrices(t, as_matrices(delta), pass_)
        elif pass_ == 0:
            self._mean.add(t, delta)

    def finalize(self) -> torch.Tensor:
        if self._mean is not None:
            scale = getattr(self.params, "scale", 1.0)
            merged = self._mean.finalize()
            return merged if scale == 1.0 else merged.mul_(scale)
        return self._finalize_matrices().view(self.info.shape)

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return info.cls != TensorClass.LIN    # the mean of other classes is elementwise

    @classmethod
    def state_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> int:
        if info.cls != TensorClass.LIN:
            return 4 * info.numel
        *lead, m, n = info.shape
        return 4 * cls._matrix_floats(math.prod(lead), m, n, n_experts, params)

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        """Peak fp32 values held for a (batch, m, n) LIN tensor: statistics plus the largest temporary."""
        raise NotImplementedError

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        """Read expert t's (B, m, n) fp32 matrices; keep no reference to ``d``."""
        raise NotImplementedError

    def _finalize_matrices(self) -> torch.Tensor:
        """Δ* as (B, m, n) fp32."""
        raise NotImplementedError


GRAM_COND = 1e3  # the Gram route is taken when every singular value used is at least σ_max / GRAM_COND
POLAR_COND = 1e5  # the Gram route of ``polar_`` is taken when σ_min ≥ σ_max / POLAR_COND
BLOCK = 1024      # lines of an fp32 matrix upcast to fp64 at a time: the Gram routes hold no whole fp64 copy
EIGH_FLOATS = 5   # fp32-sized values per k² an fp64 eigh of a k×k matrix holds beside its input: its vectors and
                  # LAPACK's workspace (measured 2.1-2.4 fp64 k×k at k = 2048..4096, torch 2.x CPU)
LAPACK_WORK = 6   # fp32 values per k² of LAPACK's fp32 SVD workspace beside its copy of x and its factors (5.5 measured)


def svd_floats(m: int, n: int) -> int:
    """fp32-sized values of the old whole-copy ``thin_svd`` on one m×n matrix, kept as the bound of rules that still
    price it (ace): the Gram route with an fp64 copy, or LAPACK's factors and a copy of the input."""
    k = min(m, n)
    gram = 2 * m * n + 4 * k * k + 2 * (m * k + k * n) + (m * k + k + k * n)
    lapack = m * k + k + k * n + m * n
    return max(gram, lapack)


def gram_route_floats(m: int, n: int) -> int:
    """fp32-sized values the Gram route of ``thin_svd`` or ``polar_`` holds beside its input: the fp64 Gram of the
    smaller side (and its restriction to the nonzero lines), then the eigh, then G^{-1/2} with the eigenvectors and
    their scaled copy; plus a block's fp64 copy and product (BLOCK lines of the larger side, k long)."""
    k = min(m, n)
    return max(4 * k * k, (2 + EIGH_FLOATS) * k * k, 6 * k * k) + 4 * BLOCK * k


def lapack_floats(m: int, n: int) -> int:
    """fp32 values LAPACK's thin SVD holds beside its input: a copy of it, U, S, Vh and the workspace."""
    k = min(m, n)
    return m * n + m * k + k + k * n + LAPACK_WORK * k * k


def thin_svd_floats(m: int, n: int, top: int) -> int:
    """``thin_svd(x, top)`` beside x: the larger route, and its fp32 results (top triplets)."""
    k = min(m, n)
    return max(gram_route_floats(m, n) + 2 * k * top, lapack_floats(m, n)) + (m + n + 1) * top


def polar_floats(m: int, n: int) -> int:
    """``polar_(x)`` beside x (in place): the larger route."""
    return max(gram_route_floats(m, n), lapack_floats(m, n))


def _lines(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nonzero rows, nonzero columns) of x as bool vectors, BLOCK columns at a time."""
    rows = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    cols = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    for c in range(0, x.shape[1], BLOCK):
        nz = x[:, c:c + BLOCK] != 0
        rows |= nz.any(dim=1)
        cols[c:c + BLOCK] = nz.any(dim=0)
    return rows, cols


def side_gram(x: torch.Tensor, wide: bool) -> torch.Tensor:
    """fp64 x·xᵀ (wide) or xᵀ·x of fp32 x, upcast BLOCK lines at a time."""
    k = x.shape[0] if wide else x.shape[1]
    g = x.new_zeros(k, k, dtype=torch.float64)
    if wide:
        for c in range(0, x.shape[1], BLOCK):
            xd = x[:, c:c + BLOCK].double()
            g.addmm_(xd, xd.T)
    else:
        for r in range(0, x.shape[0], BLOCK):
            xd = x[r:r + BLOCK].double()
            g.addmm_(xd.T, xd)
    return g


def _top_vectors(gram: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(all eigenvalues descending, the ``top`` leading eigenvectors (k, top) fp64, σ (top) fp64); frees nothing."""
    evals, vecs = torch.linalg.eigh(gram)   # ascending
    k = evals.shape[0]
    keep = vecs[:, k - top:].flip(1)          # a copy of the top columns only
    del vecs
    evals = evals.flip(0)
    return evals, keep, evals[:top].clamp(min=0).sqrt()


def thin_svd(x: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``top`` leading triplets (all min(m, n) by default) of x's thin SVD: (U (m, top), S (top), Vh (top, n)).

    Route 1, exact and far cheaper on a CPU (measured 4-25× on 512..8000-row matrices): eigh of the fp64 Gram of the
    smaller side, the other factor as X V / σ. Its error on a triplet grows like eps64·(σ_max/σ)³, so it is taken only
    when every σ used is ≥ σ_max / GRAM_COND, where it is below fp32 rounding (tests/test_methods.py checks
    factors and the polar factor against fp64 LAPACK). Route 2 otherwise (rank-deficient or ill-conditioned
    matrices: LoRA sums, tails that Iso-C flattens): LAPACK in fp32, which now and then fails to converge on
    clustered singular values (seen on Iso-CTS's slot matrices of a 6-layer model) and is then redone in fp64.
    Memory: ``thin_svd_floats`` beside x (route 1 upcasts x BLOCK lines at a time, never whole).
    """
    k = min(x.shape)
    top = k if top is None else min(top, k)
    found = _gram_svd(x, top)
    if found is not None:
        return found
    u, s, vh = _lapack_svd(x)
    return u[:, :top], s[:top], vh[:top]


def _lapack_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route 2 of ``thin_svd``: fp32 LAPACK, redone in fp64 where it fails to converge."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        return tuple(f.to(x.dtype) for f in torch.linalg.svd(x.double(), full_matrices=False))


def _gram_svd(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Route 1 of ``thin_svd``, or None when its accuracy would not suffice (or there is nothing to decompose)."""
    if top == 0:
        return None
    wide = x.shape[0] < x.shape[1]
    gram = side_gram(x, wide)
    _, vecs, s = _top_vectors(gram, top)
    del gram
    if not float(s[-1]) > float(s[0]) / GRAM_COND:
        return None
    if wide:   # x = U S Vh with U = vecs: Vh = S⁻¹ Uᵀ x, BLOCK columns at a time
        u, vh = vecs.to(x.dtype), x.new_empty(top, x.shape[1])
        for c in range(0, x.shape[1], BLOCK):
            vh[:, c:c + BLOCK] = (vecs.T @ x[:, c:c + BLOCK].double()).div_(s[:, None])
    else:      # V = vecs: U = x V S⁻¹, BLOCK rows at a time
        u, vh = x.new_empty(x.shape[0], top), vecs.T.to(x.dtype).contiguous()
        for r in range(0, x.shape[0], BLOCK):
            u[r:r + BLOCK] = (x[r:r + BLOCK].double() @ vecs).div_(s)
    return u, s.to(x.dtype), vh


def polar_(x: torch.Tensor) -> torch.Tensor:
    """x ← its orthogonal polar factor P Qᵀ (x = P Σ Qᵀ), in place; returns σ (descending, fp32).

    Route 1: eigh of the fp64 Gram G of the smaller side, polar = x·G^{-1/2} (tall) or G^{-1/2}·x (wide), applied
    BLOCK lines at a time. Unlike a single singular vector, the polar factor does not depend on the gaps between
    singular values (rotations within a cluster cancel); rounding G (‖E‖ ~ eps64·σ_max²) moves its part along σ by
    ~eps64·(σ_max/σ)², below fp32 rounding (u32·σ_max/σ, the factor's own sensitivity to fp32 input) for every
    σ ≥ σ_max / POLAR_COND (tests/test_methods.py holds it to fp64 LAPACK). Costs a Gram and one eigh of the smaller
    side: the FLOP floor of the rule, where LAPACK's SVD of an ill-conditioned matrix (TSV-M's and Iso-CTS's slot
    matrices) took 10-40x the I/O floor. Exactly zero lines of the smaller side (unfilled slots) are left out and
    stay zero in the factor: they meet a zero weight (s̄ = 0) wherever the factor is used. Route 2 otherwise: LAPACK's
    SVD, as ``thin_svd``'s, its U·Vh written over x. Memory: ``polar_floats`` beside x.
    """
    rows, cols = _lines(x)
    # the Gram of the smaller side; a square one takes the side with unfilled slots (V̄'s rows, Ū's columns)
    wide = x.shape[0] < x.shape[1] or x.shape[0] == x.shape[1] and int(rows.sum()) < int(cols.sum())
    lines = rows if wide else cols                       # nonzero rows (wide) or columns (tall)
    k = min(x.shape)
    if bool(lines.any()):
        values = _polar_gram_(x, wide, lines)
        if values is not None:
            out = x.new_zeros(k)
            out[:values.shape[0]] = values
            return out
    u, s, vh = _lapack_svd(x)   # not thin_svd: its Gram route would repeat the eigh just rejected
    torch.matmul(u, vh, out=x)
    return s


def _polar_gram_(x: torch.Tensor, wide: bool, lines: torch.Tensor) -> torch.Tensor | None:
    """Route 1 of ``polar_`` over the nonzero ``lines`` of the smaller side; None (x untouched) if not proven."""
    gram = side_gram(x, wide)
    every = bool(lines.all())
    if not every:
        gram = gram[lines][:, lines]
    evals, vecs = torch.linalg.eigh(gram)                 # ascending
    del gram
    if not float(evals[0]) > float(evals[-1]) / POLAR_COND ** 2:
        return None
    root = (vecs * evals.rsqrt()) @ vecs.T                # G^{-1/2}
    del vecs
    idx = None if every else lines.nonzero().squeeze(1)
    if wide:
        for c in range(0, x.shape[1], BLOCK):
            part = x[:, c:c + BLOCK] if every else x[idx, c:c + BLOCK]
            part = (root @ part.double()).to(x.dtype)
            if every:
                x[:, c:c + BLOCK] = part
            else:
                x[idx, c:c + BLOCK] = part
    else:
        for r in range(0, x.shape[0], BLOCK):
            part = x[r:r + BLOCK] if every else x[r:r + BLOCK, idx]
            part = (part.double() @ root).to(x.dtype)
            if every:
                x[r:r + BLOCK] = part
            else:
                x[r:r + BLOCK, idx] = part
    return evals.flip(0).sqrt().to(x.dtype)


def polar_and_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal polar factor of x (a new fp32 matrix) and σ (descending): ``polar_`` on a copy of x."""
    out = x.clone()
    return out, polar_(out)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ: the nearest matrix with orthonormal columns (rows, if wide).
    Unique where x has full rank; for zero columns it does not matter, their s̄ is 0 (§5)."""
    return polar_and_values(x)[0]


class SlotBuffers:
    """Ū (B, m, r), s̄ (B, r), V̄ (B, r, n), zero until filled: column j of Ū, s̄[j] and row j of V̄ are one triplet."""

    def __init__(self, like: torch.Tensor) -> None:
        batch, m, n = like.shape
        r = min(m, n)
        self.u = like.new_zeros(batch, m, r)
        self.s = like.new_zeros(batch, r)
        self.vh = like.new_zeros(batch, r, n)

    def put(self, e: int, start: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """Triplets (u (m, k), s (k), vh (k, n)) of matrix e into slots [start, start + k)."""
        k = s.shape[0]
        self.u[e, :, start:start + k] = u
        self.s[e, start:start + k] = s
        self.vh[e, start:start + k] = vh

    def merge_into(self, e: int, values: torch.Tensor, out: torch.Tensor) -> None:
        """out ← polar(Ū)·diag(values)·polar(V̄) for matrix e, (m, n) fp32; Ū[e] and V̄[e] are overwritten by their
        polar factors (one at a time, in place: ``polar_floats`` of the larger beside the slots)."""
        polar_(self.u[e])
        polar_(self.vh[e])
        torch.matmul(self.u[e].mul_(values), self.vh[e], out=out)

    @staticmethod
    def merge_floats(m: int, n: int) -> int:
        """``merge_into`` beside the slots and the result."""
        r = min(m, n)
        return max(polar_floats(m, r), polar_floats(r, n))
