"""Iso-CTS, isotropic merging in common and task-specific subspaces (ALGORITHMS.md §6; `iso-merging/src/utils/iso.py`).

LIN, per (m, n) matrix, r = min(m, n), f = common_fraction:
    k0 = ⌊r·f⌋, n_ts = round((r − k0)/T)·T (Python round, half to even), k_c = r − n_ts, p = n_ts/T;
    pass 0: S = Σ_t Δt; its top-k_c SVD triplets (U_c, σ_c, V_c) fill slots [T·p, T·p + k_c);
    pass 1: R_t = (I − U_c U_cᵀ) Δt (left projection only), its top-p triplets fill slots [t·p, (t+1)·p);
    Δ* = α · mean(s̄) · polar(Ū) · polar(V̄).
Other tensors: α · mean of Δt. Because only the left side is projected, the rule depends on orientation (§9.2).
Deviation: where rounding up makes T·p exceed r (tiny r, small f; the reference would index out of range),
p drops to ⌊r/T⌋ and k_c = r − T·p.
Memory: S (pass 0), then the slots m·r + r + r·n, the projection's basis and one expert's projection and SVD.
Speed: where m ≤ n, pass 0 takes S's left singular vectors whole (an eigh of the m×m Gram S·Sᵀ), so besides U_c it
has Q, the other m − k_c, an orthonormal basis of U_c's complement: Q·Qᵀ = I − U_c·U_cᵀ. Then R_t = Q·(QᵀΔt) and the
SVD of R_t is Q times that of the (m − k_c)×n matrix QᵀΔt: one small Gram and eigh per expert instead of an m×m one.
Tall matrices (m > n) project out U_c as written, their residual's Gram is n×n either way; from m ≥ 3n (an LM head,
gate/up_proj) they are merged in row chunks from three prepass rounds (spectral_tall.py): pass 0 of each chunk sums
S[rows] for U_c[rows], pass 1 fills Y[rows] = [Δt[rows] V_t ..., U_c[rows]], and Δ*[rows] = Y[rows]·B·M.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from .matrix_rule import (BLOCK, EIGH_FLOATS, GRAM_COND, MatrixRule, SlotBuffers, _lapack_svd, _right_of_r,
                          lapack_floats, one_buffer_floats, reorthonormalize_, side_gram, thin_svd,
                          thin_svd_floats)
from .cts_tall import CtsSystem, IsoCtsGrams
from .spectral_tall import ChunkSum
from .tall import TallRowChunks


@dataclasses.dataclass(frozen=True)
class IsoCtsParams:
    common_fraction: float = 0.8
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.common_fraction <= 1.0:
            raise ConfigError(f"iso_cts: common_fraction={self.common_fraction} must be in [0, 1]",
                              hint="the share of min(m, n) kept for the common subspace, e.g. -p common_fraction=0.8")
        if not math.isfinite(self.scale):
            raise ConfigError(f"iso_cts: scale={self.scale} must be a finite number", hint="e.g. -p scale=1.0")


def subspace_sizes(r: int, n_experts: int, common_fraction: float) -> tuple[int, int]:
    """(k_c, p): common triplets and triplets per task, k_c + T·p = r (§6 step 1)."""
    k0 = math.floor(r * common_fraction)
    p = min(round((r - k0) / n_experts), r // n_experts)
    return r - n_experts * p, p


def left_svd(x: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For m ≤ n: every left singular vector of x (U, m×m, orthonormal), with the ``top`` leading σ and rows of Vh.

    thin_svd's Gram route on the left Gram x·xᵀ, under its condition (σ_top ≥ σ_max / GRAM_COND, so the top triplets
    are as accurate as there); the trailing eigenvectors are orthonormal to fp64 rounding whatever their σ, which is
    all the complement needs. Otherwise LAPACK: on x when square, else on the m×m R factor of xᵀ (U is its right
    factor; Vh = Σ⁻¹ Uᵀ x), as ``thin_svd``'s route 2."""
    if top == 0:   # no common space: Q = I, and nothing to decompose
        return torch.eye(x.shape[0], dtype=x.dtype, device=x.device), x.new_zeros(0), x.new_zeros(0, x.shape[1])
    gram = side_gram(x, wide=True)               # fp64, x upcast BLOCK columns at a time
    evals, vecs = torch.linalg.eigh(gram)        # ascending
    del gram
    evals, vecs = evals.flip(0), vecs.flip(1)
    s = evals[:top].clamp(min=0).sqrt()
    if float(s[-1]) > float(s[0]) / GRAM_COND:
        vh = x.new_empty(top, x.shape[1])
        head = vecs[:, :top].T
        for c in range(0, x.shape[1], BLOCK):
            vh[:, c:c + BLOCK] = (head @ x[:, c:c + BLOCK].double()).div_(s[:, None])
        return vecs.to(x.dtype), s.to(x.dtype), vh
    del vecs
    if x.shape[0] == x.shape[1]:
        u, s, vh = _lapack_svd(x)
        return u, s[:top], vh[:top]
    v, s = _right_of_r(x)      # every left vector from the SVD of the R factor of xᵀ (matrix_rule._reduced_svd)
    inv = torch.where(s[:top] > 0, 1 / s[:top].double().clamp(min=1e-300), torch.zeros((), dtype=torch.float64))
    vh = x.new_empty(top, x.shape[1])
    head = v[:, :top].T
    for c in range(0, x.shape[1], BLOCK):
        vh[:, c:c + BLOCK] = (head @ x[:, c:c + BLOCK].double()).mul_(inv[:, None])
    reorthonormalize_(vh, wide=True)
    return v.to(x.dtype), s[:top], vh


