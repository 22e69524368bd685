"""WUDI-Merging, closed form (ALGORITHMS.md §4.2; reference `vit/pretrain_ft.py` of nathanielyvo/WUDI-Merging).

LIN, with w_t = 1/‖Δt‖F²:
    A = Σ_t w_t (ΔtᵀΔt + ω I)        (n×n)
    N = Σ_t w_t Δt (ΔtᵀΔt + ω I)     (m×n)
    Δ* = N A⁻¹
Other tensors: mean of Δt (fusion_bench's choice; the original code keeps W0 there, §10.7).

The reference takes ``torch.linalg.pinv(A)``, which drops eigenvalues below max_eig·n·eps. For ω > 0, A is positive
definite and, with A and N summed in fp64, its ridge ω·Σw clears that cut-off for any realistic ‖Δt‖, so pinv is the
inverse: an fp64 Cholesky solve (covariance.py, spd_solve.py). For ω = 0 the floored Cholesky and its iterated
Tikhonov steps converge to the pseudo-inverse. No eigh either way.
An expert whose Δt is exactly zero at a matrix has no weight (1/0): it is skipped there, which is the limit of letting
its Δt shrink to 0; if every expert is zero there, Δ* = 0.
"""
from __future__ import annotations

import dataclasses
import math
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

    def _weights(self, norms_sq: list[float]) -> list[float]:
        return [1.0 / x if x > 0 else 0.0 for x in norms_sq]

    def _eps(self) -> float:
        return self.params.omega  # the ridge ω Σ_t w_t accumulates in the shift
