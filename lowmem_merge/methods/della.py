"""DELLA (Deep et al. 2024), as mergekit's ``della`` and ``della_linear``: MAGPRUNE, a random drop whose keep
probability grows with the entry's magnitude rank in its row, then an L1 rescale and TIES' election (``della``) or a
plain sum (``della_linear``).

Per expert t and row (mergekit ranks along dim 1; a 1-D tensor is one row of n entries): the entry of 0-based
magnitude rank r keeps with probability p = (K − ε) + 2ε·r/(n − 1). With ``rescale`` (mergekit's default) the kept
entries are multiplied by ‖Δt‖₁ / ‖kept‖₁ over the whole tensor (no rescale when either is below 1e-7), which a
per-tensor prepass computes with the same masks. Then ``della``: w_t-weighted sign election and agreeing sum
(÷ agreeing weights with normalize, the default), ``della_linear``: Σ w_t Δ't (÷ Σ w_t with normalize; false by
default); both × λ.

The draws are deterministic, like ``dare``'s: uniform numbers from a generator seeded by (seed, expert, tensor name,
row offset) compared with p, so they differ from mergekit's torch.bernoulli stream while following its law.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, Prepass, check_densities, expert_density, expert_weight, per_expert, sum_factor
from .dare import _rows_per_block, mask_seed
from .mergekit import GTA, WEIGHT_DENSITY, Mergekit, one_or_each, per_model, task_arithmetic
from .ties import _SLAB, Ties


@dataclasses.dataclass(frozen=True)
class DellaParams:
    density: float = 0.7
    epsilon: float = 0.15
    scale: float = 1.0
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()
    normalize: bool = True
    rescale: bool = True
    seed: int = 0
    epsilons: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_densities("della", self.densities + (self.density,))
        n = max(len(self.densities), len(self.epsilons), 1)
        for t in range(n):
            k = self.densities[t] if self.densities else self.density
            eps = self.epsilons[t] if self.epsilons else self.epsilon
            if k < 1 and not (0 < k - eps and k + eps < 1):
                raise ConfigError(f"della: density {k} ± epsilon {eps} must stay inside (0, 1)",
                                  hint="choose a smaller epsilon, e.g. -p epsilon=0.1")


@dataclasses.dataclass(frozen=True)
class DellaLinearParams(DellaParams):
    normalize: bool = False


def della_blocks(seed: int, t: int, info: TensorInfo, delta: torch.Tensor, density: float,
                 epsilon: float) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """MAGPRUNE's draw for expert t: (flat offset, block of rows, bool keep mask) per block of rows; the mask is
    None (keep all) at density 1."""
    if density >= 1:
        yield 0, delta, None
        return
    x = delta.reshape(1, -1) if delta.dim() < 2 else delta
    gen = torch.Generator().manual_seed(mask_seed(seed, t, info.name, info.row_start))
    step = _rows_per_block(tuple(x.shape))
    row = x[0].numel()
    n = x.shape[1]
    for r0 in range(0, x.shape[0], step):
        rows = x[r0:r0 + step]
        ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1)   # 0-based magnitude rank along dim 1
        probs = ranks.to(torch.float32).mul_(2 * epsilon / (n - 1) if n > 1 else 0.0).add_(density - epsilon)
        keep = torch.rand(rows.shape, generator=gen).to(rows.device) < probs   # drawn on the host, like dare
        yield r0 * row, rows, keep


class DellaPrepass(Prepass):
    """Per expert, ‖Δt‖₁ and ‖kept‖₁ over one tensor: the rescale factor."""

    scope = "tensor"

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self._before = [0.0] * n_experts
        self._after = [0.0] * n_experts

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        density = expert_density(self.params, t)
        for _, rows, keep in della_blocks(self.params.seed, t, info, delta, density,
                                          per_expert(self.params, "epsilon", t)):
            before = float(rows.abs().sum(dtype=torch.float64))
            self._before[t] += before
            self._after[t] += before if keep is None else float((rows * keep).abs().sum(dtype=torch.float64))

    def state(self) -> list[float]:
        """The factor per expert (1 where mergekit does not rescale)."""
        return [b / a if b >= 1e-7 and a >= 1e-7 else 1.0 for b, a in zip(self._before, self._after)]


class _Magprune:
    """What both DELLA rules share: the prepass, the kept blocks, row chunks."""

    prepass = DellaPrepass

    def _kept(self, t: int, delta: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(flat offset, kept and rescaled block as a new flat tensor) for expert t."""
        factor = self.state[t] if self.params.rescale else 1.0
        density = expert_density(self.params, t)
        for start, rows, keep in della_blocks(self.params.seed, t, self.info, delta, density,
                                              per_expert(self.params, "epsilon", t)):
            kept = rows * keep if keep is not None else rows.clone()
            yield start, kept.mul_(factor).reshape(-1)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @classmethod
    def prepass_for(cls, params: Any) -> type[Prepass] | None:
        return DellaPrepass if params.rescale else None


