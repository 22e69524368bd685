"""mergekit's ``multislerp`` and ``nuslerp``: spherical interpolation of task vectors, each whole tensor at once.
The norms and angles are the whole tensor's: a per-tensor prepass gathers them over the tensor's row chunks first
(tensor_sums: the same numbers whole or chunked), then every chunk is merged on its own.

multislerp (barycentric interpolation on the hypersphere, any number of experts, weights w_t normalized to sum 1 by
default): mergekit projects the unit task vectors u_t = Δt/(‖Δt‖ + ε) onto the tangent space at their normalized
weighted mean m = Σ w_t u_t / ‖Σ w_t u_t‖, averages there and maps back. The weighted mean of those tangent vectors is
Σ w_t u_t − ⟨Σ w_t u_t, m⟩ m = 0, so the result is m · Σ w_t ‖Δt‖ (mergekit's exp map of a zero tangent, up to its
rounding): one pass, one accumulator. Where Σ w_t u_t vanishes, two experts fall back to Σ w_t Δt; more is an error,
except where every Δt is 0 (a tensor no adapter touches: the base; mergekit raises there too). One expert: its Δ,
as mergekit returns the tensor itself.

nuslerp (two experts, t = w_1 / (w_0 + w_1), 0.5 when the weights sum to ~0): SLERP of the two task vectors
themselves (not normalized): (sin((1−t)θ) Δ0 + sin(tθ) Δ1) / sin θ, θ the angle between them, over the whole tensor
(``flatten``, mergekit's default), each row, or each column (``row_wise``); linear where sin θ < 1e-8. Per row needs
no prepass; per column keeps whole tensors.

Both take ``origin``: "base" interpolates the task vectors (mergekit with base_model); "zero" interpolates the
models' weights W_t = W0 + Δt themselves (mergekit without base_model, where a recipe's first model is the
reference W0 and one of the experts, with Δ = 0). Either way the result is returned as W* − W0. The prepasses see
the same points as the merge (W0 + Δt under "zero"), one row chunk at a time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from ..errors import ConfigError, InputError
from ..info import TensorInfo
from .base import MergeMethod, Prepass
from .mergekit import Mergekit
from .tensor_sums import RowSums


@dataclasses.dataclass(frozen=True)
class MultiSlerpParams:
    weights: tuple[float, ...] = ()
    normalize_weights: bool = True
    eps: float = 1e-8
    origin: Literal["base", "zero"] = "base"

    def __post_init__(self) -> None:
        if self.normalize_weights and self.weights and abs(sum(self.weights)) == 0:
            raise ConfigError("multislerp: the weights sum to 0 and normalize_weights divides by their sum")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ConfigError(f"multislerp: eps={self.eps} must be a finite number >= 0")


def _unit_weights(params: Any, n_experts: int) -> list[float]:
    weights = list(params.weights) or [1.0] * n_experts
    total = sum(weights) if params.normalize_weights else 1.0
    return [x / total for x in weights]


class MultiSlerpPrepass(Prepass):
    """Round 0: ‖Δt‖ of each expert; round 1: ‖Σ w_t Δt/(‖Δt‖ + ε)‖, the sum built one row chunk at a time."""

    scope = "tensor"
    rounds = 2

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.w = _unit_weights(params, n_experts)
        self.sums = RowSums(*(f"d{t}" for t in range(n_experts)), "units")
        self.norms: list[float] = []
        self._units: torch.Tensor | None = None     # one chunk's Σ w_t Δt/(‖Δt‖ + ε)

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        delta = _point(self.params, self.base, delta)
        if round_ == 0:
            self.sums.add(f"d{t}", delta)
            return
        if t == 0:
            self._units = torch.zeros_like(delta)
        self._units.add_(delta, alpha=self.w[t] / (self.norms[t] + self.params.eps))
        if t == self.n_experts - 1:
            self.sums.add("units", self._units)
            self._units = None

    def counts(self, round_: int) -> list[torch.Tensor]:
        return []

    def end_round(self, round_: int) -> None:
        if round_ == 0:
            self.norms = [float(torch.tensor(math.sqrt(self.sums.total(f"d{t}")), dtype=torch.float32))
                          for t in range(self.n_experts)]

    def state(self) -> tuple[list[float], float]:
        """(‖Δt‖ per expert, ‖Σ w_t u_t‖), fp32 values."""
        return self.norms, float(torch.tensor(math.sqrt(self.sums.total("units")), dtype=torch.float32))


class MultiSlerp(MergeMethod):
    name = "multislerp"
    summary = "barycentric spherical interpolation of the task vectors of each whole tensor (mergekit's multislerp)"
    Params = MultiSlerpParams
    param_help = {"weights": "w_t, one per expert (comma-separated); empty: all 1",
                  "normalize_weights": "divide the weights by their sum (mergekit's default: true)",
                  "eps": "ε added to each norm (mergekit's 1e-8)",
                  "origin": "base: interpolate task vectors; zero: the weights themselves (mergekit, no base_model)"}
    needs_base = True                            # origin zero works on W0 + Δt
    mergekit = Mergekit("multislerp", {"normalize_weights": True, "eps": 1e-8}, {"weight": 1.0},
                        without_base="expert", without_base_params={"origin": "zero"})
    prepass = MultiSlerpPrepass

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.w = _unit_weights(params, n_experts)
        self.units: torch.Tensor | None = None    # Σ w_t Δt / (‖Δt‖ + ε)
        self.linear: torch.Tensor | None = None   # Σ w_t Δt: two experts' fallback, and one expert's Δ
        self.expert_norms, self.size = state      # the whole tensor's ‖Δt‖ and ‖Σ w_t u_t‖ (the prepass)
        self.norms = sum(w * n for w, n in zip(self.w, self.expert_norms))   # Σ w_t ‖Δt‖

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        delta = _point(self.params, self.base, delta)
        if self.units is None:
            self.units = self.zeros(delta.shape, delta.device)
            if self.n_experts <= 2:
                self.linear = self.zeros(delta.shape, delta.device)
        self.units.add_(delta, alpha=self.w[t] / (self.expert_norms[t] + self.params.eps))
        if self.linear is not None:
            self.linear.add_(delta, alpha=self.w[t] if self.n_experts == 2 else 1.0)

    def finalize(self) -> torch.Tensor:
        out = self._merged()
        return out.sub_(self.base.to(out.device, torch.float32)) if self.params.origin == "zero" else out

    def _merged(self) -> torch.Tensor:
        if self.n_experts == 1:
            self.release(self.units)
            return self.linear
        size = self.size
        if self.norms == 0:                   # every Δt is 0 (a tensor no adapter touches): the base. mergekit
            self.release(*(b for b in (self.linear,) if b is not None))   # raises there with three or more
            return self.units
        if size < self.params.eps:
            if self.linear is None:
                raise InputError("multislerp: the weighted sum of the unit task vectors is zero (antipodal experts "
                                 "whose weights balance out)", tensor=self.info.name, hint="use different weights")
            self.release(self.units)
            return self.linear
        if self.linear is not None:
            self.release(self.linear)
        return self.units.mul_(self.norms / size)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 4 * info.numel * (2 if n_experts <= 2 else 1)


@dataclasses.dataclass(frozen=True)
class NuSlerpParams:
    weights: tuple[float, ...] = ()
    flatten: bool = True
    row_wise: bool = False
    origin: Literal["base", "zero"] = "base"


class NuSlerpPrepass(Prepass):
    """Σ Δ0², Σ Δ1² and Σ Δ0·Δ1 of one tensor (flatten), one row chunk at a time (Δ0's chunk kept for the dot)."""

    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.sums = RowSums("00", "11", "01")
        self._first: torch.Tensor | None = None

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        delta = _point(self.params, self.base, delta)
        self.sums.add(f"{t}{t}", delta)
        if t == 0:
            self._first = delta.clone()
        else:
            self.sums.add("01", self._first, delta)
            self._first = None

    def counts(self, round_: int) -> list[torch.Tensor]:
        return []

    def state(self) -> tuple[float, float, float]:
        return self.sums.total("00"), self.sums.total("11"), self.sums.total("01")


class NuSlerp(MergeMethod):
    name = "nuslerp"
    summary = "SLERP between two experts' task vectors at t = w_1/(w_0 + w_1), per tensor, row or column (mergekit)"
    Params = NuSlerpParams
    fixed_experts = 2
    combines = "interpolates between two experts"
    param_help = {"weights": "w_0,w_1: t = w_1 / (w_0 + w_1); empty: 0.5",
                  "flatten": "one angle for the whole tensor (mergekit's default: true)",
                  "row_wise": "without flatten: one angle per column (true) or per row (false)",
                  "origin": "base: interpolate task vectors; zero: the weights themselves (mergekit, no base_model)"}
    needs_base = True                            # origin zero works on W0 + Δt
    mergekit = Mergekit("nuslerp", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": 1.0},
                        without_base="expert", without_base_params={"origin": "zero"})

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        return {"weights": tuple(m["weight"] for m in models), "flatten": glob["nuslerp_flatten"],
                "row_wise": glob["nuslerp_row_wise"]}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        w = params.weights or (1.0, 1.0)
        self.t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
        self.first: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if t == 0:
            self.first = self.zeros(delta.shape, delta.device).copy_(delta)
            if self.params.origin == "zero":
                self.first.add_(self.base.to(delta.device, torch.float32))
            return
        delta = _point(self.params, self.base, delta)
        if self.params.flatten:
            self.first = nuslerp_flat(self.t, self.first, delta, *self.state)
            return
        self.first = nuslerp(self.t, self.first, delta, 0 if self.params.row_wise else -1)

    def finalize(self) -> torch.Tensor:
        if self.params.origin == "zero":
            return self.first.sub_(self.base.to(self.first.device, torch.float32))
        return self.first

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        return NuSlerpPrepass if params.flatten else None

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        """One angle for the tensor (its prepass) or per row: yes; per column: the columns span every row."""
        return params.flatten or not params.row_wise

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 12 * info.numel


def _point(params: Any, base: Any, delta: torch.Tensor) -> torch.Tensor:
    """The point interpolated: Δt itself, or under origin "zero" W_t = W0 + Δt in a new fp32 tensor."""
    return delta if params.origin == "base" else base.to(delta.device, torch.float32) + delta


def nuslerp_flat(t: float, v0: torch.Tensor, v1: torch.Tensor, s00: float, s11: float, s01: float) -> torch.Tensor:
    """The kernel with one angle for the whole tensor, from its Σ v0², Σ v1², Σ v0·v1 (fp64, the prepass)."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))   # noqa: E731  rounding as the fp32 kernel does
    n0, n1 = max(f32(math.sqrt(s00)), 1e-7), max(f32(math.sqrt(s11)), 1e-7)
    theta = math.acos(max(-1.0, min(1.0, f32(s01 / (n0 * n1)))))
    sin = math.sin(theta)
    if abs(sin) < 1e-8:
        c0, c1 = 1 - t, t
    else:
        c0, c1 = math.sin((1 - t) * theta) / sin, math.sin(t * theta) / sin
    return v0.mul_(f32(c0)).add_(v1 * f32(c1))


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int | None) -> torch.Tensor:
    """mergekit's nuslerp kernel: over the whole tensor (dim None) or along ``dim``."""
    dims = tuple(range(v0.dim())) if dim is None or v0.dim() < 2 else (dim,)
    n0 = torch.linalg.vector_norm(v0, dim=dims, keepdim=True).clamp(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=dims, keepdim=True).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(dim=dims, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    linear = sin.abs() < 1e-8
    c0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(linear, t, torch.sin(t * theta) / sin)
    return v0.mul_(c0).add_(v1 * c1)
