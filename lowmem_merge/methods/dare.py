"""DARE then task arithmetic (ALGORITHMS.md §7): W* = W0 + λ Σ_t w_t (m_t ⊙ Δt) / K_t, m_t ~ Bernoulli(K_t).

K_t = ``density`` unless ``densities`` gives one per expert; w_t = 1 unless ``weights`` does (mergekit's
``dare_linear`` with per-model ``weight`` and ``density``).

Dropping entries at random and rescaling the rest keeps E[τ̃] = τ (Yu et al. 2024, "Language Models are Super Mario").
Every float tensor class gets the same rule.

Determinism: the mask of expert t on a tensor (or row chunk) depends only on (seed, t, tensor name, row_start) and the
shape, through a blake2b hash (never Python's salted ``hash``), so it is the same on any device, in any tensor order
and in any run. It is drawn on the CPU generator (the same numbers whatever the device) in blocks of rows, so the host
buffer stays small for any tensor size; a row-chunked tensor gets different masks than the whole one, which is fine:
only the distribution matters, and the chunking is itself deterministic.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorInfo
from .base import MergeMethod, check_densities, expert_density, expert_weight
from .mergekit import GTA, WEIGHT_DENSITY, Mergekit, one_or_each, per_model, task_arithmetic

_BLOCK = 1 << 20  # mask elements drawn at a time (at least one row): 4 MiB of host memory


@dataclasses.dataclass(frozen=True)
class DareParams:
    density: float = 0.5
    scale: float = 0.4
    seed: int = 0
    weights: tuple[float, ...] = ()
    densities: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise ConfigError(f"dare: density={self.density} must be in (0, 1]",
                              hint="density is the probability to keep an entry (1 - drop rate), e.g. -p density=0.5")
        check_densities("dare", self.densities)


def mask_seed(seed: int, t: int, name: str, row_start: int) -> int:
    """A 64-bit generator seed from what identifies one expert's piece of one tensor."""
    digest = hashlib.blake2b(f"{seed}:{t}:{name}:{row_start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _rows_per_block(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, _BLOCK // max(row, 1))


def kept_blocks(seed: int, t: int, info: TensorInfo, delta: torch.Tensor,
                density: float) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """DARE's draw for expert t: (flat offset, block of rows of ``delta``, bool keep mask on its device) per block.

    The mask is None (keep all) at density 1: rand < 1 always holds, so nothing needs drawing.
    """
    if density >= 1:
        yield 0, delta, None
        return
    x = delta.reshape(1) if delta.dim() == 0 else delta  # masks run along dim 0
    gen = torch.Generator().manual_seed(mask_seed(seed, t, info.name, info.row_start))
    step = _rows_per_block(tuple(x.shape))
    row = x[0].numel()
    for r0 in range(0, x.shape[0], step):
        rows = x[r0:r0 + step]
        keep = torch.rand(rows.shape, generator=gen) < density  # bool, on the host
        yield r0 * row, rows, keep.to(rows.device)


class Dare(MergeMethod):
    name = "dare"
    summary = "drop each task-vector entry with probability 1-density, rescale by 1/density, then task arithmetic"
    Params = DareParams
    param_help = {
        "density": "probability to keep an entry (= 1 - drop rate p)",
        "scale": "λ, multiplies the sum of the rescaled task vectors",
        "seed": "random seed; masks depend on (seed, expert, tensor name, row offset) only",
        "weights": "w_t, one per expert (comma-separated); empty: all 1",
        "densities": "K_t, one per expert (comma-separated); empty: density for every expert",
    }
    mergekit = Mergekit("dare_linear", GTA, WEIGHT_DENSITY)

    @classmethod
    def from_mergekit(cls, glob: dict[str, Any], models: list[dict[str, Any]]) -> dict[str, Any]:
        return {**task_arithmetic("dare_linear", glob, models, elects=False),
                **one_or_each("density", per_model(models, "density"))}

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.total: torch.Tensor | None = None  # Σ_t (w_t / K_t) m_t ⊙ Δt, fp32, shape of the tensor

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if self.total is None:
            self.total = self.zeros(delta.shape, delta.device)
        density = expert_density(self.params, t)
        gain = expert_weight(self.params, t) / density
        acc = self.total.view(-1)
        for start, part, keep in kept_blocks(self.params.seed, t, self.info, delta, density):
            if keep is None:
                acc[start:start + part.numel()].add_(part.reshape(-1), alpha=gain)
            else:
                acc[start:start + part.numel()].view(part.shape).addcmul_(part, keep, value=gain)

    def finalize(self) -> torch.Tensor:
        return self.total.mul_(self.params.scale)

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        """The running sum, plus one mask block: fp32 draws and a bool mask on the host, the mask on the device and
        the fp32 cast ``addcmul_`` may make of it."""
        block = min(info.numel, _rows_per_block(info.shape) * math.prod(info.shape[1:]))
        return 4 * info.numel + 10 * block
