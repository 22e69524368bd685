"""TIES-Merging (ALGORITHMS.md §7; Yadav et al. 2023, `prateeky2806/ties-merging`): trim, elect, disjoint mean.

1. Trim: expert t keeps the entries with |Δt| >= κ_t.
   trim=global (the authors' code): κ_t is the (d − ⌊d·K⌋)-th smallest |Δt| over the whole model (d entries), found
   exactly by ``TiesPrepass`` with two histogram rounds; ties at κ_t are kept.
   trim=tensor (mergekit's ``ties``): per tensor, the k = ⌊K·numel⌋ largest |Δt|: |Δt| >= κ, the k-th largest,
   found exactly by ``TensorTiesPrepass``, the same two histogram rounds over the tensor's row chunks just before it
   is merged (bounded buffers, unlike a top-k, which on a 150k-row embedding needs gigabytes). Ties at κ are kept,
   where mergekit's top-k drops some arbitrarily.
2. Elect: γ = sign(Σ_t trimmed Δt).
3. Disjoint mean: the mean of the trimmed entries whose sign is γ (zeros never count); Δ* = λ · that mean.
Per-expert ``weights`` w_t (mergekit's per-model ``weight``) multiply each trimmed Δt before the election, and the mean
becomes Σ w_t·Δt / Σ w_t over the agreeing entries (mergekit's ``ties``; ``normalize=false`` keeps the sum). Per-expert
``densities`` K_t replace ``density`` in the trim.
Where the trimmed sum is exactly 0, trim=global gives 0 (lowmerge's rule, §7 "Streaming"; the reference would use the
model-wide majority sign, which needs one more pass) and trim=tensor elects + like mergekit.

Streaming: per tensor or row chunk, four buffers P = Σ positive kept w_t·Δt, Q = Σ negative kept w_t·Δt and their weights c⁺, c⁻
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
from .mergekit import GTA, WEIGHT_DENSITY, Mergekit, one_or_each, per_model, task_arithmetic

_HIGH = 1 << 15  # buckets of the top 16 bits of a non-negative fp32 (sign bit 0)
_LOW = 1 << 16   # values of the low 16 bits inside one bucket
_SLAB = 1 << 17  # entries per step: every temporary stays under glibc's mmap threshold (1 MiB, device.tune_malloc),
                 # so the heap reuses it instead of mapping fresh zeroed pages each time


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
    """Exact per-expert thresholds in two reads, holding histograms, never the values (scope: the whole model).

    Non-negative fp32 values order like their int32 bit patterns. Round 0 counts |Δ| by the top 16 bits (32768 buckets)
    and finds, per expert and threshold, the bucket holding its rank r (1-indexed, smallest first); round 1 counts
    the low 16 bits of the entries in that bucket, which pins the r-th smallest value down exactly. TIES has one
    threshold per expert; subclasses may ask for several (``threshold_ranks``).
    """

    rounds = 2

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self._high = [torch.zeros(_HIGH, dtype=torch.int64) for _ in range(n_experts)]  # round 0 counts
        self._kappa: list[list[float]] = [[] for _ in range(n_experts)]   # per expert, per threshold
        self._find: list[list[tuple[int, int, int]]] = [[] for _ in range(n_experts)]  # (which, bucket, rank in it)
        self._low: list[list[torch.Tensor]] = [[] for _ in range(n_experts)]           # round 1 counts, per find

    def threshold_ranks(self, d: int, t: int) -> list[int]:
        """Ranks among d entries of expert t's thresholds (0 stands for κ = 0, d + 1 for κ = ∞). TIES: the
        (d − ⌊d·K⌋)-th smallest (the authors' global rule), or everything kept at K = 1."""
        density = expert_density(self.params, t)
        return [d - int(d * density)] if density < 1 and d > 0 else [0]

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if round_ == 1 and not self._find[t]:
            return
        for part in delta.reshape(-1).split(_SLAB):
            bits = part.abs().view(torch.int32)  # a temporary we may overwrite
            if round_ == 0:
                self._high[t] += torch.bincount(bits.bitwise_right_shift_(16), minlength=_HIGH).cpu()
                continue
            high = bits.bitwise_right_shift(16)
            for (_, bucket, _), low in zip(self._find[t], self._low[t]):  # only the entries inside the bucket
                inside = bits[high == bucket]
                low += torch.bincount(inside.bitwise_and_(_LOW - 1), minlength=_LOW).cpu()

    def counts(self, round_: int) -> list[torch.Tensor]:
        return self._high if round_ == 0 else [low for lows in self._low for low in lows]

    def end_round(self, round_: int) -> None:
        for t in range(self.n_experts):
            if round_ == 0:
                d = int(self._high[t].sum())
                ranks = self.threshold_ranks(d, t)
                self._kappa[t] = [0.0 if r == 0 else math.inf if r > d else math.nan for r in ranks]
                self._find[t] = [(i, *_locate(self._high[t], r)) for i, r in enumerate(ranks) if 0 < r <= d]
                self._low[t] = [torch.zeros(_LOW, dtype=torch.int64) for _ in self._find[t]]
            else:
                for (i, bucket, rank), low in zip(self._find[t], self._low[t]):
                    value, _ = _locate(low, rank)
                    bits = torch.tensor((bucket << 16) | value, dtype=torch.int32)
                    self._kappa[t][i] = bits.view(torch.float32).item()

    def state(self) -> list[float]:
        """κ_t per expert (exact fp32 values; inf keeps nothing)."""
        return [k[0] for k in self._kappa]


class TensorTiesPrepass(TiesPrepass):
    """mergekit's per-tensor trim: κ_t is the k-th largest |Δt| of one tensor, k = ⌊K·numel⌋, gathered over the
    tensor's row chunks just before it is merged, so the merge itself works in row chunks (bounded buffers)."""

    scope = "tensor"

    def threshold_ranks(self, d: int, t: int) -> list[int]:
        """The k-th largest is the (d − k + 1)-th smallest; k = 0 gives d + 1: nothing kept."""
        density = expert_density(self.params, t)
        return [d - int(density * d) + 1] if density < 1 and d > 0 else [0]


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
    mergekit = Mergekit("ties", {**GTA, "normalize": True}, WEIGHT_DENSITY)

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        """mergekit trims each tensor on its own (trim: tensor); normalize divides by the agreeing weights."""
        return {**task_arithmetic("ties", glob, models, elects=True),
                **one_or_each("density", per_model(models, "density")), "trim": "tensor",
                "normalize": glob["normalize"]}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self._sums: list[torch.Tensor] = []    # [P, Q], fp32, shape of the tensor
        self._counts: list[torch.Tensor] = []  # [c⁺, c⁻]: Σ w_t over the kept entries (counts when unweighted), fp32
        self._mask = torch.empty(0)

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        kappa = self.state[t] if self.state is not None else 0.0
        w = expert_weight(self.params, t)
        flat = delta.reshape(-1)
        for start in range(0, flat.numel(), _SLAB):  # slab by slab: the masks and their fp32 casts stay small
            self._accumulate(flat[start:start + _SLAB], start, kappa, w)

    def _accumulate(self, d: torch.Tensor, start: int, kappa: float, w: float) -> None:
        """Add the kept entries of w·d (flat, entries [start, start + len) of the tensor) to P/Q and c⁺/c⁻.

        Masks are fp32 0/1 in one reused slab buffer: every op has one dtype, so none casts a temporary.
        """
        if not self._sums:
            shape = self.info.shape
            self._sums = [self.zeros(shape, d.device) for _ in range(2)]
            self._counts = [self.zeros(shape, d.device) for _ in range(2)]
            self._mask = self.zeros((min(self.info.numel, _SLAB),), d.device)
        side = -1 if w < 0 else 1  # a negative weight sends Δ > 0 to the negative side of w·Δ
        end = start + d.numel()
        mask = self._mask[:d.numel()]
        pos, neg, c_pos, c_neg = (x.view(-1)[start:end] for x in (*self._sums, *self._counts))
        for total, count, sign in ((pos, c_pos, side), (neg, c_neg, -side)):
            _kept_side(d, kappa, sign, mask)
            total.addcmul_(d, mask, value=w)
            count.add_(mask, alpha=w)

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
        merged = pos.add_(neg).mul_(self.params.scale)
        self.release(neg, *self._counts, self._mask)   # only now: the reader thread may take them at once
        self._counts = []
        return merged

    def _plus_on_zero_sum(self) -> bool:
        """Where Σ trimmed w_t·Δt is exactly 0: mergekit elects + (trim=tensor); lowmerge's global rule gives 0."""
        return self.params.trim == "tensor"

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        if min(params.densities or (params.density,)) >= 1:
            return None
        return TiesPrepass if params.trim == "global" else TensorTiesPrepass

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """P, Q, c⁺ and c⁻ in fp32, and one mask slab; add and finalize work in slabs (small temporaries)."""
        return 16 * info.numel + 4 * min(info.numel, _SLAB)


def _kept_side(d: torch.Tensor, kappa: float, sign: int, out: torch.Tensor) -> torch.Tensor:
    """1.0 at the kept entries strictly on one side of 0 (a kept 0 joins neither): Δ >= κ or Δ <= −κ; else 0.0."""
    if kappa > 0:
        return torch.ge(d, kappa, out=out) if sign > 0 else torch.le(d, -kappa, out=out)
    return torch.gt(d, 0, out=out) if sign > 0 else torch.lt(d, 0, out=out)