class Della(_Magprune, Ties):
    name = "della"
    summary = "magnitude-ranked random drop (MAGPRUNE), L1 rescale, then TIES' election and agreeing mean (mergekit)"
    Params = DellaParams
    param_help = {
        "density": "K, mean probability to keep an entry",
        "epsilon": "ε, keep probabilities run from K − ε (smallest in the row) to K + ε (largest)",
        "scale": "λ, multiplies the merged task vector",
        "weights": "w_t, one per expert (comma-separated); empty: all 1",
        "densities": "K_t, one per expert (comma-separated); empty: density for every expert",
        "normalize": "divide the agreeing entries' sum by their weights (mergekit's default for della: true)",
        "rescale": "multiply the kept entries by ‖Δt‖₁ / ‖kept‖₁ over the tensor (mergekit's default: true)",
        "seed": "random seed; masks depend on (seed, expert, tensor name, row offset) only",
        "epsilons": "ε_t, one per expert (comma-separated); empty: epsilon for every expert",
    }
    mergekit = Mergekit("della", {**GTA, "normalize": True, "rescale": True}, {**WEIGHT_DENSITY, "epsilon": 0.15})

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        """ε (mergekit: per model, 0.15 by default), one for all or one per model; della elects, della_linear
        does not."""
        name = cls.mergekit_schema().name
        elects = name == "della"
        return {**task_arithmetic(name, glob, models, elects=elects),
                **one_or_each("density", per_model(models, "density")),
                **one_or_each("epsilon", per_model(models, "epsilon")), "rescale": glob["rescale"],
                "normalize": glob["normalize"] if elects else False}

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        w = expert_weight(self.params, t)
        for start, kept in self._kept(t, delta):
            for offset in range(0, kept.numel(), _SLAB):
                self._accumulate(kept[offset:offset + _SLAB], start + offset, 0.0, w)   # kept zeros join no side

    def _plus_on_zero_sum(self) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        block = min(info.numel, (1 << 20) + (info.numel // info.shape[0] if info.shape else 1))
        return 16 * info.numel + 40 * block        # TIES' buffers, and one block's ranks, draws and kept copy


class DellaLinear(_Magprune, MergeMethod):
    name = "della_linear"
    summary = "magnitude-ranked random drop (MAGPRUNE), L1 rescale, then a weighted sum (mergekit's della_linear)"
    Params = DellaLinearParams
    param_help = {**Della.param_help, "normalize": "divide the sum by Σ w_t (mergekit's default: false)"}
    mergekit = Mergekit("della_linear", {**GTA, "rescale": True}, {**WEIGHT_DENSITY, "epsilon": 0.15})
    from_mergekit = Della.__dict__["from_mergekit"]

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
        acc = self.total.view(-1)
        w = expert_weight(self.params, t)
        for start, kept in self._kept(t, delta):
            acc[start:start + kept.numel()].add_(kept, alpha=w)

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(sum_factor(self.params, self.n_experts))

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        block = min(info.numel, (1 << 20) + (info.numel // info.shape[0] if info.shape else 1))
        return 4 * info.numel + 40 * block
