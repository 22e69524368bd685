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
from .gram import add_gram, mirror_lower


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
POLAR_COND = 1e6  # the Gram route of ``polar_`` is taken when σ_min ≥ σ_max / POLAR_COND (why: ``polar_``)
BLOCK = 1024      # lines of an fp32 matrix upcast to fp64 at a time: the Gram routes hold no whole fp64 copy
EIGH_FLOATS = 7   # fp32-sized values per k² an fp64 eigh of a k×k matrix holds beside its input: its vectors and
                  # syevd's 2k² workspace (peak RSS 3.35, 3.11, 3.03 fp64 k² at k = 2048, 4096, 8192; torch 2.13 CPU)
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
    """fp32 values the LAPACK route (``_reduced_svd``) holds beside its input: for a square matrix LAPACK's copy of
    it, U, Vh and its workspace; otherwise the larger of the QR steps reducing it to its k×k R factor and R's SVD
    (R, LAPACK's copy, U, Vh, workspace), then R's right factor in fp64 and a block's products."""
    k = min(m, n)
    if m == n:
        return (3 + LAPACK_WORK) * k * k + k
    return max(6 * k * k, (4 + LAPACK_WORK) * k * k + k) + 4 * BLOCK * k


def thin_svd_floats(m: int, n: int, top: int) -> int:
    """``thin_svd(x, top)`` beside x: the larger route, and its fp32 results (top triplets)."""
    k = min(m, n)
    return max(gram_route_floats(m, n) + 2 * k * top, lapack_floats(m, n)) + (m + n + 1) * top


def polar_floats(m: int, n: int) -> int:
    """``polar_(x)`` beside x (in place): the larger route."""
    return max(gram_route_floats(m, n), lapack_floats(m, n))