class IsoCts(TallRowChunks, MatrixRule):
    name = "iso_cts"
    summary = "LIN: Iso-CTS, common top singular space of the sum plus each expert's residual top space, flattened"
    passes = 2
    Params = IsoCtsParams
    param_help = {"common_fraction": "f, share of min(m, n) reserved for the common subspace of Σ Δt",
                  "scale": "α, multiplies the merged task vector of every tensor (authors tune it in 0.1..3.0)"}

    prepass = IsoCtsGrams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tall: CtsSystem | None = self.state if self._mean is None else None   # a chunk of a tall tensor
        self._chunk = ChunkSum()
        self._common_rows: torch.Tensor | None = None    # U_c[rows] (tall path, pass 1)
        self._ubar_rows: torch.Tensor | None = None      # Y[rows] (tall path, pass 1; fp64)
        r = min(self.info.shape[-2:]) if self._mean is None else 0
        self._kc, self._p = subspace_sizes(r, self.n_experts, self.params.common_fraction)
        self._sum: torch.Tensor | None = None      # S = Σ Δt, (B, m, n) fp32, pass 0 only
        self._common: torch.Tensor | None = None   # U_c (B, m, k_c), or where m ≤ n its complement Q (B, m, m − k_c)
        self._left = self.info.shape[-2] <= self.info.shape[-1] if self._mean is None else False  # Q, not U_c
        self._slots: SlotBuffers | None = None
        self._stats = {"k_common": float(self._kc), "k_task": float(self._p)} if self._mean is None else {}

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        if self._tall is not None:
            return self._add_rows(t, d[0], pass_)
        if pass_ == 0:
            if self._sum is None:
                self._sum = d.clone(memory_format=torch.contiguous_format)
            else:
                self._sum.add_(d)
            return
        if self._slots is None:
            self._split_common()
        if self._p == 0:
            return
        p = self._p
        for e, x in enumerate(d):  # x: (m, n)
            basis = self._common[e]
            if self._left:    # R_t = Q (Qᵀ Δt): the SVD of the small factor, its left vectors taken back by Q
                u, s, vh = thin_svd(basis.T @ x, top=p)
                u = basis @ u[:, :p]
            else:
                u, s, vh = thin_svd(x - basis @ (basis.T @ x), top=p)
            self._slots.put(e, t * p, u[:, :p], s[:p], vh[:p])

    def _add_rows(self, t: int, x: torch.Tensor, pass_: int) -> None:
        """Tall path: pass 0 sums S[rows]; pass 1 fills Y[rows] (cts_tall.CtsSystem) from U_c[rows] and Δt."""
        if pass_ == 0:
            self._chunk.add(t, x)
            return
        system = self._tall
        if self._common_rows is None:
            self._common_rows = system.common_rows(self._chunk.take())
            self._ubar_rows = system.common_block(self._common_rows, self.n_experts)
        system.put_task(self._ubar_rows, t, x, self.info.row_start)

    def _split_common(self) -> None:
        """SVD of each S: the common triplets go to the last k_c slots; U_c, or its complement Q where m ≤ n, is kept
        for the projections. The slots are made after the first SVD, S is dropped after the last."""
        total, self._sum = self._sum, None
        batch, m, _ = total.shape
        kc = self._kc
        start = self.n_experts * self._p
        for e in range(batch):
            x = total[e]
            if self._left:
                u, s, vh = left_svd(x, kc)
            else:
                u, s, vh = thin_svd(x, top=kc)
            if self._slots is None:
                self._slots = SlotBuffers(total)
                self._common = total.new_empty(batch, m, m - kc if self._left else kc)
            self._common[e] = u[:, kc:] if self._left else u[:, :kc]
            self._slots.put(e, start, u[:, :kc], s[:kc], vh[:kc])
            del u, s, vh, x

    def _finalize_matrices(self) -> torch.Tensor:
        if self._tall is not None:
            self._stats.update(self._tall.map.stats)
            rows, self._ubar_rows, self._common_rows = self._ubar_rows, None, None
            return self._tall.map.apply(rows).unsqueeze(0)
        slots, self._slots, self._common = self._slots, None, None
        batch, m, _ = slots.u.shape
        merged = slots.u.new_empty(batch, m, slots.vh.shape[-1])
        for e in range(batch):
            slots.merge_into(e, slots.s[e].mean() * self.params.scale, merged[e])
        return merged

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        """Peak over S's SVD (with the slots made before S is dropped), each expert's projected SVD (beside Δ), and
        the two in-place polar factors (beside the result): ``one_buffer_floats``."""
        r = min(m, n)
        kc, p = subspace_sizes(r, n_experts, params.common_fraction)
        slots = batch * (m * r + r + r * n + (m * (m - kc) if m <= n else m * kc))     # Ū, s̄, V̄, Q or U_c
        if m <= n:   # left_svd: the Gram and its eigh, or LAPACK; then U (fp64, and its fp32 copy) and Vh's top k_c
            split = max((2 + EIGH_FLOATS) * m * m, lapack_floats(m, n))
            outputs = 3 * m * m + kc * n
            project = (m - kc) * n + thin_svd_floats(m - kc, n, p) + m * p
        else:
            split = thin_svd_floats(m, n, kc)
            outputs = (m + n + 1) * kc
            project = 2 * m * n + kc * n + thin_svd_floats(m, n, p)
        pass0 = batch * m * n + max(split, outputs + slots)    # S, its SVD; then its factors and the slots
        return one_buffer_floats(max(pass0, slots + project, slots + SlotBuffers.merge_floats(m, n)), batch * m * n)
