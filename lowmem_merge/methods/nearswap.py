"""NearSwap, as mergekit's ``nearswap``: the base and one expert, elementwise W0 + w·Δ with w = min(1, t/|Δ|).

Written in task-vector space that is a clamp: Δ* = clamp(Δ, −t, t). Entries the expert moved by at most ``t`` take
the expert's value, larger moves stop at distance ``t`` from the base (mergekit computes the weight t/|Δ|, with
|Δ| = 0 counted as 1: the same value). Elementwise, so it works in row chunks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod
from .mergekit import REQUIRED, Mergekit


@dataclasses.dataclass(frozen=True)
class NearSwapParams:
    t: float = 1e-4

    def __post_init__(self) -> None:
        if not self.t > 0:
            raise ConfigError(f"nearswap: t={self.t} must be > 0", hint="t is the largest move kept, e.g. 1e-4")


class NearSwap(MergeMethod):
    name = "nearswap"
    summary = "W0 + clamp(Δ, -t, t) of one expert: its small moves whole, larger ones cut to t (mergekit)"
    Params = NearSwapParams
    fixed_experts = 1
    combines = "moves the base toward one expert"
    param_help = {"t": "sameness threshold: moves up to t are kept, larger ones stop at distance t"}
    mergekit = Mergekit("nearswap", {"t": REQUIRED}, hints={"t": "the largest move kept"})

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.delta: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        self.delta = self.zeros(delta.shape, delta.device).copy_(delta).clamp_(-self.params.t, self.params.t)

    def finalize(self) -> torch.Tensor:
        return self.delta

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True
