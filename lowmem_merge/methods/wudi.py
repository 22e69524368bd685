"""WUDI-Merging, Adam version (ALGORITHMS.md §4.1; `vit/wudi_main.py::get_redundant_task_vector`).

LIN, per (m, n) matrix, w_t = 1/‖Δt‖F²: minimize L(τ) = Σ_t w_t ‖(τ − Δt) Δtᵀ‖F² with torch.optim.Adam (lr, betas
(0.9, 0.999), eps 1e-8, no weight decay) for ``steps`` steps from τ⁰ = Σ_t Δt. Other tensors: mean of Δt.
Streaming, exact: ∇L = 2(τA − B) with A = Σ w ΔᵀΔ (n×n) and B = Σ w Δ(ΔᵀΔ) (m×n), accumulated in one pass with
S = Σ Δ, so Adam never sees the experts again: memory n² + 2mn plus a row block's Adam gradient and moments,
whatever T.
L(τ) = tr(τAτᵀ) − 2 tr(τBᵀ) + Σ w ‖ΔᵀΔ‖F² is reported before and after (stats loss_before, loss_after; summed over
the matrices of a batched tensor). An expert whose Δt is exactly zero at a matrix has no weight there (1/0).
The trajectory equals the reference's mathematically, not bitwise: Adam divides by √v̂ + 1e-8, which amplifies
rounding where the gradient is ~0 (§11.3), so entries move by up to ~lr per step there.
Tall matrices (m ≥ 3n: an LM head) run in row chunks (tall.py): each row of τ sees only its own rows of B and S and
the whole A, and Adam is elementwise, so a per-tensor prepass gathers every expert's fp32 Gram G_t, the first chunk
forms w_t and A, and each chunk descends on its rows with B[rows] = Σ w_t Δt[rows] G_t. Within the tolerance of the
whole-tensor path (the Gram sums run in another order), not bitwise; the losses are not reported there.
Inside a matrix, Adam runs in row blocks of about ROW_BLOCK_ELEMS values (issue 17 §3: a 70B down_proj): the
gradient's rows are 2(τ[rows]A − B[rows]) and Adam is elementwise, so each block takes its full ``steps`` with only
its own gradient and moments, and the matrix holds A, B and τ plus one block's temporaries. B = Σ w (ΔΔᵀ)Δ is
gathered in the same row blocks when rows go first. The same trajectory per row, but not always bitwise the
whole-matrix path: BLAS picks its kernel by shape, so a block's product may round otherwise (measured on this CPU:
bitwise for most small splits, not for 300×2000 ones); within the rule's tolerance (tests/test_wide_rows.py). A
matrix of up to ROW_BLOCK_ELEMS values is one block, today's path op for op.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..errors import ConfigError
from ..info import TensorClass, TensorInfo
from .covariance import rows_first
from .gram import add_gram
from .matrix_rule import MatrixRule
from .tall import ExpertGrams, TallRowChunks, TallState

ROW_BLOCK_ELEMS = 1 << 23   # fp32 values of one row block's buffer (32 MiB): a block of a 70B down_proj is 293 rows


@dataclasses.dataclass(frozen=True)
class WudiParams:
    lr: float = 1e-5
    steps: int = 300

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ConfigError(f"wudi: lr={self.lr} must be a finite number >= 0", hint="e.g. -p lr=1e-5")
        if self.steps < 0:
            raise ConfigError(f"wudi: steps={self.steps} must be >= 0", hint="e.g. -p steps=300")


class WudiGrams(ExpertGrams):
    """The fp32 Grams of a tall tensor's experts (tall.py), as the whole-tensor path forms them."""

    dtype = torch.float32

    @classmethod
    def piece_bytes(cls, whole: TensorInfo, piece: TensorInfo, n_experts: int, params: Any) -> int:
        """T Grams and A; per chunk τ, B, Adam's gradient and two moments, and one product's temporary (fp32)."""
        n = whole.shape[-1]
        return 4 * ((n_experts + 1) * n * n + 6 * piece.shape[0] * n)


