"""X·S = N for a symmetric PSD S = A + ridge·I held in fp64: the solve of the covariance rules (ALGORITHMS.md §1).

Why fp64 statistics and refinement: a LoRA fine-tune's task vector is rank r plus rounding, so A = Σ w ΔᵀΔ is
rank-deficient and S's condition is 1e4 to 1e5 once the ridge applies. Rounding A and N to fp32 alone moves the answer
by ~κ·u32 ≈ 5e-3 (issue 17), whatever the solver; accumulated in fp64 they carry the problem to ~κ·u64, and the solve
keeps that accuracy with an fp32 Cholesky factor refined by fp64 residuals R = N − X·S (each step multiplies the error
by ~κ·u32; two or three steps reach fp64 level). Where fp32 cannot converge (κ ≳ 1e6) the factor is taken in fp64.

A singular S (ridge 0, or a ridge under pinv's cut-off n·eps64·λmax) means the pseudo-inverse, as the references'
``torch.linalg.pinv``. There the factor is of A + c·I with a floor c = FLOOR·‖A‖F and the same refinement against S
is iterated Tikhonov: on an eigenvalue λ of the range the error shrinks by c/(λ + c) per step, so the iteration
converges to N·pinv(S) on every eigenvalue well above c, while directions pinv cuts (λ ≈ 0, where N is rounding)
gain only rounding/c per step. No eigendecomposition: Cholesky always (eigh stays as the last resort of a factor
that fails, which the floor prevents for PSD A).
Rows are solved in blocks (each row of X depends only on the same row of N), so the temporaries are O(block·n).
"""
from __future__ import annotations

import math

import torch

EPS64 = torch.finfo(torch.float64).eps
FLOOR = 1e-7            # the preconditioner's shift for a singular S, relative to ‖A‖F
MAX_STEPS = 12          # refinement steps per row block
CONVERGED = 2e-8        # a correction this small (relative to X) ends it: the rest is ~κ·u32 times that, below fp32
ROW_BLOCK_VALUES = 1 << 22  # rows per block: about this many values of an (rows, n) temporary


