"""Model Breadcrumbs (Davari & Belilovsky 2023), as mergekit's ``breadcrumbs`` and ``breadcrumbs_ties``.

Per tensor and expert, drop the ⌊γ·numel⌋ largest |Δt| (outliers) and as many of the smallest as it takes to keep
k = ⌊K·numel⌋ entries in between (fewer outliers are dropped when γ + K > 1); K = 1 keeps everything. Then
``breadcrumbs`` sums λ·Σ w_t Δ't (÷ Σ w_t with normalize), and ``breadcrumbs_ties`` elects a sign per entry from
Σ w_t Δ't and sums the agreeing entries (÷ their weights with normalize), as ``ties`` does.

The band is found exactly, like ties' trim=tensor: a per-tensor prepass (two histogram rounds over the tensor's row
chunks) pins both edges, the (n_bot + 1)-th and (n_bot + k)-th smallest |Δt|, and entries with lo ≤ |Δt| ≤ hi are
kept: where |Δt| ties an edge all the tied entries stay, where mergekit's sort keeps an arbitrary subset.
``rescale`` (mergekit's, false by default): each kept band times ‖Δt‖₁ / ‖band‖₁ over the tensor (not where either
is below 1e-7), from a third prepass round.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, Prepass, check_densities, expert_density, expert_weight, per_expert, sum_factor
from .mergekit import GTA, WEIGHT_DENSITY, Mergekit, one_or_each, per_model, task_arithmetic
from .ties import _SLAB, Ties, TiesPrepass


@dataclasses.dataclass(frozen=True)
class BreadcrumbsParams:
    density: float = 0.9
    gamma: float = 0.01
    scale: float = 1.0
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    normalize: bool = False
    gammas: tuple[float, ...] = ()
    rescale: bool = False

    def __post_init__(self) -> None:
        check_densities("breadcrumbs", self.densities + (self.density,))
        for gamma in self.gammas + (self.gamma,):
            if not 0 <= gamma < 1:
                raise ConfigError(f"breadcrumbs: gamma={gamma} must be in [0, 1)",
                                  hint="gamma is the fraction of largest entries dropped, e.g. -p gamma=0.01")


class BandPrepass(TiesPrepass):
    """Both edges of each expert's kept band of |Δt|, for one tensor."""

    scope = "tensor"

    def threshold_ranks(self, d: int, t: int) -> list[int]:
        density = expert_density(self.params, t)
        if density >= 1 or d == 0:
            return [0, d + 1]                          # [0, ∞]: everything
        keep, top = int(density * d), int(per_expert(self.params, "gamma", t) * d)
        bottom = max(0, d - keep - top)
        return [bottom + 1, bottom + keep] if keep else [d + 1, d + 1]

    def state(self) -> list[tuple[float, float, float]]:
        """(lo, hi, factor) per expert: entries with lo ≤ |Δt| ≤ hi are kept, times factor."""
        return [(k[0], k[1], 1.0) for k in self._kappa]


class RescaledBandPrepass(BandPrepass):
    """The band's edges, then a third round: ‖Δt‖₁ and ‖band‖₁ per expert for mergekit's L1 rescale."""

    rounds = 3

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self._before = [0.0] * n_experts
        self._after = [0.0] * n_experts

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if round_ < 2:
            return super().observe(round_, info, t, delta)
        lo, hi = self._kappa[t][0], self._kappa[t][1]
        for part in delta.reshape(-1).split(_SLAB):
            self._before[t] += float(part.abs().sum(dtype=torch.float64))
            self._after[t] += float(in_band(part, lo, hi).abs().sum(dtype=torch.float64))

    def end_round(self, round_: int) -> None:
        if round_ < 2:
            super().end_round(round_)

    def state(self) -> list[tuple[float, float, float]]:
        return [(lo, hi, b / a if b >= 1e-7 and a >= 1e-7 else 1.0)
                for (lo, hi, _), b, a in zip(super().state(), self._before, self._after)]


def band_prepass(params: Any) -> type[Prepass]:
    return RescaledBandPrepass if params.rescale else BandPrepass


def in_band(d: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``d`` where lo ≤ |d| ≤ hi, else 0 (a new tensor the size of ``d``: callers pass slabs)."""
    a = d.abs()
    return torch.where((a >= lo) & (a <= hi), d, 0.0)


class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    summary = "drop each task vector's largest outliers and smallest entries, sum the rest (mergekit's breadcrumbs)"
    Params = BreadcrumbsParams
    prepass = BandPrepass
    param_help = {
        "density": "K, fraction of each task vector kept (between the outliers and the smallest)",
        "gamma": "γ, fraction of the largest entries dropped as outliers",
        "scale": "λ, multiplies the merged task vector",
        "weights": "w_t, one per expert (comma-separated), multiply the kept task vectors; empty: all 1",
        "densities": "K_t, one per expert (comma-separated); empty: density for every expert",
        "normalize": "divide the sum by Σ w_t (mergekit's default for breadcrumbs: false)",
        "gammas": "γ_t, one per expert (comma-separated); empty: gamma for every expert",
        "rescale": "multiply each kept band by ‖Δt‖₁ / ‖band‖₁ over the tensor (mergekit's default: false)",
    }
    mergekit = Mergekit("breadcrumbs", {**GTA, "rescale": False}, {**WEIGHT_DENSITY, "gamma": 0.01})

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        """γ (mergekit: per model, 0.01 by default), one for all or one per model."""
        elects = cls.mergekit_schema().name == "breadcrumbs_ties"
        return {**task_arithmetic(cls.mergekit_schema().name, glob, models, elects=elects),
                **one_or_each("density", per_model(models, "density")),
                **one_or_each("gamma", per_model(models, "gamma")), "rescale": glob["rescale"],
                **({"normalize": glob["normalize"]} if elects else {})}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
        lo, hi, factor = self.state[t]
        w = expert_weight(self.params, t) * factor
        acc = self.total.view(-1)
        for start, part in zip(range(0, delta.numel(), _SLAB), delta.reshape(-1).split(_SLAB)):
            acc[start:start + part.numel()].add_(in_band(part, lo, hi), alpha=w)

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(sum_factor(self.params, self.n_experts))

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        return band_prepass(params)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 4 * info.numel + 16 * min(info.numel, _SLAB)


class BreadcrumbsTies(Ties):
    name = "breadcrumbs_ties"
    summary = "breadcrumbs' band of each task vector, then TIES' sign election and agreeing sum (mergekit)"
    Params = BreadcrumbsParams
    prepass = BandPrepass
    param_help = {**Breadcrumbs.param_help,
                  "normalize": "divide the agreeing entries' sum by their weights (mergekit's default: false)"}
    mergekit = Mergekit("breadcrumbs_ties", {**GTA, "rescale": False}, {**WEIGHT_DENSITY, "gamma": 0.01})
    from_mergekit = Breadcrumbs.__dict__["from_mergekit"]

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        lo, hi, factor = self.state[t]
        w = expert_weight(self.params, t)
        for start, part in zip(range(0, delta.numel(), _SLAB), delta.reshape(-1).split(_SLAB)):
            kept = in_band(part, lo, hi)
            self._accumulate(kept.mul_(factor) if factor != 1.0 else kept, start, 0.0, w)   # kept zeros: no side

    def _plus_on_zero_sum(self) -> bool:
        return True

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        return band_prepass(params)

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 16 * info.numel + 16 * min(info.numel, _SLAB)

