"""fp64 reference rules, written from ALGORITHMS.md with no streaming code: every expert's tensor is at hand at once.

A model is ``{name: (info, [Δ_1, ..., Δ_T])}`` with fp64 task vectors; every rule returns ``{name: Δ*}``.
Nothing here imports lowmem_merge.methods: the point is an independent second implementation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from lowmem_merge.info import TensorClass, TensorInfo

Model = dict[str, tuple[TensorInfo, list[torch.Tensor]]]


# ---- §7: average, task arithmetic -----------------------------------------------------------------------------

def average(taus: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(taus).mean(0)


def task_arithmetic(taus: list[torch.Tensor], scale: float) -> torch.Tensor:
    return scale * torch.stack(taus).sum(0)


# DARE has no reference here on purpose: re-using the mask generation would test nothing. Its tests check the
# properties of §11.6 instead (E[DARE] = task arithmetic, zero fraction, fixed seed, density 1 = task arithmetic).


# ---- §1, §2, §4.2: the covariance rules -------------------------------------------------------------------------

def covariance_system(taus: list[torch.Tensor], weights: list[float], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Σ w_t (ΔtᵀΔt + ε I), N = Σ w_t Δt (ΔtᵀΔt + ε I) for (m, n) task vectors (ALGORITHMS.md §1)."""
    n = taus[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    a = sum(w * (x.T @ x + eps * eye) for w, x in zip(weights, taus))
    nn = sum(w * x @ (x.T @ x + eps * eye) for w, x in zip(weights, taus))
    return a, nn


def actmat_matrix(taus: list[torch.Tensor], rho: float, weights: list[float] | None = None) -> torch.Tensor:
    """§2 delta form: Δ* = N (A + ρ·(tr A/n)·I)⁻¹, or N A⁺ for ρ = 0; A = 0 gives 0. ``weights`` scale each task's
    terms (§11.3 property 3 compares WUDI-CFS with ω = 0 to ACTMat with weights 1/‖Δt‖²)."""
    a, nn = covariance_system(taus, weights or [1.0] * len(taus), 0.0)
    if torch.trace(a) == 0:
        return torch.zeros_like(taus[0])
    if rho == 0:
        return nn @ torch.linalg.pinv(a, hermitian=True)
    n = a.shape[0]
    ridged = a + rho * torch.trace(a) / n * torch.eye(n, dtype=torch.float64)
    return torch.linalg.solve(ridged, nn.T).T  # ridged is symmetric


def wudi_cfs_matrix(taus: list[torch.Tensor], omega: float) -> torch.Tensor:
    """§4.2: w_t = 1/‖Δt‖F², Δ* = N_ω pinv(A_ω). A zero Δt has no weight and is left out (the limit as it shrinks)."""
    kept = [x for x in taus if torch.count_nonzero(x)]
    if not kept:
        return torch.zeros_like(taus[0])
    a, nn = covariance_system(kept, [1.0 / float(x.norm()) ** 2 for x in kept], omega)
    return nn @ torch.linalg.pinv(a, hermitian=True)


def per_matrix(rule: Callable[[list[torch.Tensor]], torch.Tensor], taus: list[torch.Tensor]) -> torch.Tensor:
    """Apply a 2-D rule to every (out, in) matrix of a (..., out, in) LIN tensor (mixture-of-experts weights, §13)."""
    shape = taus[0].shape
    flat = [x.reshape(-1, shape[-2], shape[-1]) for x in taus]
    return torch.stack([rule([x[e] for x in flat]) for e in range(flat[0].shape[0])]).reshape(shape)


def lin_or_mean(model: Model, rule: Callable[[list[torch.Tensor]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rule on LIN tensors, the mean of Δt on every other class (ALGORITHMS.md §13)."""
    return {name: per_matrix(rule, taus) if info.cls == TensorClass.LIN else average(taus)
            for name, (info, taus) in model.items()}


# ---- §7: TIES ------------------------------------------------------------------------------------------------

def global_threshold(taus: list[torch.Tensor], density: float) -> float:
    """κ_t: the (d − ⌊d·K⌋)-th smallest |τt| over all of one expert's tensors concatenated; K = 100% keeps all."""
    flat = torch.cat([x.reshape(-1) for x in taus]).abs()
    d = flat.numel()
    if density >= 1:
        return 0.0
    return flat.kthvalue(d - int(d * density)).values.item()


def ties_trimmed(model: Model, density: float, trim: str) -> dict[str, torch.Tensor]:
    """Trimmed task vectors, (T, *shape) per tensor: global = |τ| >= κ_t, tensor = |τ| >= its int(K·numel)-th largest."""
    names = sorted(model)
    n_experts = len(model[names[0]][1])
    kappas = [global_threshold([model[k][1][t] for k in names], density) for t in range(n_experts)]
    out = {}
    for name in names:
        taus = model[name][1]
        if trim == "global":
            out[name] = torch.stack([x * (x.abs() >= kappa) for x, kappa in zip(taus, kappas)])
        else:
            out[name] = torch.stack([_top_k(x, density) for x in taus])
    return out


def _top_k(x: torch.Tensor, density: float) -> torch.Tensor:
    """The k = int(K·numel) largest |x|, ties at the k-th largest kept (k = 0 keeps nothing)."""
    if density >= 1:
        return x.clone()
    flat = x.reshape(-1).abs()
    k = int(density * flat.numel())
    if k == 0:
        return torch.zeros_like(x)
    kappa = flat.kthvalue(flat.numel() - k + 1).values
    return x * (x.abs() >= kappa)


def ties_elected(trimmed: torch.Tensor, trim: str) -> torch.Tensor:
    """γ = sign(Σ trimmed); a zero sum gives 0 (lowmerge's rule, trim=global) or + (mergekit, trim=tensor)."""
    total = trimmed.sum(0)
    if trim == "tensor":
        return torch.where(total >= 0, 1.0, -1.0).to(trimmed.dtype)
    return torch.sign(total)


def ties(model: Model, density: float, scale: float, trim: str) -> dict[str, torch.Tensor]:
    """Trim, elect, disjoint mean of the entries whose sign (strictly) matches γ, times λ."""
    out = {}
    for name, trimmed in ties_trimmed(model, density, trim).items():
        agree = (torch.sign(trimmed) == ties_elected(trimmed, trim)) & (trimmed != 0)
        out[name] = scale * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out
