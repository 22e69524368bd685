"""What a rule on calibration data (regmean, chain) and the calibration walk (``lowmem_merge.calib``) agree on:
the walk sums each linear layer's input rows as the rule asks (``calib_rows``), hands the sums to the rule
(``calib_state``), and the rule merges that layer from the :class:`GramState` it made."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch


@dataclass
class GramState:
    """What a calibrated rule gets for one linear layer: per expert an input Gram C_t (n×n, fp32) and a weight.
    The layers that read one input (q, k, v) share it, and the rule's factorization of Σ w_t C_t (``solver``)."""
    grams: list[torch.Tensor]
    weights: list[float]
    solver: Any = None


class CalibratedRule(Protocol):
    """The hooks the walk calls on a rule class whose ``calibration`` is "own" (each expert's Grams on its own
    model) or "merged" (each task's Grams through the layers merged before it)."""
    name: ClassVar[str]
    calibration: ClassVar[str | None]

    @classmethod
    def calib_rows(cls, params: Any, x: torch.Tensor) -> torch.Tensor:
        """The rows (tokens × features, fp32) whose Σ x xᵀ the walk sums for one linear layer's input."""
        ...

    @classmethod
    def calib_state(cls, params: Any, raw: list[tuple[torch.Tensor, int]]) -> GramState:
        """(Σ x xᵀ, token count) per expert -> the state this rule solves with."""
        ...
