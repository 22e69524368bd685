"""mergekit's ``karcher``: the weighted Karcher (Riemannian) mean on the unit sphere of the base's and the experts'
weights, each whole tensor, scaled by their mean norm.

mergekit puts the base first among the points when the recipe has a base_model, so the N = T + 1 points are
W0, W1, ..., WT with α = 1/N each. Units u_i = W_i/‖W_i‖ (points of norm ≤ tol left out, the others' α renormalized);
the mean starts at the normalized Σ α u_i (u of the first point if that is ≤ tol) and takes up to ``max_iter``
steps: tangent = Σ α (θ_i / sin θ_i)(u_i − cos θ_i · m) over the points with θ_i ≥ tol, m ← cos‖tangent‖ m +
sin‖tangent‖ tangent/‖tangent‖, renormalized; it stops once ‖tangent‖ < tol. Result: (Σ α_i ‖W_i‖) · m.
Every iterate stays in the span of the units (m and the tangent are combinations Σ β_i u_i), so the whole
iteration runs on coefficients from the points' Gram matrix G_ij = W_i·W_j: ``KarcherPrepass`` gathers it in one
read over the tensor's row chunks (per-row fp64 sums added by math.fsum: the same numbers whole or chunked; it holds
every point's chunk), iterates in fp64, and the merge is one elementwise pass, Δ* = Σ c_i W_i − W0 in row chunks.
Exact in exact arithmetic; fp64 angles where mergekit takes fp32 ones.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, Prepass
from .mergekit import Mergekit
from .tensor_sums import RowSums


@dataclasses.dataclass(frozen=True)
class KarcherParams:
    max_iter: int = 10
    tol: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 <= self.max_iter <= 100:
            raise ConfigError(f"karcher: max_iter={self.max_iter} must be in [0, 100]",
                              hint="mergekit's default is 10")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConfigError(f"karcher: tol={self.tol} must be a finite number >= 0")


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """c_i with Σ c_i W_i the merged tensor, from the points' Gram matrix (fp64, base first): mergekit's iteration on
    the coefficients β of m = Σ β_i u_i in the units' Gram U."""
    n_points = gram.shape[0]
    norms = gram.diagonal().sqrt()
    valid = norms > tol
    if not bool(valid.any()):
        return [0.0] * n_points
    safe = torch.where(valid, norms, 1.0)
    units = gram / safe[:, None] / safe[None, :]
    alpha = valid.double() / int(valid.sum())
    length = lambda b: math.sqrt(max(0.0, float(b @ units @ b)))   # noqa: E731  ‖Σ b_i u_i‖
    size = length(alpha)
    if size < tol:
        beta = torch.zeros(n_points, dtype=torch.float64)
        beta[int(valid.nonzero()[0])] = 1.0
    else:
        beta = alpha / size
    for _ in range(max_iter):
        dots = (units @ beta).clamp(-1, 1)
        tangent = torch.zeros_like(beta)
        for i in range(n_points):
            theta = math.acos(float(dots[i]))
            if not bool(valid[i]) or theta < tol:
                continue
            step = alpha[i] * theta / math.sin(theta)
            tangent -= step * float(dots[i]) * beta
            tangent[i] += step
        tn = length(tangent)
        if tn < tol:
            break
        beta = math.cos(tn) * beta + math.sin(tn) / tn * tangent
        unit_norm = length(beta)
        if unit_norm > tol:
            beta = beta / unit_norm
    scale = float(norms.sum()) / n_points
    return (scale * beta / safe).tolist()


class KarcherPrepass(Prepass):
    """The Gram matrix of W0, W1, ..., WT over the tensor's row chunks (each chunk's points held until the last)."""

    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.sums = RowSums(*(f"{i},{j}" for i in range(n_experts + 1) for j in range(i + 1)))
        self._points: list[torch.Tensor] = []

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if t == 0:
            self._points = [self.base.to(delta.device, torch.float32, copy=True)]
            self.sums.add("0,0", self._points[0])
        w = delta.add(self._points[0])                  # the merge's W_t = W0 + Δt in fp32
        self._points.append(w)
        for j, other in enumerate(self._points):
            self.sums.add(f"{t + 1},{j}", w, other)
        if t == self.n_experts - 1:
            self._points = []

    def counts(self, round_: int) -> list[torch.Tensor]:
        return []

    def state(self) -> list[float]:
        """c_i per point, base first."""
        n = self.n_experts + 1
        gram = torch.tensor([[self.sums.total(f"{max(i, j)},{min(i, j)}") for j in range(n)] for i in range(n)],
                            dtype=torch.float64)
        return karcher_coefficients(gram, self.params.max_iter, self.params.tol)


class Karcher(MergeMethod):
    name = "karcher"
    summary = "Karcher mean on the sphere of the base's and experts' weights, times their mean norm (mergekit)"
    Params = KarcherParams
    needs_base = True
    param_help = {"max_iter": "Riemannian steps at most (on the points' Gram matrix: one read whatever the count)",
                  "tol": "stop when the tangent's norm is below tol; also the smallest norm and angle counted"}
    mergekit = Mergekit("karcher", {"max_iter": 10, "tol": 1e-5}, without_base="point")

    prepass = KarcherPrepass

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.out: torch.Tensor | None = None   # Σ c_i W_i − W0 = (Σ c_i − 1) W0 + Σ_t c_t Δt

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.out is None:
            self.out = self.zeros(delta.shape, delta.device)
            self.out.add_(self.base.to(delta.device, torch.float32), alpha=sum(self.state) - 1)
        self.out.add_(delta, alpha=self.state[t + 1])

    def finalize(self) -> torch.Tensor:
        return self.out

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """The prepass holds every point's piece in fp32 (the merge: one buffer and a cast base)."""
        return 4 * info.numel * max(3, n_experts + 2)
