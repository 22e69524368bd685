"""Task arithmetic: W* = W0 + λ Σ Δt, λ = 0.4 by default (the TIES paper's no-validation value, ALGORITHMS.md §7)."""
from __future__ import annotations

import dataclasses
import torch

from .average import Average


@dataclasses.dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = 0.4


class TaskArithmetic(Average):
    name = "task_arithmetic"
    summary = "W0 + scale * sum of task vectors, every tensor"
    Params = TaskArithmeticParams
    param_help = {"scale": "λ, multiplies the sum of task vectors"}

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(self.params.scale)
