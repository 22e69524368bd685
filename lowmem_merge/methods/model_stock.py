"""Model Stock (Jang et al. 2024), as mergekit's ``model_stock``: W* = t·mean(W_t) + (1 − t)·W0 = W0 + t·mean(Δt), per
tensor, with t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean cosine between the N task vectors (t = 0 where the
denominator is within 1e-6 of 0).

The mean of the N(N−1)/2 pairwise cosines needs no pair at a time: with u_t = Δt / ‖Δt‖ (0 for a zero Δt),
Σ_{i<j} cos_ij = (‖Σ_t u_t‖² − #{t: Δt ≠ 0}) / 2. A per-tensor prepass finds ‖Δt‖ in one round and ‖Σ u_t‖² in a
second, one row chunk at a time (Σ_t u_t over a chunk is one chunk-sized buffer), so memory stays flat in N.
mergekit clamps each pairwise cosine to [−1, 1] and each norm product to ≥ 1e-6; here both matter only for task
vectors of norm below 1e-3 or rounding at |cos| = 1. ``filter_wise`` (a t per output row) is not supported yet.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, Prepass


@dataclasses.dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False

    def __post_init__(self) -> None:
        if self.filter_wise:
            raise ConfigError("model_stock: filter_wise=true (one t per output row) is not supported yet",
                              hint="use filter_wise=false, mergekit's default")


class StockPrepass(Prepass):
    """‖Δt‖ per expert (round 0), then ‖Σ_t Δt/‖Δt‖‖² (round 1), over one tensor's row chunks."""

    rounds = 2
    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self._sq = [0.0] * n_experts          # Σ Δt², fp64
        self._norm = [0.0] * n_experts
        self._chunk: torch.Tensor | None = None   # Σ_t u_t over the current chunk
        self._unit_sq = 0.0                   # ‖Σ u_t‖² over the chunks done

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if round_ == 0:
            self._sq[t] += float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
            return
        if self._chunk is None:
            self._chunk = torch.zeros_like(delta)
        if self._norm[t] > 0:
            self._chunk.add_(delta, alpha=1 / self._norm[t])
        if t == self.n_experts - 1:           # the chunk's last expert: fold it in
            self._unit_sq += float(torch.linalg.vector_norm(self._chunk, dtype=torch.float64)) ** 2
            self._chunk = None

    def end_round(self, round_: int) -> None:
        if round_ == 0:
            self._norm = [math.sqrt(s) for s in self._sq]

    def state(self) -> float:
        """t, the weight of the experts' mean against the base."""
        n = self.n_experts
        nonzero = sum(1 for x in self._norm if x > 0)
        cos = (self._unit_sq - nonzero) / (n * (n - 1))       # mean over the n(n−1)/2 pairs of 2·Σ_{i<j} / 2
        cos = min(1.0, max(-1.0, cos))
        denominator = 1 + (n - 1) * cos
        return 0.0 if abs(denominator) < 1e-6 else n * cos / denominator


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "the experts' mean pulled toward the base by the mean cosine between task vectors (mergekit)"
    Params = ModelStockParams
    prepass = StockPrepass
    param_help = {"filter_wise": "one t per output row (not supported yet); false: one t per tensor"}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self.total: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
        self.total.add_(delta)

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(self.state / self.n_experts)

    def stats(self) -> dict[str, float]:
        return {"model_stock_t": self.state}

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @classmethod
    def check_experts(cls, params: Any, n_experts: int) -> None:
        if n_experts < 2:
            raise ConfigError("model_stock needs at least two experts (the cosine between their task vectors)",
                              hint="give two or more experts")

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 8 * info.numel                 # the mean's buffer, and the prepass's chunk sum
