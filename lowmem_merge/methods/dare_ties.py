"""DARE-TIES (mergekit's ``dare_ties``; Yu et al. 2024 with Yadav et al. 2023's sign election), ALGORITHMS.md §7.

1. Drop: expert t keeps each entry of Δt with probability K_t and rescales the kept ones by 1/K_t (DARE; the same
   deterministic masks as ``dare``: they depend on (seed, expert, tensor name, row offset) only).
2. Elect: γ = sign(Σ_t w_t·Δ̃t), + where the sum is exactly 0 (mergekit's ``sum`` consensus).
3. Mix: Σ w_t·Δ̃t over the entries whose sign is γ (zeros never count), divided by the agreeing Σ w_t when
   ``normalize`` (mergekit's default for dare_ties is false); Δ* = λ · that.
It is TIES' accumulation (P, Q, c⁺, c⁻) fed with DARE's dropped blocks instead of a magnitude trim, so every float
tensor class gets the rule, row by row.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..info import TensorInfo
from .base import check_densities, expert_density, expert_weight
from .dare import _BLOCK, DareParams, kept_blocks
from .mergekit import GTA, WEIGHT_DENSITY, Mergekit, one_or_each, per_model, task_arithmetic
from .ties import Ties


@dataclasses.dataclass(frozen=True)
class DareTiesParams:
    density: float = 0.5
    scale: float = 1.0
    seed: int = 0
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    normalize: bool = False

    def __post_init__(self) -> None:
        DareParams(density=self.density)  # the same range check and message as dare
        check_densities("dare_ties", self.densities)


class DareTies(Ties):
    name = "dare_ties"
    summary = "DARE's random drop and 1/density rescale, then TIES' sign election and agreeing sum (mergekit)"
    Params = DareTiesParams
    prepass = None
    param_help = {
        "density": "probability to keep an entry (= 1 - drop rate p)",
        "scale": "λ, multiplies the merged task vector",
        "seed": "random seed; masks depend on (seed, expert, tensor name, row offset) only",
        "weights": "w_t, one per expert (comma-separated), multiply the dropped task vectors; empty: all 1",
        "densities": "K_t, one per expert (comma-separated); empty: density for every expert",
        "normalize": "divide the agreeing entries' sum by their (weighted) count (mergekit's default: false)",
    }
    mergekit = Mergekit("dare_ties", GTA, WEIGHT_DENSITY)

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        return {**task_arithmetic("dare_ties", glob, models, elects=True),
                **one_or_each("density", per_model(models, "density")), "normalize": glob["normalize"]}

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        density = expert_density(self.params, t)
        w = expert_weight(self.params, t)
        for start, part, keep in kept_blocks(self.params.seed, t, self.info, delta, density):
            dropped = part if keep is None else part * keep  # one block (≤ 1M entries), never the whole tensor
            if keep is not None:
                dropped.div_(density)
            flat = dropped.reshape(-1)
            for offset in range(0, flat.numel(), _BLOCK):
                self._accumulate(flat[offset:offset + _BLOCK], start + offset, 0.0, w)

    def _plus_on_zero_sum(self) -> bool:
        return True

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @classmethod
    def prepass_for(cls, params: Any) -> None:
        return None

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """TIES' four fp32 buffers and mask slab, plus one DARE block: its draws, masks and the dropped fp32 copy."""
        block = min(info.numel, _BLOCK + math.prod(info.shape[1:]))
        return 16 * info.numel + 18 * block
