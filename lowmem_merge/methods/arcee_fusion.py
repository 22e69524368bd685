"""Arcee Fusion, as mergekit's ``arcee_fusion``: the base and one expert; only the expert's most important changes
are kept.

Per element, importance = |Δ| · KL(softmax(W1 row) + ε ‖ softmax(W0 row) + ε) with ε = 1e-8 and the rows along
the stored tensor's last dimension (a vector is one row), in fp64; the threshold is median + 1.5·(q3 − q1) of every
importance of the tensor, each quantile the element at index ⌊q·(n − 1)⌋ of the sorted values; Δ* = Δ where
importance ≥ threshold, else 0. mergekit estimates the quantiles from a random sample of 10⁶ elements for larger
tensors; here they are exact for every size (the same numbers up to 10⁶ elements, deterministic beyond).
The quantiles are the tensor's: ``FusionPrepass`` finds them over the tensor's row chunks with four histogram
rounds of 16 bits each of the fp64 importance (as TIES' thresholds, with 64-bit keys), then each chunk is merged on
its own: the importance, the mask and row blocks of temporaries per chunk, whole and chunked runs the same bytes.
"""
from __future__ import annotations

from typing import Any

import torch

from ..info import TensorInfo
from .base import MergeMethod, Prepass
from .mergekit import Mergekit

EPS = 1e-8
BLOCK_ELEMS = 1 << 20        # rows per block of the fp64 softmax temporaries


