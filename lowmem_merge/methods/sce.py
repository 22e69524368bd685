"""mergekit's ``sce`` (Select, Calculate, Erase; FuseChat 2.0), on every float tensor, as mergekit 0.1.5 computes it.

Per tensor, with δ_t = Δt:
  Select     keep the k = int(select_topk · #nonzero(var)) entries whose variance over the experts,
             var = mean_t δ_t² − (mean_t δ_t)² (torch.var, unbiased=False), is largest (select_topk ≥ 1: all);
  Calculate  w_t = Σ (m ⊙ δ_t)² / numel, divided by W = Σ_t w_t; uniform 1/T when W < 1e-6 (mergekit's threshold,
             on the mean squares themselves: tensors whose experts barely move, e.g. embeddings, take equal weights);
  Erase      keep expert t's entry where its sign equals the sign of Σ_t m ⊙ δ_t (≥ 0 counts as +);
  result     Σ_t ŵ_t e_t m δ_t / max(Σ_t ŵ_t e_t, 1e-6).
The tensor-wide numbers come from a per-tensor prepass over the tensor's row chunks, so the merge works in row
chunks: with select_topk < 1, κ = the k-th largest variance, exact from two histogram rounds (as TIES' trim=tensor),
and m = var ≥ κ (ties at κ are all kept, where mergekit's top-k drops some arbitrarily); then a third round forms
the w_t from the masked δ_t (it holds the chunk of every expert: the variance needs all of them). The w_t are
per-row fp64 sums added by math.fsum, so whole and chunked runs give the same bytes. The merge: pass 0 sums δ_t and
δ_t² (the mask and the majority sign need nothing else: Σ_t m ⊙ δ_t = m ⊙ Σ_t δ_t); pass 1 adds ŵ_t e_t m δ_t and
ŵ_t e_t. Memory: four fp32 piece-sized buffers, and the experts' pieces in the prepass's third round.
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
from .ties import _HIGH, _LOW, _locate

_SLAB = 1 << 17


@dataclasses.dataclass(frozen=True)
class SceParams:
    select_topk: float = 1.0

    def __post_init__(self) -> None:
        if not self.select_topk > 0:
            raise ConfigError(f"sce: select_topk={self.select_topk} must be > 0",
                              hint="the fraction of entries kept by variance over the experts, e.g. 0.1; 1 keeps all")


def variance_of(total: torch.Tensor, squares: torch.Tensor, n: int) -> torch.Tensor:
    """E[δ²] − E[δ]², clamped at 0, written over ``squares`` (Σ δ_t²; ``total`` is Σ δ_t)."""
    return squares.div_(n).sub_((total / n).square_()).clamp_(min=0)


class SceEnergyPrepass(Prepass):
    """Every entry kept: w_t = Σ δ_t² / numel over the tensor's row chunks."""

    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.sums = RowSums(*map(str, range(n_experts)))
        self.numel = 0

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        self.numel += delta.numel() if t == 0 else 0
        self._energy(t, delta)

    def _energy(self, t: int, kept: torch.Tensor) -> None:
        self.sums.add(str(t), kept)

    def counts(self, round_: int) -> list[torch.Tensor]:
        return []

    def state(self) -> dict[str, Any]:
        """κ (None: keep every entry) and ŵ_t, the normalized energy weights."""
        energy = [self.sums.total(str(t)) / max(1, self.numel) for t in range(self.n_experts)]
        total = sum(energy)
        weights = [1 / self.n_experts] * self.n_experts if abs(total) < 1e-6 else [e / total for e in energy]
        return {"kappa": self.kappa(), "weights": weights}

    def kappa(self) -> float | None:
        return None


