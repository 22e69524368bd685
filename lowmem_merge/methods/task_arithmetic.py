"""Task arithmetic: W* = W0 + λ Σ w_t Δt, λ = 0.4 by default (the TIES paper's no-validation value, ALGORITHMS.md §7);
w_t = 1 unless ``weights`` gives one per expert (mergekit's per-model ``weight``)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .average import Average
from .mergekit import GTA, Mergekit, task_arithmetic


@dataclasses.dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = 0.4
    weights: tuple[float, ...] = ()


class TaskArithmetic(Average):
    name = "task_arithmetic"
    summary = "W0 + scale * Σ w_t Δt (weights default to 1), every tensor"
    Params = TaskArithmeticParams
    param_help = {"scale": "λ, multiplies the weighted sum of task vectors",
                  "weights": "w_t, one per expert (comma-separated); empty: all 1"}
    mergekit = Mergekit("task_arithmetic", GTA, {"weight": 1.0})

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        return task_arithmetic("task_arithmetic", glob, models, elects=False)

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(self.params.scale)
