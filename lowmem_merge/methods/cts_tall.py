"""Iso-CTS on a tall LIN tensor in row chunks (spectral_tall.py says how the three spectral rules do it; ALGORITHMS.md
§6 for the rule):
    round 0: G_S = SᵀS → top-k_c V_c, σ_c (U_c[rows] = S[rows] V_c / σ_c);
    round 1: P_t = U_cᵀΔt per expert (fp32, as the whole path projects);
    round 2: R_tᵀR_t from R_t[rows] = Δt[rows] − U_c[rows] P_t → top-p V_t, s_t (P_t dropped);
    round 3: YᵀY, Y[rows] = [Δt[rows] V_t ..., U_c[rows]], whence ŪᵀŪ = Bᵀ(YᵀY)B (Ū = Y·B);
    merge:   Δ*[rows] = Y[rows]·B·α·mean(s̄)·(ŪᵀŪ)^{-1/2}·polar(V̄).
Rounds 1-3 hold a chunk's T deltas until its S[rows] is known; the merge has its two passes for that.
"""
from __future__ import annotations

from typing import Any

import torch

from ..info import TensorInfo
from .gram import add_gram, mirror_lower
from .matrix_rule import BLOCK
from .spectral_tall import EIGH_F64, RowMap, SpectralPrepass, inverse_root, polar_rows, top_eigen, unit_rows


def cts_sizes(r: int, n_experts: int, fraction: float) -> tuple[int, int]:
    """(k_c, p) of iso_cts.subspace_sizes (imported late: iso_cts imports this module)."""
    from .iso_cts import subspace_sizes
    return subspace_sizes(r, n_experts, fraction)


class IsoCtsGrams(SpectralPrepass):
    """Round 0: G_S = SᵀS → V_c, σ_c; round 1: P_t = U_cᵀΔt per expert (fp32, as the whole path projects);
    round 2: R_tᵀR_t per expert from the chunks' R_t[rows] = Δt[rows] − U_c[rows] P_t (fp64), then P_t is dropped and
    each one's top p taken; round 3: YᵀY of Y = [Δt V_t ..., U_c] (m×r). State: CtsSystem.

    R_tᵀR_t is gathered from R_t's rows, not as G_t − P_tᵀP_t: that difference loses ~u32·(‖Δt‖/‖R_t‖)² of it to
    P_t's fp32 rounding (0.1 relative error on experts whose residual is 1e-3 of them); rounding P_t moves R_t only
    along U_c, which adds ‖E‖² ~ u32²·‖P_t‖² to the Gram."""

    rounds = 4

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.gram_s: torch.Tensor | None = None
        self.grams: list[torch.Tensor | None] = [None] * n_experts
        self.proj: list[torch.Tensor | None] = [None] * n_experts
        self.held: list[torch.Tensor] = []          # one chunk's Δt (fp32) until S[rows] is known
        self.system: CtsSystem | None = None
        self.gram_y: torch.Tensor | None = None

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int:
        """Round 0: G_S and its eigh; rounds 1-2: V_c (fp64), the T P_t (fp32 k_c×n) and the T residual Grams
        (fp64), then one eigh beside those Grams; round 3 to the merge: V_c, the V_t, YᵀY, B, ŪᵀŪ and its eigh,
        polar(V̄) (fp32), M. Per chunk: the T Δt held until S[rows] is known, S, U_c and Y rows (fp64), a residual
        and its blocks in fp64."""
        n, rows = whole.shape[-1], piece.shape[0]
        r = n
        kc, p = cts_sizes(r, n_experts, params.common_fraction)
        round0 = 8 * (1 + EIGH_F64) * n * n
        round2 = 8 * (n * kc + n_experts * n * n) + max(4 * n_experts * kc * n, 8 * EIGH_F64 * n * n)
        final = 8 * (n * kc + n * r + (4 + EIGH_F64) * r * r) + 4 * r * n
        chunk = 4 * (n_experts + 2) * rows * n + 4 * rows * kc + 8 * rows * (r + 2 * n) + 8 * BLOCK * (rows + n)
        return int(max(round0, round2, final)) + chunk

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if not self._count(round_, info, delta, t):
            return
        if round_ == 0:
            self.chunk.add(t, delta)
            if t == self.n_experts - 1:
                s = self.chunk.take().double()
                self.gram_s = add_gram(self.gram_s, s, mirror=False)
            return
        if self.system is None:
            return
        self.held.append(delta.clone())
        self.chunk.add(t, delta)
        if t < self.n_experts - 1:
            return
        held, self.held = self.held, []
        common = self.system.common_rows(self.chunk.take())        # U_c[rows] (rows, k_c) fp32
        if round_ == 1:
            for u, x in enumerate(held):
                self.proj[u] = common.T @ x if self.proj[u] is None else self.proj[u].addmm_(common.T, x)
        elif round_ == 2:
            for u, x in enumerate(held):
                res = residual_rows(x, common, self.proj[u])
                self.grams[u] = add_gram(self.grams[u], res, mirror=False)
        else:
            y = self.system.y_rows(held, common, info.row_start)
            self.gram_y = add_gram(self.gram_y, y, mirror=False)

    def end_round(self, round_: int) -> None:
        if round_ == 0 and self._tall() and self.gram_s is not None:
            gram_s, self.gram_s = mirror_lower(self.gram_s), None
            self.system = CtsSystem(gram_s, self.rows, self.n_experts, self.params, self)
        elif round_ == 2 and self.system is not None:
            self.proj = []
            self.system.task_spaces([None if g is None else mirror_lower(g) for g in self.grams], self)
            self.grams = []
        elif round_ == 3 and self.system is not None and self.gram_y is not None:
            gram, self.gram_y = mirror_lower(self.gram_y), None
            self.system.finish(gram, self.params.scale, self)

    def state(self) -> CtsSystem | None:
        return self.system if self.system is not None and self.system.map is not None else None


