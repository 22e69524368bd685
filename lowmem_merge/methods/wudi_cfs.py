"""WUDI-Merging, closed form (ALGORITHMS.md §4.2; reference `vit/pretrain_ft.py` of nathanielyvo/WUDI-Merging).

LIN, with w_t = 1/‖Δt‖F²:
    A = Σ_t w_t (ΔtᵀΔt + ω I)        (n×n)
    N = Σ_t w_t Δt (ΔtᵀΔt + ω I)     (m×n)
    Δ* = N A⁻¹
Other tensors: mean of Δt (fusion_bench's choice; the original code keeps W0 there, §10.7).

The reference takes ``torch.linalg.pinv(A)`` in fp32, which drops eigenvalues below max_eig·n·eps. For ω > 0 A is
positive definite, so in exact arithmetic that is its inverse, and we solve by Cholesky (fast) whenever the ridge
ω·Σw provably clears that cut-off. It often does not: the weights make each Gram's trace 1, so the ridge is
ω·Σ_t 1/‖Δt‖², tiny beside the largest eigenvalue for large deltas, and fp32 cannot resolve the directions it alone
holds up (inverting them exactly returned a single rank-deficient expert 120 % off instead of itself). There, and for
ω = 0, we take the eigh pseudo-inverse with pinv's cut-off: the reference's answer.
An expert whose Δt is exactly zero at a matrix has no weight (1/0): it is skipped there, which is the limit of letting
its Δt shrink to 0; if every expert is zero there, Δ* = 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..errors import ConfigError
from .covariance import CovarianceMethod


@dataclasses.dataclass(frozen=True)
class WudiCfsParams:
    omega: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.omega) and self.omega >= 0):
            raise ConfigError(f"wudi_cfs: omega={self.omega} must be a finite number >= 0",
                              hint="omega is the ridge on the normalized Grams, e.g. -p omega=1e-5")


class WudiCfs(CovarianceMethod):
    name = "wudi_cfs"
    summary = "LIN: WUDI closed form N A^-1 over Grams normalized by 1/‖Δt‖² plus ridge ω; other tensors: mean"
    Params = WudiCfsParams
    param_help = {"omega": "ω, ridge added to every normalized Gram ΔtᵀΔt/‖Δt‖² (0 = exact pseudo-inverse)"}
    LIKE_PINV = True

    def _weights(self, norms_sq: list[float]) -> list[float]:
        return [1.0 / x if x > 0 else 0.0 for x in norms_sq]

    def _eps(self) -> float:
        return self.params.omega  # the ridge ω Σ_t w_t accumulates in the shift

    @staticmethod
    def _exact(params: Any) -> bool:
        return params.omega == 0