def one_buffer_floats(held: int, numel: int) -> int:
    """What a spectral rule prices as its state, given ``held``: the most it holds beside Δ (while adding) or beside
    its result (from finalize on). budget.piece_bytes counts both Δ and the result (2·numel fp32); TSV-M and Iso-C/CTS
    hold one of them at a time (the stream frees Δ before finalize; Iso-C's result is its sum, overwritten), so the
    plan's total is exact when the state is ``held`` less one numel."""
    return max(held - numel, 0)


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
            add_gram(g, x[:, c:c + BLOCK].double().T, mirror=False)
    else:
        for r in range(0, x.shape[0], BLOCK):
            add_gram(g, x[r:r + BLOCK].double(), mirror=False)
    return mirror_lower(g)


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
    matrices: LoRA sums, tails that Iso-C flattens): LAPACK in fp32 (``_reduced_svd``), which now and then fails to
    converge on clustered singular values (seen on Iso-CTS's slot matrices of a 6-layer model) and is then redone in
    fp64. Memory: ``thin_svd_floats`` beside x (route 1 upcasts x BLOCK lines at a time, never whole).
    """
    k = min(x.shape)
    top = k if top is None else min(top, k)
    found = _gram_svd(x, top)
    if found is not None:
        return found
    return _reduced_svd(x, top)


def _lapack_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 LAPACK's thin SVD, redone in fp64 where it fails to converge."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch.linalg.LinAlgError:
        return tuple(f.to(x.dtype) for f in torch.linalg.svd(x.double(), full_matrices=False))


def _tsqr(a: torch.Tensor) -> torch.Tensor:
    """R (k, k) fp32 of a = Q R for a tall (L, k) matrix (a view), k rows of a added at a time: R of [R; rows]."""
    k = a.shape[1]
    r = None
    for i in range(0, a.shape[0], max(k, BLOCK)):
        rows = a[i:i + max(k, BLOCK)]
        r = torch.linalg.qr(rows if r is None else torch.cat([r, rows]), mode="r")[1]
    return r


def _right_of_r(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (k, k) fp64, σ (k) fp32) of the smaller side of a non-square x: x = P Σ Vᵀ (wide: V are x's left
    vectors, as x = Rᵀ Qᵀ) from LAPACK's SVD of the R factor of x's longer side, never of x itself."""
    wide = x.shape[0] < x.shape[1]
    r = _tsqr(x.T if wide else x)
    _, s, vh = _lapack_svd(r)
    del r
    return vh.T.double(), s


def _reduced_svd(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route 2 of ``thin_svd``: LAPACK, on x itself when square, else on the k×k R of its longer side (x = Q R), the
    other factor then taken as x·V / σ (a direction with σ = 0 gets zero there: no defined vector). As accurate as
    LAPACK on x (QR and SVD are backward stable; the division costs u32·σ_max/σ, below LAPACK's u32·σ_max/gap),
    with k² instead of m·n of workspace. A zero x gets LAPACK's unit vectors, as the Gram route refuses it."""
    m, n = x.shape
    if m == n or not bool(x.any()):
        u, s, vh = _lapack_svd(x)
        return u[:, :top], s[:top], vh[:top]
    v, s = _right_of_r(x)
    v = v[:, :top]
    inv = torch.where(s[:top] > 0, 1 / s[:top].double().clamp(min=1e-300), torch.zeros((), dtype=torch.float64))
    if m < n:   # x = V Σ Zᵀ: U = V, Vh = Σ⁻¹ Vᵀ x
        vh = x.new_empty(top, n)
        for c in range(0, n, BLOCK):
            vh[:, c:c + BLOCK] = (v.T @ x[:, c:c + BLOCK].double()).mul_(inv[:, None])
        reorthonormalize_(vh, wide=True)
        return v.to(x.dtype), s[:top], vh
    u = x.new_empty(m, top)
    for r in range(0, m, BLOCK):
        u[r:r + BLOCK] = (x[r:r + BLOCK].double() @ v).mul_(inv)
    reorthonormalize_(u, wide=False)
    return u, s[:top], v.T.to(x.dtype).contiguous()


def reorthonormalize_(y: torch.Tensor, wide: bool) -> None:
    """Columns (rows, if wide) of y made orthonormal in place, in order (Cholesky QR: y ← y·R⁻¹ with YᵀY = RᵀR, fp64):
    for a factor divided by σ (``_reduced_svd``), orthonormal only up to u32·σ_max/σ in its small-σ lines, which this
    removes while leaving the leading (large-σ) lines as they are. Zero lines (σ = 0) stay zero."""
    rows, cols = _lines(y)
    idx = (rows if wide else cols).nonzero().squeeze(1)
    if idx.numel() == 0:
        return
    gram = side_gram(y, wide)[idx][:, idx]
    low, info = torch.linalg.cholesky_ex(gram)           # gram = L Lᵀ
    del gram
    if int(info) != 0:
        return
    if wide:      # y[idx] ← L⁻¹ y[idx]
        for c in range(0, y.shape[1], BLOCK):
            part = torch.linalg.solve_triangular(low, y[idx, c:c + BLOCK].double(), upper=False)
            y[idx, c:c + BLOCK] = part.to(y.dtype)
    else:         # y[:, idx] ← y[:, idx] L⁻ᵀ
        for r in range(0, y.shape[0], BLOCK):
            part = torch.linalg.solve_triangular(low.T, y[r:r + BLOCK, idx].double(), upper=True, left=False)
            y[r:r + BLOCK, idx] = part.to(y.dtype)


def _polish_polar_(x: torch.Tensor, wide: bool) -> None:
    """x ← polar(x) in place through the Gram route, for an approximate polar factor (well conditioned)."""
    rows, cols = _lines(x)
    lines = rows if wide else cols
    if bool(lines.any()):
        _polar_gram_(x, wide, lines)


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
    ~eps64·(σ_max/σ)², below fp32 rounding (u32·σ_max/σ, the factor's own sensitivity to fp32 input) for every σ ≥
    σ_max / 5e8, and at most 1.1e-4 (§1's tolerance) for σ ≥ σ_max / POLAR_COND = 1e6, where fp32 LAPACK, the other
    route, errs by ~u32·σ_max/σ = 6e-2 (measured on 300..700-line matrices against fp64 LAPACK: the Gram route
    2.5e-8..7.4e-5 at κ = 1e4..1e6, fp32 LAPACK 1.9e-5..2.2e-2; tests/test_lowrank_exact.py holds both). Costs a Gram
    and one eigh of the smaller side: the FLOP floor of the rule, where LAPACK's SVD of an ill-conditioned matrix
    (TSV-M's and Iso-CTS's slot matrices) took 10-40x the I/O floor. Exactly zero lines of the smaller side (unfilled
    slots) are left out and stay zero in the factor: they meet a zero weight (s̄ = 0) wherever the factor is used.
    Route 2 otherwise: LAPACK's SVD, as ``thin_svd``'s: U·Vh of x written over it when square, else V Σ⁻¹ Vᵀ applied
    as in route 1 with V and σ from the SVD of the k×k R factor of x's longer side (directions with σ = 0 left out, as
    the zero lines above). Memory: ``polar_floats`` beside x.
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
    if x.shape[0] == x.shape[1]:
        u, s, vh = _lapack_svd(x)   # not thin_svd: its Gram route would repeat the eigh just rejected
        torch.matmul(u, vh, out=x)
        return s
    v, s = _right_of_r(x)           # the smaller side's vectors from R's SVD (``_reduced_svd``)
    inv = torch.where(s > 0, 1 / s.double().clamp(min=1e-300), torch.zeros((), dtype=torch.float64))
    _apply_root_(x, wide, (v * inv) @ v.T, None)      # polar = V Σ⁻¹ Vᵀ x (wide) or x V Σ⁻¹ Vᵀ
    _polish_polar_(x, wide)                            # its small-σ lines are orthonormal to u32·σ_max/σ only
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
    _apply_root_(x, wide, root, None if every else lines.nonzero().squeeze(1))
    return evals.flip(0).sqrt().to(x.dtype)


def _apply_root_(x: torch.Tensor, wide: bool, root: torch.Tensor, idx: torch.Tensor | None) -> None:
    """x ← root·x (wide) or x·root in place, on the lines ``idx`` of the smaller side (all: None), BLOCK at a time."""
    if wide:
        for c in range(0, x.shape[1], BLOCK):
            part = x[:, c:c + BLOCK] if idx is None else x[idx, c:c + BLOCK]
            part = (root @ part.double()).to(x.dtype)
            if idx is None:
                x[:, c:c + BLOCK] = part
            else:
                x[idx, c:c + BLOCK] = part
    else:
        for r in range(0, x.shape[0], BLOCK):
            part = x[r:r + BLOCK] if idx is None else x[r:r + BLOCK, idx]
            part = (part.double() @ root).to(x.dtype)
            if idx is None:
                x[r:r + BLOCK] = part
            else:
                x[r:r + BLOCK, idx] = part


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