class SceTopkPrepass(SceEnergyPrepass):
    """κ, the k-th largest variance, from a histogram of its top 16 bits (round 0) and of the low 16 bits inside
    κ's bucket (round 1); round 2: w_t from the masked δ_t."""

    rounds = 3

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.high = torch.zeros(_HIGH, dtype=torch.int64)
        self.low = torch.zeros(_LOW, dtype=torch.int64)
        self.nonzero = 0
        self.bucket = -1          # κ's bucket (-1: k = 0, nothing kept)
        self.rank = 0             # κ's rank inside it, smallest first
        self._kappa = math.inf
        self._held: list[torch.Tensor] = []   # round 2: this chunk's δ_t

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if round_ == 2:
            self.numel += delta.numel() if t == 0 else 0
        if round_ == 1 and self.bucket < 0:
            return
        self._held.append(delta.clone())
        if t < self.n_experts - 1:
            return
        held, self._held = self._held, []
        total, squares = torch.zeros_like(delta), torch.zeros_like(delta)
        for d in held:                      # the merge's own order: its pass 0 gives the same variance
            total.add_(d)
            squares.addcmul_(d, d)
        variance = variance_of(total, squares, self.n_experts)
        if round_ == 2:
            mask = variance.ge_(self._kappa).to(delta.dtype)
            for i, d in enumerate(held):
                self._energy(i, d.mul_(mask))
            return
        for part in variance.view(-1).split(_SLAB):
            bits = part.view(torch.int32)
            if round_ == 0:
                self.nonzero += int(torch.count_nonzero(part))
                self.high += torch.bincount(bits.bitwise_right_shift(16), minlength=_HIGH).cpu()
            else:
                inside = bits[bits.bitwise_right_shift(16) == self.bucket]
                self.low += torch.bincount(inside.bitwise_and(_LOW - 1), minlength=_LOW).cpu()

    def end_round(self, round_: int) -> None:
        if round_ == 0:
            d = int(self.high.sum())
            k = int(abs(self.params.select_topk) * self.nonzero)
            if k:                            # the k-th largest is the (d − k + 1)-th smallest
                self.bucket, self.rank = _locate(self.high, d - k + 1)
        elif round_ == 1 and self.bucket >= 0:
            value, _ = _locate(self.low, self.rank)
            self._kappa = torch.tensor((self.bucket << 16) | value, dtype=torch.int32).view(torch.float32).item()

    def kappa(self) -> float | None:
        return self._kappa


class Sce(MergeMethod):
    name = "sce"
    summary = "keep the entries of highest variance over experts, weight experts by their kept energy, erase minority signs (mergekit)"
    Params = SceParams
    passes = 2
    param_help = {"select_topk": "fraction of entries kept by their variance over the experts (1: all)"}
    mergekit = Mergekit("sce", {"select_topk": 1.0, "int8_mask": False})

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        return {"select_topk": glob["select_topk"]}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None     # pass 0: Σ δ_t; then the majority sign (±1) where selected, else 0
        self.mask: torch.Tensor | None = None      # pass 0: Σ δ_t²; then the selection mask m (0/1)
        self.num: torch.Tensor | None = None       # Σ ŵ_t e_t m δ_t
        self.den: torch.Tensor | None = None       # Σ ŵ_t e_t

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        return SceTopkPrepass if params.select_topk < 1 else SceEnergyPrepass

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if pass_ == 0:
            if self.total is None:
                self.total, self.mask = self.zeros(delta.shape, delta.device), self.zeros(delta.shape, delta.device)
            self.total.add_(delta)
            self.mask.addcmul_(delta, delta)
            if t == self.n_experts - 1:
                self._select()
            return
        if self.num is None:
            self.num, self.den = self.zeros(delta.shape, delta.device), self.zeros(delta.shape, delta.device)
        kept = delta * self.mask
        weight = self.state["weights"][t]
        agree = (torch.sign(kept) == self.total).to(kept.dtype)
        self.num.addcmul_(kept, agree, value=weight)
        self.den.add_(agree, alpha=weight)

    def _select(self) -> None:
        variance = variance_of(self.total, self.mask, self.n_experts)
        kappa = self.state["kappa"]
        if kappa is None:
            variance.fill_(1)
        else:
            variance.copy_(variance >= kappa)
        self.mask = variance
        # majority sign of Σ_t m δ_t (≥ 0 → +1); unselected entries are erased anyway (their m δ_t = 0)
        summed = self.total.mul_(self.mask)
        summed.copy_(torch.where(summed >= 0, 1.0, -1.0))

    def finalize(self) -> torch.Tensor:
        out = self.num.div_(self.den.clamp_(min=1e-6))
        self.release(self.den, self.mask, self.total)
        return out

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """Four buffers and the pass's temporaries; with select_topk < 1 the prepass holds every expert's piece,
        their sums, the variance and a temporary."""
        return 4 * info.numel * max(5, n_experts + 4 if params.select_topk < 1 else 0)
