"""SLERP between the base and one expert, as mergekit's ``slerp`` (0.1.5): spherical interpolation at ``t`` of each
whole tensor, flattened to one vector (mergekit's kernel works on rows of a batch whose rows are whole tensors),
W0 at t = 0, W1 at t = 1.

With a = W0, b = W1 (fp32), norms below 1e-8 counted as 1, d = clamp((a/‖a‖)·(b/‖b‖), −1, 1): linear interpolation
(1 − t)·a + t·b where |d| > 0.9995 (near-parallel or antipodal), else sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b
with θ = acos d. The angle is the whole tensor's, so the method takes whole tensors (no row chunks: its peak is
about 16 bytes per element of the largest tensor), and it needs W0 itself (``needs_base``), not only Δ = W1 − W0.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod
from .mergekit import REQUIRED, Mergekit

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SlerpParams:
    t: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.t <= 1:
            raise ConfigError(f"slerp: t={self.t} must be in [0, 1]", hint="t = 0 gives the base, 1 the expert")


def slerp_rows(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp of the rows of a and b (2-D, fp32)."""
    if a.shape[1] == 0:
        return (1 - t) * a + t * b
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > EPS, norm_a, 1)
    norm_b = torch.where(norm_b > EPS, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return coef_a * a + coef_b * b


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation of each tensor between the base (t=0) and one expert (t=1) (mergekit)"
    Params = SlerpParams
    needs_base = True
    fixed_experts = 1
    combines = "interpolates between the base and one expert"
    param_help = {"t": "interpolation factor: 0 gives the base, 1 the expert"}
    mergekit = Mergekit("slerp", {"t": REQUIRED}, hints={"t": "0 gives base_model, 1 the other model"})

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self.delta: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        a = self.base.to(delta.device, torch.float32).reshape(1, -1)
        b = a + delta.reshape(1, -1)
        self.delta = slerp_rows(self.params.t, a, b).sub_(a).reshape(delta.shape)   # Δ* = slerp − W0

    def finalize(self) -> torch.Tensor:
        return self.delta

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 16 * info.numel                # W0 and W1 in fp32, the result and its temporaries: whole tensors