class Wudi(TallRowChunks, MatrixRule):
    name = "wudi"
    summary = "LIN: WUDI-Merging, Adam from the sum of task vectors on Σ ‖(τ − Δt)Δtᵀ‖²/‖Δt‖²; other tensors: mean"
    Params = WudiParams
    param_help = {"lr": "Adam learning rate (paper and ViT code 1e-5, RoBERTa code 2e-5)",
                  "steps": "Adam steps (paper 300; fusion_bench's config 400)"}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._a: torch.Tensor | None = None    # A = Σ w ΔᵀΔ, (B, n, n) fp32
        self._b: torch.Tensor | None = None    # B = Σ w Δ ΔᵀΔ, (B, m, n) fp32
        self._sum: torch.Tensor | None = None  # S = Σ Δ, (B, m, n) fp32
        self._const: list[float] = []          # Σ w ‖ΔᵀΔ‖F² per matrix
        self._tall: TallState | None = self.state if self._mean is None else None   # a chunk of a tall tensor

    prepass = WudiGrams

    def _add_matrices(self, t: int, d: torch.Tensor, pass_: int) -> None:
        if self._tall is not None:
            return self._add_rows(t, d[0])
        batch, m, n = d.shape
        if self._a is None:
            self._a, self._b, self._sum = d.new_zeros(batch, n, n), d.new_zeros(batch, m, n), d.clone(memory_format=torch.contiguous_format)
            self._const = [0.0] * batch
        else:
            self._sum.add_(d)
        for e, (x, norm) in enumerate(zip(d, torch.linalg.vector_norm(d, dim=(1, 2)).tolist())):
            if norm == 0:
                continue
            w = 1.0 / (norm * norm)
            if rows_first(m, n):
                add_gram(self._a[e], x, alpha=w)
                for rows in row_blocks(m, m):
                    outer = x[rows] @ x.T  # (rows, m): these rows of ΔΔᵀ; ‖ΔΔᵀ‖F = ‖ΔᵀΔ‖F
                    self._b[e][rows].addmm_(outer, x, alpha=w)
                    self._const[e] += w * float(torch.linalg.matrix_norm(outer)) ** 2
            else:
                outer = x.T @ x  # (n, n)
                self._a[e].add_(outer, alpha=w)
                self._b[e].addmm_(x, outer, alpha=w)
                self._const[e] += w * float(torch.linalg.matrix_norm(outer)) ** 2

    def _add_rows(self, t: int, x: torch.Tensor) -> None:
        """τ[rows] += Δt[rows], B[rows] += w_t Δt[rows] G_t (tall path)."""
        grams, weights, _ = self._tall.system(_weighted)
        if self._sum is None:
            self._sum, self._b = x.clone(memory_format=torch.contiguous_format), x.new_zeros(x.shape)
        else:
            self._sum.add_(x)
        if weights[t]:
            self._b.addmm_(x, grams[t], alpha=weights[t])

    def _finalize_matrices(self) -> torch.Tensor:
        if self._tall is not None:
            tau, b, self._sum, self._b = self._sum, self._b, None, None
            self._descend(tau, self._tall.system(_weighted)[2], b)
            return tau.unsqueeze(0)
        tau, a, b, self._a, self._b, self._sum = self._sum, self._a, self._b, None, None, None
        before = after = 0.0
        for e in range(tau.shape[0]):
            before += self._loss(tau[e], a[e], b[e], self._const[e])
            self._descend(tau[e], a[e], b[e])
            after += self._loss(tau[e], a[e], b[e], self._const[e])
        self._stats = {"loss_before": before, "loss_after": after}
        return tau

    def _descend(self, tau: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``steps`` Adam steps on τ (m, n) in place, gradient 2(τA − B), one row block after the other."""
        for rows in row_blocks(*tau.shape):
            self._descend_rows(tau[rows], a, b[rows])

    def _descend_rows(self, tau: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``steps`` Adam steps on rows τ (r, n) of τ in place, with B's same rows b (r, n).

        torch.optim.Adam's single-tensor update (lr, betas (0.9, 0.999), eps 1e-8, no weight decay), op for op, so
        the trajectory is bitwise torch's; written out because torch's step allocates √v and √v/c₂ as two more
        temporaries, where here the gradient's buffer takes the denominator once the moments have used it.
        """
        beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, self.params.lr
        grad, avg, avg_sq = (torch.zeros_like(tau) for _ in range(3))
        for step in range(1, self.params.steps + 1):
            torch.addmm(b, tau, a, beta=-2.0, alpha=2.0, out=grad)
            avg.lerp_(grad, 1 - beta1)
            avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            torch.sqrt(avg_sq, out=grad).div_((1 - beta2 ** step) ** 0.5).add_(eps)  # the denominator, in grad
            tau.addcdiv_(avg, grad, value=-(lr / (1 - beta1 ** step)))

    @staticmethod
    def _loss(tau: torch.Tensor, a: torch.Tensor, b: torch.Tensor, const: float) -> float:
        """tr(τAτᵀ) − 2 tr(τBᵀ) + Σ w ‖ΔᵀΔ‖F², in fp64 scalars from fp32 products of one row block at a time."""
        total = 0.0
        for rows in row_blocks(*tau.shape):
            t, part = tau[rows], b[rows]
            total += float((t @ a).mul_(t).sum(dtype=torch.float64) - 2 * (t * part).sum(dtype=torch.float64))
        return total + const

    @classmethod
    def _matrix_floats(cls, batch: int, m: int, n: int, n_experts: int, params: Any) -> int:
        """A, B and τ of every matrix, and the larger temporary of one matrix: its Gram ΔᵀΔ (n²), or a row block of
        ΔΔᵀ when rows go first; Adam's gradient and two moments of one row block (τ[rows]A for the loss is one)."""
        return max(cls._phase_floats(batch, m, n))

    @staticmethod
    def _phase_floats(batch: int, m: int, n: int) -> tuple[int, int]:
        add = block_rows(m, m) * m if rows_first(m, n) else n * n
        descend = 3 * block_rows(m, n) * n
        return batch * (n * n + 2 * m * n) + add, batch * (n * n + 2 * m * n) + descend

    @classmethod
    def phase_bytes(cls, info: TensorInfo, n_experts: int, params: Any) -> tuple[int, int] | None:
        """A, B and S with one add's temporary; then A, B and τ (S's memory, the result) with a row block's Adam."""
        if info.cls != TensorClass.LIN:
            return None
        *lead, m, n = info.shape
        adding, finishing = cls._phase_floats(math.prod(lead), m, n)
        return 4 * adding, 4 * finishing


def block_rows(m: int, n: int) -> int:
    """Rows of the largest of ``row_blocks(m, n)``."""
    return -(-m // _block_count(m, n))


def row_blocks(m: int, n: int) -> list[slice]:
    """The rows of an (m, n) matrix in near-equal blocks of at most about ROW_BLOCK_ELEMS values, each of ≥ 2 rows
    when m ≥ 2 (a one-row product would take torch's matrix-vector path)."""
    count = _block_count(m, n)
    size, extra = divmod(m, count)
    starts = [i * size + min(i, extra) for i in range(count + 1)]
    return [slice(lo, hi) for lo, hi in zip(starts, starts[1:])]


def _block_count(m: int, n: int) -> int:
    return max(1, min(m // 2, -(-m * n // ROW_BLOCK_ELEMS)))


def _weighted(grams: list[torch.Tensor | None]) -> tuple[list[torch.Tensor | None], list[float], torch.Tensor]:
    """(G_t, w_t = 1/tr G_t (0 for a zero Δt), A = Σ w_t G_t) of a tall tensor, fp32."""
    weights = [1.0 / float(g.trace()) if g is not None and float(g.trace()) > 0 else 0.0 for g in grams]
    a = None
    for g, w in zip(grams, weights):
        if w:
            a = g.mul(w) if a is None else a.add_(g, alpha=w)
    n = next(g.shape[0] for g in grams if g is not None)
    return grams, weights, a if a is not None else grams[0].new_zeros(n, n)
