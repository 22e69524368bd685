"""TIES-Merging (ALGORITHMS.md §7; Yadav et al. 2023, `prateeky2806/ties-merging`): trim, elect, disjoint mean.

1. Trim: expert t keeps the entries with |Δt| >= κ_t.
   trim=global (the authors' code): κ_t is the (d − ⌊d·K⌋)-th smallest |Δt| over the whole model (d entries), found
   exactly by ``TiesPrepass`` with two histogram rounds; ties at κ_t are kept.
   trim=tensor (mergekit's ``ties``): per tensor, the k = ⌊K·numel⌋ largest |Δt|: |Δt| >= κ, the k-th largest,
   found exactly with the same two histogram rounds over the tensor's slabs (bounded temporaries, unlike a top-k,
   which on a 150k-row embedding needs gigabytes). Ties at κ are kept, where mergekit's top-k drops some arbitrarily.
2. Elect: γ = sign(Σ_t trimmed Δt).
3. Disjoint mean: the mean of the trimmed entries whose sign is γ (zeros never count); Δ* = λ · that mean.
Per-expert ``weights`` w_t (mergekit's per-model ``weight``) multiply each trimmed Δt before the election, and the mean
becomes Σ w_t·Δt / Σ w_t over the agreeing entries (mergekit's ``ties``; ``normalize=false`` keeps the sum). Per-expert
``densities`` K_t replace ``density`` in the trim.
Where the trimmed sum is exactly 0, trim=global gives 0 (lowmerge's rule, §7 "Streaming"; the reference would use the
model-wide majority sign, which needs one more pass) and trim=tensor elects + like mergekit.

Streaming: per tensor, four buffers P = Σ positive kept w_t·Δt, Q = Σ negative kept w_t·Δt and their weights c⁺, c⁻
(counts when unweighted); then Δ* = λ·P/c⁺ where γ > 0 and λ·Q/c⁻ where γ < 0 (a zero c divides by 1). Every float tensor class gets the same rule.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, Prepass, check_densities, expert_density, expert_weight

_HIGH = 1 << 15  # buckets of the top 16 bits of a non-negative fp32 (sign bit 0)
_LOW = 1 << 16   # values of the low 16 bits inside one bucket
_SLAB = 1 << 20  # entries per step in add: masks and their fp32 casts stay a few MiB


@dataclasses.dataclass(frozen=True)
class TiesParams:
    density: float = 0.2
    scale: float = 1.0
    trim: Literal["global", "tensor"] = "global"
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    normalize: bool = True

    def __post_init__(self) -> None:
        check_densities("ties", self.densities)
        if not 0 < self.density <= 1:
            raise ConfigError(f"ties: density={self.density} must be in (0, 1]",
                              hint="density is the fraction of each task vector kept, e.g. -p density=0.2")
        if self.trim not in ("global", "tensor"):
            raise ConfigError(f"ties: trim={self.trim!r} must be 'global' or 'tensor'", hint="example: -p trim=global")


class TiesPrepass(Prepass):
    """Exact per-expert global threshold κ_t in two reads, holding histograms, never the values.

    Non-negative fp32 values order like their int32 bit patterns. Round 0 counts |Δ| by the top 16 bits (32768 buckets)
    and finds, per expert, the bucket holding the rank r = d − ⌊d·K⌋ (1-indexed, smallest first); round 1 counts the
    low 16 bits of the entries in that bucket, which pins the r-th smallest value down exactly.
    """

    rounds = 2

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self._high = [torch.zeros(_HIGH, dtype=torch.int64) for _ in range(n_experts)]  # round 0 counts
        self._low = [torch.zeros(_LOW, dtype=torch.int64) for _ in range(n_experts)]    # round 1 counts
        self._bucket = [0] * n_experts  # bucket of the r-th smallest
        self._rank = [0] * n_experts    # its rank inside the bucket, 1-indexed; 0 = no threshold (κ_t = 0)
        self._kappa = [0.0] * n_experts

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if round_ == 1 and self._rank[t] == 0:
            return
        bits = delta.abs().view(torch.int32).reshape(-1)  # (numel,) int32, a temporary we may overwrite
        if round_ == 0:
            counts = torch.bincount(bits.bitwise_right_shift_(16), minlength=_HIGH)
            self._high[t] += counts.cpu()
        else:  # shift the bucket to [0, 65536), clamp the rest to -1 or 65536, offset by one so bincount takes it
            bits.sub_(self._bucket[t] << 16).clamp_(-1, _LOW).add_(1)
            self._low[t] += torch.bincount(bits, minlength=_LOW + 2)[1:_LOW + 1].cpu()

    def end_round(self, round_: int) -> None:
        for t in range(self.n_experts):
            if round_ == 0:
                d, density = int(self._high[t].sum()), expert_density(self.params, t)
                if density < 1 and d > 0:  # else keep everything: κ_t = 0
                    rank = d - int(d * density)  # ≥ 1 because density < 1
                    self._bucket[t], self._rank[t] = _locate(self._high[t], rank)
            elif self._rank[t]:
                low, _ = _locate(self._low[t], self._rank[t])
                bits = torch.tensor((self._bucket[t] << 16) | low, dtype=torch.int32)
                self._kappa[t] = bits.view(torch.float32).item()

    def state(self) -> list[float]:
        """κ_t per expert (exact fp32 values)."""
        return list(self._kappa)


def kth_smallest_abs(x: torch.Tensor, rank: int, slab: int = 1 << 20) -> float:
    """The ``rank``-th smallest |x| (1-indexed), exactly: two histogram rounds over slabs of ``slab`` entries."""
    flat = x.reshape(-1)
    high = torch.zeros(_HIGH, dtype=torch.int64, device=x.device)
    for part in flat.split(slab):
        high += torch.bincount(part.abs().view(torch.int32).bitwise_right_shift_(16), minlength=_HIGH)
    bucket, inner = _locate(high.cpu(), rank)
    low = torch.zeros(_LOW + 2, dtype=torch.int64, device=x.device)
    for part in flat.split(slab):
        bits = part.abs().view(torch.int32)
        low += torch.bincount(bits.sub_(bucket << 16).clamp_(-1, _LOW).add_(1), minlength=_LOW + 2)
    value, _ = _locate(low[1:_LOW + 1].cpu(), inner)
    return torch.tensor((bucket << 16) | value, dtype=torch.int32).view(torch.float32).item()


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest entry (1-indexed), and that entry's rank inside the bin."""
    cumulative = counts.cumsum(0)
    index = int(torch.searchsorted(cumulative, rank))  # first bin whose cumulative count reaches rank
    return index, rank - (int(cumulative[index - 1]) if index else 0)


