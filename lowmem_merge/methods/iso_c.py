"""Iso-C, isotropic merging in the common subspace (ALGORITHMS.md §6; `iso-merging/src/utils/iso.py`).

LIN, per (m, n) matrix: S = Σ_t Δt = U diag(σ) Vᵀ (thin SVD), Δ* = α · mean(σ_1..σ_r) · U Vᵀ, r = min(m, n):
the task-arithmetic sum with its spectrum flattened, nuclear norm kept. Other tensors: α · mean of Δt.
Memory: S, overwritten by its polar factor (``polar_``: an fp64 Gram and one eigh, in place).
Tall matrices (m ≥ 3n: an LM head, gate/up_proj) are merged in row chunks from one prepass round gathering SᵀS
(spectral_tall.py): Δ*[rows] = S[rows]·α·mean(σ)·(SᵀS)^{-1/2}.
"""
from __future__ import annotations

from typing import Any

import torch

from .matrix_rule import MatrixRule, one_buffer_floats, polar_, polar_floats
from .spectral_tall import ChunkSum, IsoCGrams, RowMap
from .tall import TallRowChunks
from .tsv import ScaleParams


class IsoC(TallRowChunks, MatrixRule):
    name = "iso_c"
    summary = "LIN: Iso-C, the sum of task vectors with all its singular values set to their mean; other: α·mean"
    Params = ScaleParams
    param_help = {"scale": "α, multiplies the merged task vector of every tensor (authors tune it in 0.1..3.0)"}
    prepass = IsoCGrams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sum: torch.Tensor | None = None  # S = Σ Δt, (B, m, n) fp32
        self._tall: RowMap | None = self.state if self._mean is None else None   # a chunk of a tall tensor
        self._rows = ChunkSum()

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        if self._tall is not None:
            self._rows.add(t, d[0])
            return
        if self._sum is None:
            self._sum = d.clone(memory_format=torch.contiguous_format)
        else:
            self._sum.add_(d)

    def _finalize_matrices(self) -> torch.Tensor:
        if self._tall is not None:
            self._stats = dict(self._tall.stats)
            return self._tall.apply(self._rows.take()).unsqueeze(0)
        total = self._sum
        for x in total:  # x: (m, n), overwritten by its Δ*
            s = polar_(x)
            x.mul_(float(s.mean()) * self.params.scale)
        return total

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        # S (the result, overwritten by Δ*) and one polar factor's temporaries: ``one_buffer_floats``
        return one_buffer_floats(batch * m * n + polar_floats(m, n), batch * m * n)
