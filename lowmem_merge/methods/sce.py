"""mergekit's ``sce`` (Select, Calculate, Erase; FuseChat 2.0), on every float tensor, whole tensors, as mergekit
0.1.5 computes it.

Per tensor, with δ_t = Δt:
  Select     keep the k = int(select_topk · #nonzero(var)) entries whose variance over the experts,
             var = mean_t δ_t² − (mean_t δ_t)² (torch.var, unbiased=False), is largest (select_topk ≥ 1: all);
  Calculate  w_t = Σ (m ⊙ δ_t)² / numel, divided by W = Σ_t w_t; uniform 1/T when W < 1e-6 (mergekit's threshold,
             on the mean squares themselves: tensors whose experts barely move, e.g. embeddings, take equal weights);
  Erase      keep expert t's entry where its sign equals the sign of Σ_t m ⊙ δ_t (≥ 0 counts as +);
  result     Σ_t ŵ_t e_t m δ_t / max(Σ_t ŵ_t e_t, 1e-6).
Pass 0 sums δ_t and δ_t² (the selection mask and the majority sign need nothing else: Σ_t m ⊙ δ_t = m ⊙ Σ_t δ_t)
and, when every entry is kept, each w_t; with select_topk < 1 a second pass forms the w_t from the masked δ_t (the
mask is known only after pass 0); the last pass adds ŵ_t e_t m δ_t and ŵ_t e_t. Memory: four fp32 tensor-sized
buffers, whatever the number of experts; the top-k runs on the whole tensor, so no row chunks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod
from .mergekit import Mergekit


@dataclasses.dataclass(frozen=True)
class SceParams:
    select_topk: float = 1.0

    def __post_init__(self) -> None:
        if not self.select_topk > 0:
            raise ConfigError(f"sce: select_topk={self.select_topk} must be > 0",
                              hint="the fraction of entries kept by variance over the experts, e.g. 0.1; 1 keeps all")


class Sce(MergeMethod):
    name = "sce"
    summary = "keep the entries of highest variance over experts, weight experts by their kept energy, erase minority signs (mergekit)"
    Params = SceParams
    passes = 3                                      # 2 when every entry is kept: passes_for
    param_help = {"select_topk": "fraction of entries kept by their variance over the experts (1: all)"}
    mergekit = Mergekit("sce", {"select_topk": 1.0, "int8_mask": False})

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        return {"select_topk": glob["select_topk"]}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self.total: torch.Tensor | None = None     # pass 0: Σ δ_t; then the majority sign (±1) where selected, else 0
        self.mask: torch.Tensor | None = None      # pass 0: Σ δ_t²; then the selection mask m (0/1)
        self.num: torch.Tensor | None = None       # Σ ŵ_t e_t m δ_t
        self.den: torch.Tensor | None = None       # Σ ŵ_t e_t
        self.energy: list[float] = []              # w_t = Σ (m δ_t)² / numel

    @classmethod
    def passes_for(cls, params: Any) -> int:
        return 3 if params.select_topk < 1 else 2

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        last = self.passes_for(self.params) - 1
        if pass_ == 0:
            if self.total is None:
                self.total, self.mask = self.zeros(delta.shape, delta.device), self.zeros(delta.shape, delta.device)
            self.total.add_(delta)
            self.mask.addcmul_(delta, delta)
            if last == 1:                            # every entry kept: w_t from δ_t itself
                self.energy.append(float(delta.square().sum()) / delta.numel())
            if t == self.n_experts - 1:
                self._select()
            return
        kept = delta * self.mask
        if pass_ < last:                             # select_topk < 1: w_t from the masked δ_t
            self.energy.append(float(kept.square().sum()) / kept.numel())
            return
        if self.num is None:
            self.num, self.den = self.zeros(delta.shape, delta.device), self.zeros(delta.shape, delta.device)
        total = sum(self.energy)
        weight = 1 / self.n_experts if abs(total) < 1e-6 else self.energy[t] / total
        agree = (torch.sign(kept) == self.total).to(kept.dtype)
        self.num.addcmul_(kept, agree, value=weight)
        self.den.add_(agree, alpha=weight)

    def _select(self) -> None:
        n = self.n_experts
        mean = self.total / n
        variance = self.mask.div_(n).sub_(mean.square()).clamp_(min=0)    # E[δ²] − E[δ]², written over Σ δ²
        if self.params.select_topk < 1:
            k = int(abs(self.params.select_topk) * int(torch.count_nonzero(variance)))
            keep = torch.zeros_like(variance).view(-1)
            if k:
                keep[torch.topk(variance.view(-1), k=k, largest=True).indices] = 1
            variance.copy_(keep.view(variance.shape))
        else:
            variance.fill_(1)
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
        return 4 * info.numel * 5
