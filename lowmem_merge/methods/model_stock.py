"""Model Stock (Jang et al. 2024), as mergekit's ``model_stock``: W* = t·mean(W_t) + (1 − t)·W0 = W0 + t·mean(Δt), per
tensor, with t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean cosine between the N task vectors (t = 0 where the
denominator is within 1e-6 of 0).

The mean of the N(N−1)/2 pairwise cosines needs no pair at a time: with u_t = Δt / ‖Δt‖ (0 for a zero Δt),
Σ_{i<j} cos_ij = (‖Σ_t u_t‖² − #{t: Δt ≠ 0}) / 2. A per-tensor prepass finds ‖Δt‖ in one round and ‖Σ u_t‖² in a
second, one row chunk at a time (Σ_t u_t over a chunk is one chunk-sized buffer), so memory stays flat in N.
mergekit clamps each pairwise cosine to [−1, 1] and each norm product to ≥ 1e-6; here both matter only for task
vectors of norm below 1e-3 or rounding at |cos| = 1.

``filter_wise`` (mergekit's option): one t per row (the last dimension; a 1-D tensor is one row), from the rows'
cosines, with the same two rounds keeping per-row sums (#rows values per expert, row chunks as they come).
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


@dataclasses.dataclass(frozen=True)
class ModelStockParams:
    filter_wise: bool = False


def stock_t(n: int, unit_sq: torch.Tensor | float, nonzero: torch.Tensor | float) -> torch.Tensor | float:
    """t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise cosine from ‖Σ u_t‖² and the number of nonzero Δt
    (elementwise for per-row values); 0 where the denominator is within 1e-6 of 0."""
    if isinstance(unit_sq, torch.Tensor):
        cos = ((unit_sq - nonzero) / (n * (n - 1))).clamp(-1, 1)
        den = 1 + (n - 1) * cos
        return torch.where(den.abs() < 1e-6, 0.0, n * cos / torch.where(den.abs() < 1e-6, 1.0, den))
    cos = min(1.0, max(-1.0, (unit_sq - nonzero) / (n * (n - 1))))
    den = 1 + (n - 1) * cos
    return 0.0 if abs(den) < 1e-6 else n * cos / den


def rows_of(info: TensorInfo, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(index of the piece's first row in the whole tensor, the piece as rows of the last dimension)."""
    per_first_dim = math.prod(info.shape[1:-1]) if len(info.shape) > 2 else 1
    return (info.row_start * per_first_dim if len(info.shape) > 1 else 0), x.reshape(-1, x.shape[-1])


class StockPrepass(Prepass):
    """‖Δt‖ per expert (round 0), then ‖Σ_t Δt/‖Δt‖‖² (round 1), over one tensor's row chunks; with ``filter_wise``
    the same per row (kept per chunk, by the chunk's first row)."""

    rounds = 2
    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self._sq: list[dict[int, Any]] = [{} for _ in range(n_experts)]   # chunk start -> Σ Δt² (fp64, per row)
        self._norm: list[dict[int, Any]] = []
        self._chunk: torch.Tensor | None = None   # Σ_t u_t over the current chunk
        self._unit_sq: dict[int, Any] = {}        # chunk start -> ‖Σ u‖² (per row with filter_wise)
        self._nonzero: dict[int, Any] = {}

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        start, rows = rows_of(info, delta)
        wise = self.params.filter_wise
        if round_ == 0:
            self._sq[t][start] = rows.double().square().sum(1) if wise else \
                float(torch.linalg.vector_norm(rows, dtype=torch.float64)) ** 2
            return
        if self._chunk is None:
            self._chunk = torch.zeros_like(rows)
        norm = self._norm[t][start]
        if wise:
            inv = torch.where(norm > 0, 1 / torch.where(norm > 0, norm, 1.0), 0.0).to(rows.dtype)
            self._chunk.addcmul_(rows, inv[:, None])
            self._nonzero[start] = self._nonzero.get(start, 0) + (norm > 0).double()
        elif norm > 0:
            self._chunk.add_(rows, alpha=1 / norm)
            self._nonzero[start] = self._nonzero.get(start, 0) + 1
        if t == self.n_experts - 1:           # the chunk's last expert: fold it in
            sq = self._chunk.double().square().sum(1) if wise else \
                float(torch.linalg.vector_norm(self._chunk, dtype=torch.float64)) ** 2
            self._unit_sq[start] = sq
            self._chunk = None

    def end_round(self, round_: int) -> None:
        if round_ != 0:
            return
        if self.params.filter_wise:
            self._norm = [{k: v.sqrt().float() for k, v in sq.items()} for sq in self._sq]
        else:                                 # ‖Δt‖ of the whole tensor, for every chunk
            totals = [math.sqrt(sum(sq.values())) for sq in self._sq]
            self._norm = [{k: total for k in sq} for sq, total in zip(self._sq, totals)]

    def state(self) -> Any:
        """t, the weight of the experts' mean against the base: one float, or with filter_wise chunk start -> t
        per row."""
        n = self.n_experts
        if self.params.filter_wise:
            return {k: stock_t(n, v, self._nonzero.get(k, 0)).float() for k, v in self._unit_sq.items()}
        unit_sq = sum(self._unit_sq.values())
        nonzero = sum(1 for t in range(n) if sum(self._sq[t].values()) > 0)
        return stock_t(n, unit_sq, nonzero)


class ModelStock(MergeMethod):
    name = "model_stock"
    summary = "the experts' mean pulled toward the base by the mean cosine between task vectors (mergekit)"
    Params = ModelStockParams
    prepass = StockPrepass
    param_help = {"filter_wise": "one t per row (the last dimension); false: one t per tensor (mergekit's default)"}
    mergekit = Mergekit("model_stock", {"filter_wise": False})

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
        self.total.add_(delta)

    def finalize(self) -> torch.Tensor:
        if not self.params.filter_wise:
            return self.total.mul_(self.state / self.n_experts)
        start, rows = rows_of(self.info, self.total)
        rows.mul_((self.state[start] / self.n_experts).to(rows.device)[:, None])
        return self.total

    def stats(self) -> dict[str, float]:
        return {} if self.params.filter_wise else {"model_stock_t": self.state}

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @classmethod
    def check_experts(cls, params: Any, n_experts: int) -> None:
        if n_experts < 2:
            raise ConfigError("model_stock needs at least two experts (the cosine between their task vectors)",
                              hint="give two or more experts")

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 8 * info.numel                 # the mean's buffer, and the prepass's chunk sum
