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


def svd_floats(m: int, n: int) -> int:
    """fp32-sized values of ``thin_svd`` on one m×n matrix: the larger of the Gram route (an fp64 copy, the fp64
    Gram and its eigenvectors, the fp64 factors) and LAPACK's (U, S, Vh and a copy of the input as workspace)."""
    k = min(m, n)
    gram = 2 * m * n + 4 * k * k + 2 * (m * k + k * n) + (m * k + k + k * n)
    lapack = m * k + k + k * n + m * n
    return max(gram, lapack)


def thin_svd(x: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``top`` leading triplets (all min(m, n) by default) of x's thin SVD: (U (m, top), S (top), Vh (top, n)).

    Route 1, exact and far cheaper on a CPU (measured 4-25× on 512..8000-row matrices): eigh of the fp64 Gram of the
    smaller side, the other factor as X V / σ. Its error on a triplet grows like eps64·(σ_max/σ)³, so it is taken only
    when every σ used is ≥ σ_max / GRAM_COND, where it is below fp32 rounding (tests/test_methods.py checks
    factors and the polar factor against fp64 LAPACK). Route 2 otherwise (rank-deficient or ill-conditioned
    matrices: LoRA sums, tails that Iso-C flattens): LAPACK in fp32, which now and then fails to converge on
    clustered singular values (seen on Iso-CTS's slot matrices of a 6-layer model) and is then redone in fp64.
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
    xd = x.double()
    wide = x.shape[0] < x.shape[1]
    evals, vecs = torch.linalg.eigh(xd @ xd.T if wide else xd.T @ xd)  # ascending
    evals, vecs = evals.flip(0)[:top], vecs.flip(1)[:, :top]
    s = evals.clamp(min=0).sqrt()
    if not float(s[-1]) > float(s[0]) / GRAM_COND:
        return None
    if wide:   # x = U S Vh with U = vecs: Vh = S⁻¹ Uᵀ x
        u, vh = vecs, (vecs.T @ xd).div_(s[:, None])
    else:      # V = vecs: U = x V S⁻¹
        u, vh = (xd @ vecs).div_(s), vecs.T
    return u.to(x.dtype), s.to(x.dtype), vh.to(x.dtype).contiguous()


POLAR_COND = 1e5  # the Gram route of ``polar_and_values`` is taken when σ_min ≥ σ_max / POLAR_COND


def polar_and_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ and the singular values σ (descending), fp32.

    Route 1: eigh of the fp64 Gram G of the smaller side, polar = x·G^{-1/2} (tall) or G^{-1/2}·x (wide). Unlike a
    single singular vector, the polar factor does not depend on the gaps between singular values (rotations within
    a cluster cancel); rounding G (‖E‖ ~ eps64·σ_max²) moves its part along σ by ~eps64·(σ_max/σ)², below fp32
    rounding (u32·σ_max/σ, the factor's own sensitivity to fp32 input) for every σ ≥ σ_max / POLAR_COND
    (tests/test_methods.py holds it to fp64 LAPACK). Costs a Gram and one eigh of the smaller side: the
    FLOP floor of the rule, where LAPACK's SVD of an ill-conditioned matrix (TSV-M's and Iso-CTS's slot matrices)
    took 10-40x the I/O floor. Exactly zero lines of the smaller side (unfilled slots) are left out and get zero in
    the factor: they meet a zero weight (s̄ = 0) wherever the factor is used. Route 2 otherwise: LAPACK's SVD, as ``thin_svd``'s.
    """
    rows, cols = (x != 0).any(dim=1), (x != 0).any(dim=0)
    # the Gram of the smaller side; a square one takes the side with unfilled slots (V̄'s rows, Ū's columns)
    wide = x.shape[0] < x.shape[1] or x.shape[0] == x.shape[1] and int(rows.sum()) < int(cols.sum())
    lines = rows if wide else cols                       # nonzero rows (wide) or columns (tall)
    k = min(x.shape)
    if bool(lines.any()):
        xd = (x[lines] if wide else x[:, lines]).double()
        gram = xd @ xd.T if wide else xd.T @ xd
        evals, vecs = torch.linalg.eigh(gram)             # ascending
        del gram                                          # (memory: within svd_floats' Gram route)
        if float(evals[0]) > float(evals[-1]) / POLAR_COND ** 2:
            root = (vecs * evals.rsqrt()) @ vecs.T          # G^{-1/2}
            del vecs
            part = root @ xd if wide else xd @ root
            del xd, root
            out = x.new_zeros(x.shape)
            if wide:
                out[lines] = part.to(x.dtype)
            else:
                out[:, lines] = part.to(x.dtype)
            values = x.new_zeros(k)
            values[:evals.shape[0]] = evals.flip(0).sqrt().to(x.dtype)
            return out, values
    u, s, vh = _lapack_svd(x)   # not thin_svd: its Gram route would repeat the eigh just rejected
    return u @ vh, s


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

    def merge(self, e: int, values: torch.Tensor) -> torch.Tensor:
        """polar(Ū) · diag(values) · polar(V̄) for matrix e: (m, n) fp32."""
        return (polar(self.u[e]) * values) @ polar(self.vh[e])