def _kl_rows(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """KL(softmax(W0 + Δ) + ε ‖ softmax(W0) + ε) of each row (last dimension), as an fp64 column.

    fp64: for an expert close to the base p/q − 1 is ~1e-3, and fp32 would leave the KL ~1e-4 relative error,
    enough to move entries across the threshold."""
    a = w0.to(delta.device, torch.float64)
    p = torch.softmax(a + delta.double(), dim=-1).add_(EPS)
    q = torch.softmax(a, dim=-1).add_(EPS)
    return (p * torch.log(p / q)).sum(dim=-1, keepdim=True)


QUANTILES = (0.25, 0.5, 0.75)
_DIGIT = 1 << 16
_SIGN = -(1 << 63)
_SLAB = 1 << 17


def importance_of(info: TensorInfo, w0: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ as rows along the stored tensor's last dimension, |Δ|·KL of each entry in fp64, the same shape)."""
    d = delta
    if info.transposed:                   # rows along the stored tensor's last dimension, as mergekit reads it
        w0, d = w0.mT, d.mT
    width = d.shape[-1] if d.dim() else 1
    rows_w0, rows_d = w0.reshape(-1, width), d.reshape(-1, width)
    importance = torch.empty(rows_d.shape, dtype=torch.float64, device=rows_d.device)
    step = max(1, BLOCK_ELEMS // max(1, rows_d.shape[1]))
    for r in range(0, rows_d.shape[0], step):
        block = rows_d[r:r + step]
        torch.mul(block.abs().double(), _kl_rows(rows_w0[r:r + step], block), out=importance[r:r + step])
    return rows_d, importance


def _keys(x: torch.Tensor) -> torch.Tensor:
    """fp64 values as int64 keys in the values' order, offset to unsigned order (the sign bit flipped): a slightly
    negative KL from rounding orders below 0 as it should."""
    bits = x.view(torch.int64)
    return torch.where(bits < 0, bits ^ ~_SIGN, bits) ^ _SIGN


class FusionPrepass(Prepass):
    """q1, the median and q3 of the tensor's importance, exact: round r counts the r-th 16 bits (from the top) of
    the keys whose higher bits are each quantile's prefix found so far."""

    scope = "tensor"
    rounds = 4

    def __init__(self, n_experts: int, params: Any) -> None:
        super().__init__(n_experts, params)
        self.n = 0
        self.prefix = [0] * len(QUANTILES)    # each quantile's key bits found so far
        self.rank = [0] * len(QUANTILES)      # its rank (1-indexed) among the keys with that prefix
        self.counts_ = [torch.zeros(_DIGIT, dtype=torch.int64) for _ in QUANTILES]

    def observe(self, round_: int, info: TensorInfo, t: int, delta: torch.Tensor) -> None:
        if round_ == 0:
            self.n += delta.numel()
        _, importance = importance_of(info, self.base, delta)
        shift = 48 - 16 * round_
        for part in importance.view(-1).split(_SLAB):
            keys = _keys(part)
            digit = keys.bitwise_right_shift(shift).bitwise_and_(_DIGIT - 1)
            if round_ == 0:                   # one histogram serves every quantile
                self.counts_[0] += torch.bincount(digit, minlength=_DIGIT).cpu()
                continue
            high = keys.bitwise_right_shift(shift + 16)
            for j, count in enumerate(self.counts_):
                count += torch.bincount(digit[high == _signed(self.prefix[j]) >> (shift + 16)],
                                        minlength=_DIGIT).cpu()

    def counts(self, round_: int) -> list[torch.Tensor]:
        return self.counts_

    def end_round(self, round_: int) -> None:
        if not self.n:
            return
        shift = 48 - 16 * round_
        for j, q in enumerate(QUANTILES):
            counts = self.counts_[0 if round_ == 0 else j]
            rank = int(q * (self.n - 1)) + 1 if round_ == 0 else self.rank[j]
            digit, self.rank[j] = _locate(counts, rank)
            self.prefix[j] |= digit << shift
        self.counts_ = [torch.zeros(_DIGIT, dtype=torch.int64) for _ in QUANTILES]

    def state(self) -> float | None:
        """The threshold median + 1.5·(q3 − q1) (fp64), None for an empty tensor."""
        if not self.n:
            return None
        keys = torch.tensor([_signed(p) for p in self.prefix], dtype=torch.int64) ^ _SIGN
        q1, median, q3 = torch.where(keys < 0, keys ^ ~_SIGN, keys).view(torch.float64).tolist()
        return median + 1.5 * (q3 - q1)


def _signed(key: int) -> int:
    """An unsigned 64-bit key as the int64 torch holds (arithmetic shifts agree with torch's)."""
    return key - (1 << 64) if key >= 1 << 63 else key


def _locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the ``rank``-th smallest entry (1-indexed), and that entry's rank inside the bin."""
    cumulative = counts.cumsum(0)
    index = int(torch.searchsorted(cumulative, rank))
    return index, rank - (int(cumulative[index - 1]) if index else 0)


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "W0 + Δ where |Δ|·KL(softmax rows) reaches median + 1.5 IQR of the tensor, else W0 (mergekit)"
    needs_base = True
    fixed_experts = 1
    combines = "fuses the base with one expert"
    mergekit = Mergekit("arcee_fusion")
    prepass = FusionPrepass

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None, **setup: Any) -> None:
        super().__init__(info, n_experts, params, state, **setup)
        self.delta: torch.Tensor | None = None
        self.kept = 0.0

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if delta.numel() == 0:
            self.delta = delta.clone()
            return
        rows_d, importance = importance_of(self.info, self.base, delta)
        keep = importance >= self.state
        del importance
        self.kept = float(keep.float().mean())
        kept = torch.where(keep, rows_d, 0.0).view(delta.mT.shape if self.info.transposed else delta.shape)
        self.delta = kept.mT.contiguous() if self.info.transposed else kept

    def finalize(self) -> torch.Tensor:
        return self.delta

    def stats(self) -> dict[str, float]:
        return {"kept_fraction": self.kept}

    @classmethod
    def row_chunkable(cls, params: Any, info: TensorInfo) -> bool:
        return True

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 13 * info.numel + 40 * min(info.numel, BLOCK_ELEMS)   # fp64 importance, mask, result; fp64 blocks