def residual_rows(x: torch.Tensor, common: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """R_t[rows] = Δt[rows] − U_c[rows]·P_t in fp64 (rows, n), P_t upcast BLOCK rows at a time."""
    res = x.double()
    for b in range(0, proj.shape[0], BLOCK):
        res.addmm_(common[:, b:b + BLOCK].double(), proj[b:b + BLOCK].double(), alpha=-1.0)
    return res


class CtsSystem:
    """V_c, σ_c of S's top k_c; each expert's residual V_t, s_t; then Δ*[rows] = Y[rows]·(B·M) where Y[rows] =
    [Δt[rows] V_t ..., U_c[rows]] and B turns Y into Ū: slot t = (Δt V_t − U_c·P_tV_t) / s_t, P_tV_t = U_cᵀΔtV_t
    being a block of YᵀY, so that ŪᵀŪ = Bᵀ(YᵀY)B needs no further read."""

    def __init__(self, gram_s: torch.Tensor, m: int, n_experts: int, params: Any, pre: SpectralPrepass) -> None:
        n = gram_s.shape[0]
        self.r = r = min(m, n)
        self.kc, self.p = cts_sizes(r, n_experts, params.common_fraction)
        vc, sc, proven = top_eigen(gram_s, self.kc)
        del gram_s
        pre._unproven(proven)
        self.vc, self.sc = vc, sc                                          # (n, k_c), (k_c) fp64
        self.inv_c = torch.where(sc > 0, 1 / sc.clamp(min=1e-300), 0 * sc)
        self.right: list[torch.Tensor] = []                               # V_t (n, p) fp64
        self.values: list[torch.Tensor] = []                              # s_t (p) fp64
        self.zero: list[bool] = []                                        # Δt = 0 (SlotRows' unit vectors)
        self.map: RowMap | None = None

    def common_rows(self, s: torch.Tensor) -> torch.Tensor:
        """U_c[rows] = S[rows] V_c / σ_c, fp32 as the whole path's basis."""
        return (s.double() @ self.vc).mul_(self.inv_c).float()

    def task_spaces(self, grams: list[torch.Tensor], pre: SpectralPrepass) -> None:
        """Each expert's top p from its residual Gram R_tᵀR_t (freed one by one)."""
        for t in range(len(grams)):
            g = grams[t]
            self.zero.append(not bool(g.any()))
            if not self.zero[-1]:
                v, s, proven = top_eigen(g, self.p)
                pre._unproven(proven)
            else:                          # Δt = 0: R_t = 0, LAPACK's unit vectors as the whole path (SlotRows)
                v, s = torch.eye(g.shape[0], self.p, dtype=g.dtype, device=g.device), g.new_zeros(self.p)
            grams[t] = g = None
            self.right.append(v)
            self.values.append(s)

    def y_rows(self, held: list[torch.Tensor], common: torch.Tensor, row_start: int) -> torch.Tensor:
        """Y[rows] (rows, r) fp64 of one chunk from its T Δt[rows] and U_c[rows]."""
        rows = self.common_block(common, len(held))
        for t, x in enumerate(held):
            self.put_task(rows, t, x, row_start)
        return rows

    def common_block(self, common: torch.Tensor, n_experts: int) -> torch.Tensor:
        """Y[rows] with U_c[rows] in its last k_c columns and the task blocks still 0."""
        rows = common.new_zeros(common.shape[0], self.r, dtype=torch.float64)
        start = n_experts * self.p
        rows[:, start:start + self.kc] = common
        return rows

    def put_task(self, rows: torch.Tensor, t: int, x: torch.Tensor, row_start: int) -> None:
        """Block t of Y[rows]: Δt[rows] V_t, or the unit rows of a zero Δt; ``row_start``: the chunk's first row."""
        p = self.p
        if p and self.zero[t]:
            unit_rows(rows[:, t * p:(t + 1) * p], row_start)
        elif p:
            torch.mm(x.double(), self.right[t], out=rows[:, t * p:(t + 1) * p])

    def _slots_of_y(self, gram_y: torch.Tensor) -> torch.Tensor:
        """B (r, r) fp64 with Ū = Y·B."""
        b = gram_y.new_zeros(self.r, self.r)
        p, start = self.p, len(self.right) * self.p
        common = slice(start, start + self.kc)
        b[common, common] = torch.eye(self.kc, dtype=b.dtype, device=b.device)
        for t, s in enumerate(self.values):
            block = slice(t * p, (t + 1) * p)
            if self.zero[t]:
                b[block, block] = torch.eye(p, dtype=b.dtype, device=b.device)
                continue
            inv = torch.where(s > 0, 1 / s.clamp(min=1e-300), 0 * s)
            b[block, block] = torch.diag(inv)
            b[common, block] = -gram_y[common, block] * inv               # −P_tV_t / s_t, P_tV_t = U_cᵀ(Δt V_t)
        return b

    def finish(self, gram_y: torch.Tensor, scale: float, pre: SpectralPrepass) -> None:
        """M = α·mean(s̄)·(ŪᵀŪ)^{-1/2}·polar(V̄), V̄ = [V_tᵀ..., V_cᵀ] (fp32 slots, as the whole path's); the
        state's map is B·M, applied to Y's rows."""
        n = self.vc.shape[0]
        b = self._slots_of_y(gram_y)
        gram_u = b.T @ gram_y @ b
        del gram_y
        root, _, proven_u = inverse_root(gram_u)
        del gram_u
        vbar = self.vc.new_zeros(self.r, n, dtype=torch.float32)
        p, T = self.p, len(self.right)
        for t, v in enumerate(self.right):
            vbar[t * p:(t + 1) * p] = v.T.float()
        vbar[T * p:T * p + self.kc] = self.vc.T.float()
        pvbar, proven_v = polar_rows(vbar)
        pre._unproven(proven_v)
        pre._unproven(proven_u)
        sbar = torch.cat([v.float() for v in self.values] + [self.sc.float()])
        left = b @ root.mul_(float(sbar.mean()) * scale)
        del b, root
        self.map = RowMap(left @ pvbar.double(), pre.stats)
