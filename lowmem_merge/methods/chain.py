"""Chain of Merges (ALGORITHMS.md §8.3): RegMean's solve, layer by layer on the merged model's own activations.

LIN inside a block:  Δ* = (Σ_i ω_i Δi G_i)(Σ_i ω_i G_i + λ·(tr A / n)·I)⁻¹, where G_i is the Gram of the layer's
inputs when task i's examples run through the already merged layers before it (``lowmem_merge.calib`` walks the
model in forward order and feeds each merged layer back), normalized (``normalize``: feature = a cosine matrix with
unit diagonal, token = each token vector unit length, none = the token mean), and ω_i = Σ_{p<q} |G_i,pq| its
off-diagonal mass (``importance``; uniform when every ω_i is 0). Delta form (DESIGN.md §6).
Other tensors: mean of Δt ("for all non-linear layers, we employ simple averaging").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from .regmean import GramRule, check_ridge
from .calibrated import GramState


@dataclasses.dataclass(frozen=True)
class ChainParams:
    ridge: float = 1e-6
    normalize: Literal["feature", "token", "none"] = "feature"
    importance: bool = True

    def __post_init__(self) -> None:
        check_ridge("chain", self.ridge)


class Chain(GramRule):
    name = "chain"
    summary = ("LIN, in forward order: (Σ ω_i Δi G_i)(Σ ω_i G_i + ridge)^-1, G_i = normalized input Gram of task i "
               "through the merged layers before it (--calib); other tensors: mean")
    Params = ChainParams
    calibration = "merged"
    param_help = {"ridge": "λ, relative ridge: adds λ·(tr A / n)·I",
                  "normalize": "activation normalization: feature (cosine Gram) | token (unit tokens) | none",
                  "importance": "weight each task by its Gram's off-diagonal mass ω_i (false: all 1)"}

    def _relative_ridge(self) -> float:
        return self.params.ridge

    @classmethod
    def calib_rows(cls, params: Any, x: torch.Tensor) -> torch.Tensor:
        if params.normalize != "token":
            return x
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x / torch.where(norms > 0, norms, torch.ones_like(norms))

    @classmethod
    def calib_state(cls, params: Any, raw: list[tuple[torch.Tensor, int]]) -> GramState:
        grams = []
        for total, rows in raw:
            if params.normalize == "feature":
                d = total.diagonal().sqrt()
                inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
                grams.append(total * inv[:, None] * inv[None, :])
            elif params.normalize == "token":
                grams.append(total)
            else:
                grams.append(total / rows)
        weights = [float(g.abs().sum() - g.diagonal().abs().sum()) / 2 if params.importance else 1.0
                   for g in grams]
        if not any(weights):
            weights = [1.0] * len(grams)
        return GramState(grams, weights)