def row_block(n: int) -> int:
    return max(1, ROW_BLOCK_VALUES // max(n, 1))


def solve_spd_right(a: torch.Tensor, nn: torch.Tensor, ridge: float, full_dim: int | None = None,
                    out: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """X with X·(a + ridge·I) = nn (pseudo-inverse where that matrix is singular at fp64 resolution), as fp32.

    a: (n, n) fp64 symmetric PSD, overwritten (its diagonal gets the shift); nn: (m, n) fp64, read only. out: an
    (m, n) fp32 tensor to write X into. full_dim: a is the core QᵀAQ of a full_dim × full_dim matrix whose other
    eigenvalues are 0 (LoRA core space): pinv's cut-off and the floor are those of the full matrix.
    Stats: cond_est (of the factored matrix, from its Cholesky diagonal), steps (largest over row blocks),
    fp64_factor (1 when fp32 could not serve), pinv (1 when S was singular and the floor applied).
    """
    system = SpdSystem(a, ridge, full_dim)
    return system.solve(nn, out), system.stats


class SpdSystem:
    """S = a + ridge·I shifted and factored once, then solved for any number of right-hand row sets: a tall LIN
    tensor's rows arrive in chunks (covariance.py), and each row of X depends only on the same row of N.

    Holds a (the caller's, overwritten by the shift), its fp32 Cholesky factor and, made on the first row block
    that needs it, the fp64 one. ``stats`` accumulate over every ``solve``.
    """

    def __init__(self, a: torch.Tensor, ridge: float, full_dim: int | None = None) -> None:
        n = a.shape[0]
        big = full_dim or n
        norm = float(torch.linalg.matrix_norm(a))   # ‖A‖F ≥ λmax; the full matrix's other eigenvalues are 0
        singular = ridge <= big * EPS64 * (norm + ridge)   # pinv of S would cut eigenvalues here
        shift = max(ridge, FLOOR * norm) if singular else ridge
        a.diagonal().add_(shift)
        self.a = a
        self.extra = shift - ridge          # X·S = X·F − extra·X, F = a after the shift
        self.stats = {"cond_est": 1.0, "steps": 0.0, "fp64_factor": 0.0, "pinv": float(singular)}
        self.factors: list[torch.Tensor] = []
        if not singular:
            chol, info = torch.linalg.cholesky_ex(a.float())
            if int(info) == 0:
                self.factors.append(chol)

    def solve(self, nn: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """X (m, n) fp32 with X·S = nn (m, n) fp64 (read only), written into ``out`` if given."""
        n = self.a.shape[0]
        out = torch.empty(nn.shape, dtype=torch.float32, device=nn.device) if out is None else out
        for start in range(0, nn.shape[0], row_block(n)):
            rows = nn[start:start + row_block(n)]
            x = None
            for factor in _factors(self.a, self.factors, self.stats):
                x, ok = _refined(self.a, self.extra, factor, rows, self.stats, last=factor.dtype == torch.float64)
                if ok:
                    break
            out[start:start + rows.shape[0]] = x
        return out


def merge_stats(stats: dict[str, float], one: dict[str, float], ridge: float) -> None:
    """Fold one matrix's solve stats into a tensor's: the worst condition and step count, the largest ridge, how many
    matrices took an fp64 factor or the pseudo-inverse."""
    stats["cond_est"] = max(stats["cond_est"], one["cond_est"])
    stats["ridge"] = max(stats["ridge"], ridge)
    stats["steps"] = max(stats["steps"], one["steps"])
    stats["fp64_factor"] += one["fp64_factor"]
    stats["pinv"] += one["pinv"]


def _factors(a: torch.Tensor, factors: list[torch.Tensor], stats: dict[str, float]):
    """The fp32 factor if there is one, then the fp64 factor (made once, on demand)."""
    if factors and factors[0].dtype == torch.float32:
        _note_cond(factors[0], stats)
        yield factors[0]
    if not factors or factors[-1].dtype != torch.float64:    # made once, kept for the next row blocks
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:   # not positive definite even in fp64 (A was not PSD): add the floor once more
            a.diagonal().add_(FLOOR * float(torch.linalg.matrix_norm(a)))
            chol = torch.linalg.cholesky(a)
        factors.append(chol)
        stats["fp64_factor"] = 1.0
    _note_cond(factors[-1], stats)
    yield factors[-1]


def _note_cond(chol: torch.Tensor, stats: dict[str, float]) -> None:
    diag = chol.diagonal()
    stats["cond_est"] = max(stats["cond_est"], float(diag.max() / diag.min()) ** 2)


def _apply(factor: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """r·F⁻¹ in fp64 for F = L·Lᵀ: two triangular solves on rᵀ in the factor's precision."""
    rhs = r.T.to(factor.dtype, copy=True)                       # (n, rows), column-major as LAPACK takes it
    torch.linalg.solve_triangular(factor, rhs, upper=False, out=rhs)
    torch.linalg.solve_triangular(factor.T, rhs, upper=True, out=rhs)
    return rhs.T.double()


def _refined(a: torch.Tensor, extra: float, factor: torch.Tensor, rows: torch.Tensor, stats: dict[str, float],
             last: bool) -> tuple[torch.Tensor, bool]:
    """Rows of X by X₀ = N·F⁻¹, then X += (N − X·S)·F⁻¹ with the residual in fp64; ok = converged (or last)."""
    x = _apply(factor, rows)
    previous = math.inf
    for step in range(1, MAX_STEPS + 1):
        residual = torch.addmm(rows, x, a, alpha=-1.0)         # N − X·F, in one buffer
        if extra:
            residual.add_(x, alpha=extra)
        correction = _apply(factor, residual)
        del residual
        x.add_(correction)
        size = float(correction.norm()) / max(float(x.norm()), 1e-300)
        del correction
        stats["steps"] = max(stats["steps"], float(step))
        if size <= CONVERGED:
            return x, True
        if size > 0.5 * previous:   # stalled: the fp32 factor is too coarse for S (redo in fp64), or in fp64
            return x, last          # the corrections are down to the rounding of N and S
        previous = size
    return x, last
