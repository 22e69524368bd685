"""Weight averaging: W* = W0 + Σ w_t Δt / Σ w_t, w_t = 1 by default: the mean of the experts (ALGORITHMS.md §7).

With weights this is mergekit's ``linear`` (normalize: true) on task vectors: Σ w_t W_t / Σ w_t.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, expert_weight
from .mergekit import Mergekit, per_model


@dataclasses.dataclass(frozen=True)
class AverageParams:
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.weights and sum(self.weights) == 0:
            raise ConfigError(f"average: weights {','.join(map(str, self.weights))} sum to 0",
                              hint="the merge divides by the sum of the weights, e.g. -p weights=1,0.5,1")


class Average(MergeMethod):
    name = "average"
    summary = "weighted mean of the experts' weights (W0 + Σ w_t Δt / Σ w_t), every tensor"
    Params = AverageParams
    param_help = {"weights": "w_t, one per expert (comma-separated); empty: all 1"}
    mergekit = Mergekit("linear", {"normalize": True}, {"weight": 1.0}, base_is_expert=True, without_base="expert")

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        """Σ w_t W_t / Σ w_t is W0 + Σ w_t Δt / Σ w_t; without normalize only weights summing to 1 are that."""
        weights = per_model(models, "weight")
        if not glob["normalize"] and abs(sum(weights) - 1) > 1e-6:
            raise ConfigError(f"merge_method 'linear' with normalize: false and weights summing to "
                              f"{sum(weights):g} scales the base weights themselves (Σ w_t W_t), which a task-vector "
                              "merge cannot express",
                              hint="use normalize: true, weights summing to 1, or task_arithmetic")
        return {"weights": weights}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None  # Σ w_t Δt, fp32, shape of the tensor

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        w = expert_weight(self.params, t)
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
        self.total.add_(delta, alpha=w)

    def finalize(self) -> torch.Tensor:
        weights = getattr(self.params, "weights", ())  # rules that average their other tensors have none
        return self.total.div_(sum(weights) if weights else self.n_experts)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True
