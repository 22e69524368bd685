"""Reinforced Agent Merging (RAM, arXiv 2601.13572), as mergekit 0.1.5's ``ram`` and ``ramplus_tl``.

An expert moves an entry where |Δt| > ε; c counts the experts that move it. RAM keeps an entry that one expert
alone moved whole (averaging would dilute it by 1/N), takes the mean Σ Δt / c of the movers where several moved it,
and 0 where none did: Δ* = Σ_t z_t / max(c, 1), z_t = Δt where |Δt| > ε, else 0.
ramplus_tl (RAM+, tensor-local) also scales each expert's unique entries by λ_t = 1 + r·clamp(ρ_t, 0, α), where
ρ_t = (entries of the tensor that t and another expert move) / max(entries only t moves, ε).

Streaming: given λ the rule is elementwise, so each row chunk is merged in one pass with chunk-sized buffers
(Σ z_t, c, and for RAM+ Σ λ_t z_t). ρ_t is the whole tensor's: RAM+'s per-tensor prepass counts, chunk by chunk,
the entries each expert moves and those it moves alone (a count and the last mover per entry of the chunk), so
its memory is one chunk's whatever the number of experts.
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
class RamParams:
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise ConfigError(f"ram: epsilon={self.epsilon} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class RamPlusParams(RamParams):
    r: float = 0.1
    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.r) and math.isfinite(self.alpha)):
            raise ConfigError(f"ramplus_tl: r={self.r} and alpha={self.alpha} must be finite numbers")


def movers(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The entries expert t moves: |Δt| > ε (mergekit's strict comparison)."""
    return delta.abs() > epsilon


class Ram(MergeMethod):
    name = "ram"
    summary = "entries one expert alone moves kept whole, entries several move averaged over the movers (mergekit)"
    Params = RamParams
    param_help = {"epsilon": "|Δt| above which expert t moves an entry (mergekit's default 1e-5)"}
    mergekit = Mergekit("ram", {"epsilon": 1e-5})

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None   # Σ z_t
        self.count: torch.Tensor | None = None   # c, the movers per entry
        self.lone: torch.Tensor | None = None    # Σ λ_t z_t (RAM+ only)

    def scale(self, t: int) -> float | None:
        """λ_t for expert t's unique entries; None: RAM's 1, no separate sum needed."""
        return None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
            self.count = self.zeros(delta.shape, delta.device)
            if self.scale(0) is not None:
                self.lone = self.zeros(delta.shape, delta.device)
        moved = movers(delta, self.params.epsilon)
        z = delta.where(moved, 0.0)
        self.total.add_(z)
        self.count.add_(moved)
        if self.lone is not None:
            self.lone.add_(z, alpha=self.scale(t))

    def finalize(self) -> torch.Tensor:
        alone = self.count == 1
        out = self.total.div_(self.count.clamp_(min=1))
        if self.lone is not None:
            out = torch.where(alone, self.lone, out, out=out)
            self.release(self.lone)
        self.release(self.count)
        return out

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 4 * info.numel * 3                 # Σ z_t, c, and z_t while it is added


class RamPlusPrepass(Prepass):
    """Per expert, the tensor's entries it moves and those it moves alone, counted one row chunk at a time (every
    expert's Δ of a chunk comes before the next chunk's)."""

    rounds = 1
    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.moved = torch.zeros(n_experts, dtype=torch.int64)
        self.alone = torch.zeros(n_experts, dtype=torch.int64)
        self._count: torch.Tensor | None = None   # movers per entry of the current chunk
        self._last: torch.Tensor | None = None    # the last expert that moved the entry

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        moved = movers(delta, self.params.epsilon)
        if t == 0:
            self._count = torch.zeros(delta.shape, dtype=torch.int32, device=delta.device)
            self._last = torch.zeros(delta.shape, dtype=torch.int32, device=delta.device)
        self._count.add_(moved)
        self._last.masked_fill_(moved, t)
        self.moved[t] += int(moved.sum())
        if t == self.n_experts - 1:               # the chunk is complete: who moved its entries alone
            lone = self._last[self._count == 1].long()
            self.alone += torch.bincount(lone, minlength=self.n_experts).cpu()
            self._count = self._last = None

    def counts(self, round_: int) -> list[torch.Tensor]:
        return [self.moved, self.alone]

    def state(self) -> list[float]:
        """λ_t = 1 + r·clamp(ρ_t, 0, α), ρ_t = shared_t / max(unique_t, ε)."""
        shared = (self.moved - self.alone).double()
        rho = shared / self.alone.double().clamp(min=self.params.epsilon)
        return (1 + self.params.r * rho.clamp(0, self.params.alpha)).tolist()


class RamPlusTl(Ram):
    name = "ramplus_tl"
    summary = "RAM with each expert's unique entries scaled by 1 + r·clamp(shared/unique, 0, α) per tensor (mergekit)"
    Params = RamPlusParams
    prepass = RamPlusPrepass
    param_help = {**Ram.param_help,
                  "r": "how much an expert's unique entries grow with its shared/unique ratio (mergekit's 0.1)",
                  "alpha": "the ratio's cap (mergekit's 0.2)"}
    mergekit = Mergekit("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5})

    def scale(self, t: int) -> float | None:
        return self.state[t]

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 4 * info.numel * 4                 # Σ z_t, c, Σ λ_t z_t, and z_t while it is added