class Ties(MergeMethod):
    name = "ties"
    summary = "trim each task vector to its largest entries, elect signs by mass, average the agreeing entries"
    Params = TiesParams
    prepass = TiesPrepass
    param_help = {
        "density": "K, fraction of each task vector kept by magnitude",
        "scale": "λ, multiplies the merged task vector",
        "trim": "global: one threshold per expert over the whole model (TIES paper); tensor: per tensor (mergekit)",
        "weights": "w_t, one per expert (comma-separated), multiply the trimmed task vectors; empty: all 1",
        "densities": "K_t, one per expert (comma-separated); empty: density for every expert",
        "normalize": "divide the agreeing entries' sum by their (weighted) count; false: keep the sum",
    }

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        if self.uses_prepass(params) and state is None:
            raise ValueError("ties with trim=global needs the TiesPrepass state (κ_t per expert)")
        self._count_dtype = _count_dtype(n_experts, params)
        self._sums: list[torch.Tensor] = []    # [P, Q], fp32, shape of the tensor
        self._counts: list[torch.Tensor] = []  # [c⁺, c⁻]: counts, or Σ w_t (fp32) when weighted

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        kappa = self._threshold(t, delta)
        w = expert_weight(self.params, t)
        flat = delta.reshape(-1)
        for start in range(0, flat.numel(), _SLAB):  # slab by slab: the masks and their fp32 casts stay small
            self._accumulate(flat[start:start + _SLAB], start, kappa, w)

    def _accumulate(self, d: torch.Tensor, start: int, kappa: float, w: float) -> None:
        """Add the kept entries of w·d (flat, entries [start, start + len) of the tensor) to P/Q and c⁺/c⁻."""
        if not self._sums:
            shape = self.info.shape
            self._sums = [torch.zeros(shape, dtype=torch.float32, device=d.device) for _ in range(2)]
            self._counts = [torch.zeros(shape, dtype=self._count_dtype, device=d.device) for _ in range(2)]
        side = -1 if w < 0 else 1  # a negative weight sends Δ > 0 to the negative side of w·Δ
        end = start + d.numel()
        pos, neg, c_pos, c_neg = (x.view(-1)[start:end] for x in (*self._sums, *self._counts))
        for total, count, mask in ((pos, c_pos, _kept_side(d, kappa, side)), (neg, c_neg, _kept_side(d, kappa, -side))):
            total.addcmul_(d, mask, value=w)
            if self.params.weights:
                count.add_(mask, alpha=w)
            else:
                count.add_(mask)

    def _threshold(self, t: int, delta: torch.Tensor) -> float:
        """κ: entries with |Δ| >= κ are kept (0 keeps all; inf keeps none)."""
        density = expert_density(self.params, t)
        if self.params.trim == "tensor" and density < 1:
            k = int(density * delta.numel())
            return kth_smallest_abs(delta, delta.numel() - k + 1) if k else math.inf
        return self.state[t] if self.uses_prepass(self.params) else 0.0

    def finalize(self) -> torch.Tensor:
        pos, neg = self._sums
        for p, n, c_pos, c_neg in zip(*(x.view(-1).split(_SLAB) for x in (*self._sums, *self._counts))):
            total = p + n
            up = total >= 0 if self._plus_on_zero_sum() else total > 0
            if self.params.normalize:  # mergekit: a zero divisor (no agreeing entry, or weights summing to 0) is 1
                p.div_(c_pos.masked_fill_(c_pos == 0, 1))
                n.div_(c_neg.masked_fill_(c_neg == 0, 1))
            p.mul_(up)
            n.mul_(total < 0)
        self._counts = []
        return pos.add_(neg).mul_(self.params.scale)

    def _plus_on_zero_sum(self) -> bool:
        """Where Σ trimmed w_t·Δt is exactly 0: mergekit elects + (trim=tensor); lowmerge's global rule gives 0."""
        return self.params.trim == "tensor"

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return params.trim == "global"

    @classmethod
    def uses_prepass(cls, params: Any) -> bool:
        return params.trim == "global" and min(params.densities or (params.density,)) < 1

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """P, Q, c⁺ and c⁻; add, finalize and trim=tensor's threshold search work in slabs (small temporaries)."""
        per_entry = 8 + 2 * _count_dtype(n_experts, params).itemsize
        return math.ceil(per_entry * info.numel)


def _kept_side(d: torch.Tensor, kappa: float, sign: int) -> torch.Tensor:
    """Bool mask of the kept entries strictly on one side of 0 (a kept 0 joins neither): Δ >= κ or Δ <= −κ."""
    if kappa > 0:
        return d >= kappa if sign > 0 else d <= -kappa
    return d > 0 if sign > 0 else d < 0


def _count_dtype(n_experts: int, params: Any) -> torch.dtype:
    """Counts up to n_experts; int16 halves the fp32 memory for any realistic number of experts. Weights need fp32."""
    if params.weights:
        return torch.float32
    return torch.int16 if n_experts < 1 << 15 else torch.int32
