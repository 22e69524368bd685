"""mergekit's ``karcher``: the weighted Karcher (Riemannian) mean on the unit sphere of the base's and the experts'
weights, each whole tensor, scaled by their mean norm.

mergekit puts the base first among the points when the recipe has a base_model, so the N = T + 1 points are
W0, W1, ..., WT with α = 1/N each. Units u_i = W_i/‖W_i‖ (points of norm ≤ tol left out, the others' α renormalized);
the mean starts at the normalized Σ α u_i (u of the first point if that is ≤ tol) and takes up to ``max_iter``
steps: tangent = Σ α (θ_i / sin θ_i)(u_i − cos θ_i · m) over the points with θ_i ≥ tol, m ← cos‖tangent‖ m +
sin‖tangent‖ tangent/‖tangent‖, renormalized; it stops once ‖tangent‖ < tol. Result: (Σ α_i ‖W_i‖) · m.
Every step needs each point's angle to the current mean, so the stream reads the experts once per step
(``passes_for`` = 1 + max_iter); steps after convergence change nothing. Memory: three tensor-sized fp32 buffers
(the mean, the tangent, W_t), whatever the number of experts; not row-chunkable (norms and angles are the tensor's).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod
from .mergekit import Mergekit


@dataclasses.dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 <= self.max_iter <= 100:
            raise ConfigError(f"karcher: max_iter={self.max_iter} must be in [0, 100]",
                              hint="each step reads every expert once more; mergekit's default is 10")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"karcher: tol={self.tol} must be a finite number >= 0")


class Karcher(MergeMethod):
    name = "karcher"
    summary = "Karcher mean on the sphere of the base's and experts' weights, times their mean norm (mergekit)"
    Params = KarcherParams
    needs_base = True
    param_help = {"max_iter": "Riemannian steps at most (each reads every expert again)",
                  "tol": "stop when the tangent's norm is below tol; also the smallest norm and angle counted"}
    mergekit = Mergekit("karcher", {"max_iter": 10, "tol": 1e-5}, without_base="point")

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self.n_points = n_experts + 1
        self.norms: list[float] = []           # ‖W_i‖, base first
        self.mean: torch.Tensor | None = None  # pass 0: Σ α u_i (valid points); then the unit mean m
        self.tangent: torch.Tensor | None = None
        self.first_unit: torch.Tensor | None = None
        self.done = params.max_iter == 0
        self.valid = 0                         # points of norm above tol
        self._i = 0                            # the point being added in this pass

    @classmethod
    def passes_for(cls, params: Any) -> int:
        return 1 + params.max_iter

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        w = self.zeros(delta.shape, delta.device)
        if t == 0:                                  # the base is point 0 (a copy: _point works in place)
            self._point(w.copy_(self.base), pass_)
        self._point(w.copy_(self.base).add_(delta), pass_)
        self.release(w)
        if t == self.n_experts - 1:
            self._end_pass(pass_)

    def _point(self, w: torch.Tensor, pass_: int) -> None:
        if pass_ == 0:
            self.norms.append(float(torch.linalg.vector_norm(w)))
            if self.mean is None:
                self.mean = self.zeros(w.shape, w.device)
            norm = self.norms[-1]
            if norm > self.params.tol:
                self.mean.add_(w, alpha=1 / norm)          # α is uniform: Σ α u_i ∝ Σ u_i
                if self.first_unit is None:
                    self.first_unit = (w / norm)
            return
        i, self._i = self._i, self._i + 1
        if self.done or self.norms[i] <= self.params.tol:
            return
        if self.tangent is None:
            self.tangent = self.zeros(w.shape, w.device)
        unit = w.div_(self.norms[i])
        dot = max(-1.0, min(1.0, float(torch.dot(self.mean.view(-1), unit.view(-1)))))
        theta = math.acos(dot)
        if theta < self.params.tol:
            return
        alpha = 1 / self.valid
        self.tangent.add_(unit.sub_(self.mean, alpha=dot), alpha=alpha * theta / math.sin(theta))

    def _end_pass(self, pass_: int) -> None:
        self._i = 0
        if pass_ == 0:
            self.valid = sum(1 for n in self.norms if n > self.params.tol)
            if not self.valid:
                self.done = True
                return
            size = float(torch.linalg.vector_norm(self.mean)) / self.valid
            if size < self.params.tol:
                self.mean.copy_(self.first_unit)
            else:
                self.mean.div_(size * self.valid)
            self.first_unit = None
            return
        if self.done or self.tangent is None:
            self.done = True
            return
        tn = float(torch.linalg.vector_norm(self.tangent))
        if tn < self.params.tol:
            self.done = True
        else:
            self.mean.mul_(math.cos(tn)).add_(self.tangent, alpha=math.sin(tn) / tn)
            unit_norm = float(torch.linalg.vector_norm(self.mean))
            if unit_norm > self.params.tol:
                self.mean.div_(unit_norm)
        self.tangent.zero_()

    def finalize(self) -> torch.Tensor:
        if self.tangent is not None:
            self.release(self.tangent)
        base = self.base.to(self.mean.device, torch.float32)
        if not self.valid:
            return self.mean.zero_().sub_(base)           # every point is ~0: mergekit returns zeros
        scale = sum(self.norms) / self.n_points
        return self.mean.mul_(scale).sub_(base)

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 16 * info.numel
