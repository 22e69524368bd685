"""Arcee Fusion, as mergekit's ``arcee_fusion``: the base and one expert; only the expert's most important changes
are kept.

Per element, importance = |Δ| · KL(softmax(W1 row) + ε ‖ softmax(W0 row) + ε) with ε = 1e-8 and the rows along
the stored tensor's last dimension (a vector is one row), in fp64; the threshold is median + 1.5·(q3 − q1) of every
importance of the tensor, each quantile the element at index ⌊q·(n − 1)⌋ of the sorted values; Δ* = Δ where
importance ≥ threshold, else 0. mergekit estimates the quantiles from a random sample of 10⁶ elements for larger
tensors; here they are exact for every size (the same numbers up to 10⁶ elements, deterministic beyond).
The quantiles are the tensor's, so the rule takes whole tensors: the importance and row blocks of temporaries.
"""
from __future__ import annotations

from typing import Any

import torch

from ..info import TensorInfo
from .base import MergeMethod
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


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The element at index ⌊q·(n − 1)⌋ of the sorted values (mergekit's approximate_quantiles, unsampled)."""
    return torch.kthvalue(x, int(q * (x.numel() - 1)) + 1).values


class ArceeFusion(MergeMethod):
    name = "arcee_fusion"
    summary = "W0 + Δ where |Δ|·KL(softmax rows) reaches median + 1.5 IQR of the tensor, else W0 (mergekit)"
    needs_base = True
    fixed_experts = 1
    combines = "fuses the base with one expert"
    mergekit = Mergekit("arcee_fusion")

    def __init__(self, info: TensorInfo, n_experts: int, params: Any, state: Any = None) -> None:
        super().__init__(info, n_experts, params, state)
        self.delta: torch.Tensor | None = None
        self.kept = 0.0

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        w0, d = self.base, delta
        if self.info.transposed:              # rows along the stored tensor's last dimension, as mergekit reads it
            w0, d = w0.mT, d.mT
        width = d.shape[-1] if d.dim() else 1
        rows_w0, rows_d = w0.reshape(-1, width), d.reshape(-1, width)
        if rows_d.numel() == 0:
            self.delta = delta.clone()
            return
        importance = torch.empty(rows_d.shape, dtype=torch.float64, device=rows_d.device)
        step = max(1, BLOCK_ELEMS // max(1, rows_d.shape[1]))
        for r in range(0, rows_d.shape[0], step):
            block = rows_d[r:r + step]
            torch.mul(block.abs().double(), _kl_rows(rows_w0[r:r + step], block), out=importance[r:r + step])
        flat = importance.view(-1)
        q1, median, q3 = (_quantile(flat, q) for q in (0.25, 0.5, 0.75))
        keep = importance >= median + 1.5 * (q3 - q1)
        self.kept = float(keep.float().mean())
        kept = torch.where(keep, rows_d, 0.0).view(d.shape)
        self.delta = kept.mT.contiguous() if self.info.transposed else kept

    def finalize(self) -> torch.Tensor:
        return self.delta

    def stats(self) -> dict[str, float]:
        return {"kept_fraction": self.kept}

    @staticmethod
    def state_bytes(info: TensorInfo, n_experts: int, params: Any) -> int:
        return 13 * info.numel + 40 * min(info.numel, BLOCK_ELEMS)   # fp64 importance, mask, result; fp64 blocks
