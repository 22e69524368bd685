"""Tall LIN tensors (a 128256x8192 LM head) merged by a matrix rule in row chunks (issue 17 §3).

The covariance rules' Δ* = N·S⁻¹ and WUDI's Adam on τ (gradient 2(τA − B)) read the rows of N, B and τ only through
the same rows of the task vectors, once every expert's Gram G_t = ΔtᵀΔt (n×n) is known: N's rows are
Σ_t w_t Δt[rows]·(G_t + εI), and w_t, A and the ridge come from the G_t. So the rule's per-tensor prepass gathers
each G_t over the tensor's row chunks, the first chunk to merge turns them into the rule's system (weights, sums, one
factorization), and every chunk is then solved on its own: T + 1 Grams of n² held instead of the whole tensor's
N (m·n) and its temporaries. That wins when m ≥ TALL_RATIO·n with up to ~8 experts (70B: the LM head, 15.7·n, and
gate/up, 3.5·n); a wide or square matrix keeps the whole-tensor path, where the Grams would cost more than N.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ..info import TensorClass, TensorInfo
from .base import Prepass
from .gram import add_gram, mirror_lower

TALL_RATIO = 3             # rows per column from which a LIN matrix is merged in row chunks
TALL_MIN_ELEMS = 1 << 22   # no smaller: the stream keeps it one piece anyway (stream.CHUNK_ELEMS), and the prepass
                           # would only add a read


class TallRowChunks:
    """Mixin for a matrix rule that merges tall LIN tensors in row chunks: its Grams' prepass runs for those tensors
    only (``ExpertGrams.covers``), so a rule built without its state is on the whole-tensor path."""

    @classmethod
    def uses_prepass(cls, params: Any) -> bool:
        return False

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return info.cls != TensorClass.LIN or is_tall(info)


def is_tall(info: TensorInfo) -> bool:
    """A plain LIN matrix (the whole tensor) that a matrix rule merges in row chunks."""
    if info.cls != TensorClass.LIN or len(info.shape) != 2:
        return False
    m, n = info.shape
    return m >= TALL_RATIO * n and m * n > TALL_MIN_ELEMS


class TallState:
    """The Grams of one tall tensor, shared by its pieces: ``system(build)`` turns them into the rule's system on
    first use (``build(grams)`` may overwrite and drop them) and hands the same one to every later piece."""

    def __init__(self, grams: list[torch.Tensor | None], rows: int) -> None:
        self.grams = grams     # G_t (n, n) per expert, None for an expert never observed
        self.rows = rows
        self._system: Any = None

    def system(self, build: Callable[[list[torch.Tensor | None]], Any]) -> Any:
        if self._system is None:
            self._system, self.grams = build(self.grams), []
        return self._system


class ExpertGrams(Prepass):
    """G_t = Σ_chunks Δt[rows]ᵀ Δt[rows] per expert, in ``dtype``, over one tensor's row chunks (one read).

    The stream runs it only for tall tensors (``covers``); a caller that runs it for every tensor (an in-memory
    driver) gets None for the others, which then take the whole-tensor path.
    """

    scope = "tensor"
    dtype = torch.float64

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.grams: list[torch.Tensor | None] = [None] * n_experts
        self.rows = 0
        self.info: TensorInfo | None = None

    @classmethod
    def covers(cls, params: Any, info: TensorInfo) -> bool:
        return is_tall(info)

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if info.cls != TensorClass.LIN or len(info.shape) != 2:
            return
        x = delta.to(self.dtype)           # (rows, n): an fp64 copy for the fp64 Gram
        self.grams[t] = add_gram(self.grams[t], x, mirror=False)
        if t == 0:
            self.rows += x.shape[0]
            self.info = info

    def state(self) -> TallState | None:
        if self.info is None or not is_tall(replace(self.info, shape=(self.rows, self.info.shape[1]))):
            return None
        grams, self.grams = [None if g is None else mirror_lower(g) for g in self.grams], []
        return TallState(grams, self.rows)
