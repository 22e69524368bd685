"""X·S = N for a symmetric PSD S = A + ridge·I held in fp64: the solve of the covariance rules (ALGORITHMS.md §1).

Why fp64: a LoRA fine-tune's task vector is rank r plus rounding, so A = Σ w ΔᵀΔ is rank-deficient and S's condition
is 1e4 to 1e5 once the ridge applies. Rounding A and N to fp32 alone moves the answer by ~κ·u32 ≈ 5e-3 (issue 17),
whatever the solver; accumulated in fp64 they carry the problem to ~κ·u64. S is factored once by an fp64 Cholesky in
A's own memory, and each row block of X = N·S⁻¹ is two fp64 triangular solves over the factor: a backward-stable
solve, ‖ΔX‖/‖X‖ ≲ n·κ·u64.

Why not an fp32 factor refined by fp64 residuals (this module until issue 17 §2's speed step): every refinement step
costs an fp64 product X·S of 2mn² FLOPs, the price of the fp64 triangular solves it was to avoid, and at κ ≈ 1e4–1e5
two to four steps were needed. On bench/speed.py's 1024/2816 layer the seven matrices' solves took 3.10 s refined
and 0.92 s in fp64, with the same answer (2.5e-8 from an fp64 ``torch.linalg.solve``: the fp32 output's rounding).
On a GPU whose fp64 runs at 1/32–1/64 of fp32 the triangular solves cost what one step's residual did.

A singular S (ridge 0, or a ridge under pinv's cut-off n·eps64·‖S‖) means the pseudo-inverse, as the references'
``torch.linalg.pinv``. There the factor is of F = A + c·I with a floor c = FLOOR·‖A‖F, and with S = F − extra·I the
iteration X ← X₀ + extra·X·F⁻¹ from X₀ = N·F⁻¹ is iterated Tikhonov: on an eigenvalue λ of the range the error shrinks
by c/(λ + c) per step, so it converges to N·pinv(S) on every eigenvalue well above c, while directions pinv cuts
(λ ≈ 0, where N is rounding) gain only rounding/c per step. No eigendecomposition.

One mechanism for every size: A is a tiled_spd.PackedLower, one stripe (the whole matrix, factored by one LAPACK
call) or, where n² fp64 values are large, row stripes of tiles factored in place by a blocked Cholesky (tiled_sums.py).
Rows are solved in blocks (each row of X depends only on the same row of N), so the temporaries are O(block·n).
"""
from __future__ import annotations

import math

import torch

from .tiled_spd import PackedLower, apply_inverse, factor_in_place, unfactor

EPS64 = torch.finfo(torch.float64).eps
FLOOR = 1e-7            # the shift for a singular S, relative to ‖A‖F
MAX_STEPS = 12          # Tikhonov steps per row block (singular S only)
CONVERGED = 2e-8        # a step changing X by this little (relative) ends it: below the fp32 output's rounding
ROW_BLOCK_VALUES = 1 << 22  # rows per block: about this many values of an (rows, n) temporary
SOLVE_TEMPS = 4   # (rows, n) fp64 values a row block holds at most: on a singular S, X, the copy that F⁻¹ is applied
                  # to, and LAPACK's result (dense) or a stripe's product (tiled) beside it, then X's fp32 copy;
                  # X₀ is N's own rows. A non-singular S needs one (LAPACK's result) and the fp32 copy.


def row_block(n: int) -> int:
    return max(1, ROW_BLOCK_VALUES // max(n, 1))


def solve_spd_right(a: torch.Tensor, nn: torch.Tensor, ridge: float, full_dim: int | None = None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """X with X·(a + ridge·I) = nn (pseudo-inverse where that matrix is singular at fp64 resolution), as fp32.

    a: (n, n) fp64 symmetric PSD, overwritten by its factor; nn: (m, n) fp64, overwritten. out: an (m, n) fp32 tensor
    to write X into. full_dim: a is the core QᵀAQ of a full_dim × full_dim matrix whose other eigenvalues are 0 (LoRA
    core space): pinv's cut-off and the floor are those of the full matrix.
    """
    system = SpdSystem(PackedLower.whole(a), ridge, full_dim)
    return system.solve(nn, out), system.stats


class SpdSystem:
    """S = a + ridge·I shifted and factored in place once (a is the caller's, consumed), then solved for any number
    of right-hand row sets: a tall LIN tensor's rows arrive in chunks (covariance.py).

    Stats: cond_est (of the factored matrix, from its Cholesky diagonal), steps (Tikhonov steps, largest over row
    blocks; 0 where S is not singular), pinv (1 when S was singular and the floor applied).
    """

    def __init__(self, a: PackedLower, ridge: float, full_dim: int | None = None) -> None:
        norm = a.frobenius()        # ‖A‖F ≥ λmax; a LoRA core's full matrix has no other nonzero eigenvalue
        singular = ridge <= (full_dim or a.n) * EPS64 * (norm + ridge)    # pinv of S would cut eigenvalues here
        shift = max(ridge, FLOOR * norm) if singular else ridge
        a.add_diagonal(shift)
        failed = factor_in_place(a)
        if failed >= 0:      # not positive definite even in fp64 (A was not PSD): add the floor once more
            unfactor(a, failed)
            a.add_diagonal(FLOOR * a.frobenius())      # part of S from here on
            if factor_in_place(a) >= 0:
                raise torch.linalg.LinAlgError("the covariance statistic is not positive semi-definite")
        self.a = a
        self.extra = shift - ridge          # X·S = X·F − extra·X
        diag = torch.cat([a.diag(j).diagonal() for j in range(len(a.stripes))])
        self.stats = {"cond_est": float(diag.max() / diag.min()) ** 2, "steps": 0.0, "pinv": float(singular)}

    def solve(self, nn: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """X (m, n) into ``out`` (fp32, or fp64; a new fp32 tensor if None) with X·S = nn (m, n) fp64, overwritten.
        ``out`` may be nn's own
        storage read as fp32 (its first half): each row block is written behind the rows still to be read (the first
        through an fp32 copy, as it overlaps its own rows)."""
        out = torch.empty(nn.shape, dtype=torch.float32, device=nn.device) if out is None else out
        block = row_block(self.a.n)
        for start in range(0, nn.shape[0], block):
            x = self._rows(nn[start:start + block]).to(out.dtype)
            out[start:start + x.shape[0]].copy_(x)
        return out

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        """X for one row block: X₀ = rows·F⁻¹ (in place), then X ← X₀ + extra·X·F⁻¹ until the change is below
        CONVERGED or stops halving (the rounding of N and S)."""
        x0 = apply_inverse(self.a, rows)
        if not self.extra:
            return x0
        x, previous = x0.clone(), math.inf
        for step in range(1, MAX_STEPS + 1):
            nxt = apply_inverse(self.a, x.clone()).mul_(self.extra).add_(x0)
            size = float(torch.linalg.vector_norm(nxt.sub(x))) / max(float(torch.linalg.vector_norm(nxt)), 1e-300)
            x = nxt
            self.stats["steps"] = max(self.stats["steps"], float(step))
            if size <= CONVERGED or size > 0.5 * previous:
                break
            previous = size
        return x


def merge_stats(stats: dict[str, float], one: dict[str, float], ridge: float) -> None:
    """Fold one matrix's solve stats into a tensor's: the worst condition and step count, the largest ridge, how many
    matrices took the pseudo-inverse."""
    stats["cond_est"] = max(stats["cond_est"], one["cond_est"])
    stats["ridge"] = max(stats["ridge"], ridge)
    stats["steps"] = max(stats["steps"], one["steps"])
    stats["pinv"] += one["pinv"]
