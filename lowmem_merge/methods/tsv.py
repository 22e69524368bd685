"""TSV-M, Task Singular Vectors: Merge (ALGORITHMS.md §5; `compute_and_sum_svd_mem_reduction` of the TSV authors).

LIN, per (m, n) matrix, r = min(m, n), k = ⌊r/T⌋:
    each expert's top-k SVD triplets fill slots [t·k, (t+1)·k) of Ū (m×r), s̄ (r), V̄ (r×n);
    Δ* = α · polar(Ū) · diag(s̄) · polar(V̄).
Other tensors: α · mean of Δt (the scalar multiplies the whole merged vector).
T > r gives k = 0 and Δ* = 0 (stats: k = 0, and a warning in the log).
Streaming: one thin SVD per expert, two polar factors at finalize, in place (fp64 Gram + eigh where proven, else
SVD); memory m·r + r + r·n plus one SVD's workspace, whatever T.
Tall matrices (m ≥ 3n: an LM head, gate/up_proj) are merged in row chunks from two prepass rounds (each expert's
Gram, then ŪᵀŪ; spectral_tall.py): Δ*[rows] = Ū[rows]·α·(ŪᵀŪ)^{-1/2}·diag(s̄)·polar(V̄).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch

from ..errors import ConfigError
from .matrix_rule import MatrixRule, SlotBuffers, one_buffer_floats, thin_svd, thin_svd_floats
from .spectral_tall import SlotRows, TsvGrams, TsvSystem
from .tall import TallRowChunks

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScaleParams:
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale):
            raise ConfigError(f"scale={self.scale} must be a finite number", hint="e.g. -p scale=1.0")


class Tsv(TallRowChunks, MatrixRule):
    name = "tsv"
    summary = "LIN: TSV-M, each expert's top-r/T singular triplets, orthogonalized (polar); other tensors: α·mean"
    Params = ScaleParams
    param_help = {"scale": "α, multiplies the merged task vector of every tensor (authors tune it in 0.1..3.0)"}
    prepass = TsvGrams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tall: TsvSystem | None = self.state if self._mean is None else None   # a chunk of a tall tensor
        self._k = min(self.info.shape[-2:]) // self.n_experts if self._mean is None else 0
        if self._tall is not None:
            self._k = self._tall.k
            self._rows = SlotRows(self._tall.right, self._tall.values, self._tall.r, self.info.row_start)
        self._slots: SlotBuffers | None = None
        self._stats = {"k": float(self._k)} if self._mean is None else {}

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        if self._tall is not None:
            self._rows.add(t, d[0], t * self._k)
            return
        if self._k == 0:
            return
        if self._slots is None:
            self._slots = SlotBuffers(d)
        k = self._k
        for e, x in enumerate(d):  # x: (m, n)
            u, s, vh = thin_svd(x, top=k)
            self._slots.put(e, t * k, u[:, :k], s[:k], vh[:k])

    def _finalize_matrices(self) -> torch.Tensor:
        batch, m, n = (math.prod(self.info.shape[:-2]),) + tuple(self.info.shape[-2:])
        if self._tall is not None:
            self._stats.update(self._tall.map.stats)
            return self._tall.map.apply(self._rows.take()).unsqueeze(0)
        if self._k == 0:
            log.warning("%s: %d experts exceed min(m, n) = %d, so TSV-M keeps no triplet: Δ* = 0",
                        self.info.name, self.n_experts, min(m, n))
            return torch.zeros(batch, m, n, device=self._device)
        slots, self._slots = self._slots, None
        merged = slots.u.new_empty(batch, m, n)
        for e in range(batch):
            slots.merge_into(e, slots.s[e], merged[e])
        return merged.mul_(self.params.scale) if self.params.scale != 1.0 else merged

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        """The slots, plus the larger of one expert's thin SVD (beside Δ) and the two in-place polar factors (beside
        the result): ``one_buffer_floats``."""
        r = min(m, n)
        slots = batch * (m * r + r + r * n)
        held = slots + max(thin_svd_floats(m, n, r // n_experts), SlotBuffers.merge_floats(m, n))
        return one_buffer_floats(held, batch * m * n)
