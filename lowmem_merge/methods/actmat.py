"""ACTMat, delta form (ALGORITHMS.md §2): RegMean with the task vectors' own Grams ΔtᵀΔt as input covariances.

LIN:   A = Σ_t ΔtᵀΔt,  N = Σ_t Δt(ΔtᵀΔt),  Δ* = N (A + ρ·(tr A / n)·I)⁻¹.
Other: mean of Δt (the paper averages everything that is not a 2-D weight matrix).

The ridge is relative to A's mean eigenvalue because the exact pseudo-inverse wrecked a real merge (condition numbers
~5e13, §2); ρ = 0 keeps the exact pseudo-inverse for study. Delta space, so directions no expert touched keep W0.
Paper: ACTMat (ICML-26 workshop draft, no public code).
"""
from __future__ import annotations

import dataclasses
import math
from ..errors import ConfigError
from .covariance import CovarianceMethod


@dataclasses.dataclass(frozen=True)
class ActMatParams:
    rho: float = 1e-3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rho) and self.rho >= 0):
            raise ConfigError(f"actmat: rho={self.rho} must be a finite number >= 0",
                              hint="rho is the relative ridge, e.g. -p rho=1e-3 (0 = exact pseudo-inverse)")


class ActMat(CovarianceMethod):
    name = "actmat"
    summary = "LIN: N (A + ridge)^-1 with A = sum ΔᵀΔ, N = sum Δ(ΔᵀΔ) (task-vector RegMean); other tensors: mean"
    Params = ActMatParams
    param_help = {"rho": "ρ, relative ridge: adds ρ·(tr A / n)·I to A; 0 = exact pseudo-inverse (study only)"}

    def _ridges(self, traces: list[float]) -> list[float]:
        return [self.params.rho * trace / self.info.shape[-1] for trace in traces]
