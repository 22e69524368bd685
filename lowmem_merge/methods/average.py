"""Weight averaging: W* = mean_t W_t = W0 + (1/T) Σ Δt (ALGORITHMS.md §7)."""
from __future__ import annotations

from typing import Any

import torch

from ..info import TensorInfo
from .base import MergeMethod


class Average(MergeMethod):
    name = "average"
    summary = "mean of the experts' weights (W0 + mean of task vectors), every tensor"

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self.total: torch.Tensor | None = None  # Σ Δt, fp32, shape of the tensor

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = delta.clone()
        else:
            self.total.add_(delta)

    def finalize(self) -> torch.Tensor:
        return self.total.div_(self.n_experts)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True
