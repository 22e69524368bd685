"""SLERP between the base and one expert, as mergekit's ``slerp`` (0.1.5): spherical interpolation at ``t`` of each
whole tensor, flattened to one vector (mergekit's kernel works on rows of a batch whose rows are whole tensors),
W0 at t = 0, W1 at t = 1.

With a = W0, b = W1 (fp32), norms below 1e-8 counted as 1, d = clamp((a/‖a‖)·(b/‖b‖), −1, 1): linear interpolation
(1 − t)·a + t·b where |d| > 0.9995 (near-parallel or antipodal), else sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b
with θ = acos d. The angle is the whole tensor's: ``SlerpPrepass`` gathers ‖a‖², ‖b‖² and a·b over the tensor's
row chunks first (tensor_sums: the same numbers whole or chunked), then each chunk is merged on its own with the two
coefficients. It needs W0 itself (``needs_base``), not only Δ = W1 − W0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, Prepass
from .mergekit import REQUIRED, Mergekit
from .tensor_sums import RowSums

DOT_THRESHOLD = 0.9995
EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class SlerpParams:
    t: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.t <= 1:
            raise ConfigError(f"slerp: t={self.t} must be in [0, 1]", hint="t = 0 gives the base, 1 the expert")


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """slerp_rows' (coef_a, coef_b) from the tensor's Σa², Σb² and Σab (fp64), as fp32 numbers like the kernel's."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))   # noqa: E731  rounding as the fp32 kernel does
    norm_a, norm_b = f32(math.sqrt(aa)), f32(math.sqrt(bb))
    norm_a = norm_a if norm_a > EPS else 1.0
    norm_b = norm_b if norm_b > EPS else 1.0
    dot = max(-1.0, min(1.0, f32(ab / (norm_a * norm_b))))
    if abs(dot) > DOT_THRESHOLD:
        return f32(1 - t), f32(t)
    theta = math.acos(dot)
    return f32(math.sin((1 - t) * theta) / math.sin(theta)), f32(math.sin(t * theta) / math.sin(theta))


class SlerpPrepass(Prepass):
    """Σa², Σb² and Σab of one tensor (a = W0, b = W1), over its row chunks, before it is merged."""

    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.sums = RowSums("aa", "bb", "ab")

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        a = self.base.to(delta.device, torch.float32)
        b = delta.add(a)
        self.sums.add("aa", a)
        self.sums.add("bb", b)
        self.sums.add("ab", a, b)

    def counts(self, round_: int) -> list[torch.Tensor]:
        return []

    def state(self) -> tuple[float, float]:
        s = self.sums
        return slerp_coefficients(self.params.t, s.total("aa"), s.total("bb"), s.total("ab"))


class Slerp(MergeMethod):
    name = "slerp"
    summary = "spherical interpolation of each tensor between the base (t=0) and one expert (t=1) (mergekit)"
    Params = SlerpParams
    needs_base = True
    fixed_experts = 1
    combines = "interpolates between the base and one expert"
    param_help = {"t": "interpolation factor: 0 gives the base, 1 the expert"}
    mergekit = Mergekit("slerp", {"t": REQUIRED}, hints={"t": "0 gives base_model, 1 the other model"})
    prepass = SlerpPrepass

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.delta: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        coef_a, coef_b = self.state
        a = self.base.to(delta.device, torch.float32)
        b = delta.add(a).mul_(coef_b)
        self.delta = torch.mul(a, coef_a).add_(b).sub_(a)          # Δ* = slerp − W0, elementwise

    def finalize(self) -> torch.Tensor:
        return self.delta

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 12 * info.numel                # W0 in fp32, W1 scaled and the result (per piece)
