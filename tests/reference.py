"""fp64 reference rules, written from ALGORITHMS.md with no streaming code: every expert's tensor is at hand at once.

A model is ``{name: (info, [Δ_1, ..., Δ_T])}`` with fp64 task vectors; every rule returns ``{name: Δ*}``.
Nothing here imports lowmem_merge.methods: the point is an independent second implementation.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lowmem_merge.info import TensorClass, TensorInfo

Model = dict[str, tuple[TensorInfo, list[torch.Tensor]]]


# ---- §7: average, task arithmetic -----------------------------------------------------------------------------

def average(taus: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(taus).mean(0)


def task_arithmetic(taus: list[torch.Tensor], scale: float) -> torch.Tensor:
    return scale * torch.stack(taus).sum(0)


def weighted_sum(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_t Δt: task arithmetic with per-expert weights (λ = 1); ÷ Σ w_t is the weighted average (mergekit linear)."""
    return sum(w * x for w, x in zip(weights, taus))


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


def ties_trimmed(model: Model, density: float, trim: str,
                 densities: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Trimmed task vectors, (T, *shape) per tensor: global = |τ| >= κ_t, tensor = |τ| >= its int(K·numel)-th largest.
    ``densities`` gives K_t per expert."""
    names = sorted(model)
    n_experts = len(model[names[0]][1])
    ks = list(densities) if densities else [density] * n_experts
    kappas = [global_threshold([model[k][1][t] for k in names], ks[t]) for t in range(n_experts)]
    out = {}
    for name in names:
        taus = model[name][1]
        if trim == "global":
            out[name] = torch.stack([x * (x.abs() >= kappa) for x, kappa in zip(taus, kappas)])
        else:
            out[name] = torch.stack([_top_k(x, k) for x, k in zip(taus, ks)])
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


def breadcrumbs_band(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's magnitude_outliers: sort |x| ascending, keep positions [n_bot, n_bot + k) with k = int(K·numel),
    n_top = int(γ·numel), n_bot = max(0, numel − k − n_top); entries tied with an edge value are kept too."""
    if density >= 1:
        return x.clone()
    flat = x.reshape(-1).abs()
    n = flat.numel()
    k, top = int(density * n), int(gamma * n)
    if k == 0:
        return torch.zeros_like(x)
    bottom = max(0, n - k - top)
    ordered = flat.sort().values
    lo, hi = ordered[bottom], ordered[bottom + k - 1]
    return x * ((x.abs() >= lo) & (x.abs() <= hi))


def model_stock(taus: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's model_stock (filter_wise false) as Δ* = t·mean(Δt): the mean of the pairwise cosines (norm
    products clamped to ≥ 1e-6, each cosine to [−1, 1]), t = N·cos / (1 + (N − 1)·cos), 0 where that is singular."""
    flat = [x.reshape(-1) for x in taus]
    cos = [((a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-6)).clamp(-1, 1)
           for i, a in enumerate(flat) for b in flat[i + 1:]]
    c = torch.stack(cos).mean()
    n = len(taus)
    denominator = 1 + (n - 1) * c
    t = 0.0 if abs(float(denominator)) < 1e-6 else n * c / denominator
    return t * sum(taus) / n


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


def ties_weighted(trimmed: torch.Tensor, weights: list[float], trim: str, normalize: bool) -> torch.Tensor:
    """mergekit's ties on (T, *shape) trimmed task vectors: w_t·τ̂t, γ = elected sign of their sum, then
    Σ w_t·τ̂t over the entries whose sign is γ, ÷ Σ w_t over those entries (a zero divisor is 1) when normalizing."""
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * (trimmed.dim() - 1))
    wd = trimmed * w
    agree = (torch.sign(wd) == ties_elected(wd, trim)) & (wd != 0)
    total = (wd * agree).sum(0)
    if not normalize:
        return total
    divisor = (w * agree).sum(0)
    return total / torch.where(divisor == 0, 1.0, divisor)


def lin_or_scaled_mean(model: Model, rule: Callable[[list[torch.Tensor]], torch.Tensor],
                       scale: float) -> dict[str, torch.Tensor]:
    """The rule (which applies α itself) on LIN tensors, α·mean of Δt on every other class (§5, §6, §13)."""
    return {name: per_matrix(rule, taus) if info.cls == TensorClass.LIN else scale * average(taus)
            for name, (info, taus) in model.items()}


# ---- §3: ACE-Merging ---------------------------------------------------------------------------------------------

def ace_gamma(taus: list[torch.Tensor]) -> float:
    """γ = Var_unbiased(ℓ)/(mean(ℓ)² + 1e-12), ℓ_t = ln(‖Δt‖F² + 1e-12); NaN for T = 1 (torch.var of one value)."""
    logs = torch.tensor([float(x.square().sum()) for x in taus], dtype=torch.float64).add(1e-12).log()
    if len(taus) == 1:
        return math.nan
    return float(logs.var() / (logs.mean() ** 2 + 1e-12))


def ace_parts(taus: list[torch.Tensor], eps: float, tau: float) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(flag, Δ_pre, F = Δ_pre + R) of §3.2 steps 1–6, every expert at hand; F is None when not flag."""
    n_experts, n = len(taus), taus[0].shape[1]
    eye = torch.eye(n, dtype=torch.float64)
    flag = ace_gamma(taus) > tau
    mean_norm = sum(float(x.square().sum()) for x in taus) / n_experts
    centred = [x - x.mean(0, keepdim=True) for x in taus]
    tilde, regs = [], []
    for w in centred:
        gram = w.T @ w
        r = float(torch.trace(gram)) + 1e-12
        tilde.append(gram / r if flag else gram)
        regs.append(tilde[-1] + (eps / r if flag else eps) * eye)
    c = sum(tilde).mean(0)
    if flag:
        c = c / (mean_norm + 1e-12)
    a = sum(regs) + torch.ones(n, 1, dtype=torch.float64) * c[None, :]   # 1_n cᵀ
    nn = sum(w @ s for w, s in zip(centred, regs))
    pre = nn @ torch.linalg.inv(a)
    if not flag:
        return flag, pre, None
    mean_reg = sum(regs) / n_experts
    return flag, pre, pre + sum(x @ (s - mean_reg) for x, s in zip(taus, tilde))


def ace_matrix(taus: list[torch.Tensor], eps: float, tau: float, k_frac: float) -> torch.Tensor:
    flag, pre, f = ace_parts(taus, eps, tau)
    k = int(k_frac * min(pre.shape))
    if not flag or k == 0:
        return pre
    u, s, vh = torch.linalg.svd(f, full_matrices=False)
    return pre + s[:k].mean() * u[:, :k] @ vh[:k]


# ---- §4.1: WUDI-Merging, Adam ------------------------------------------------------------------------------------

def wudi_loss(tau: torch.Tensor, taus: list[torch.Tensor]) -> torch.Tensor:
    """L(τ) = Σ_t w_t ‖(τ − Δt) Δtᵀ‖F², w_t = 1/‖Δt‖F²; zero experts have no weight."""
    return sum(((tau - x) @ x.T).square().sum() / x.square().sum() for x in taus if torch.count_nonzero(x))


def wudi_matrix(taus: list[torch.Tensor], lr: float, steps: int) -> torch.Tensor:
    """Adam on the per-expert loss through autograd, from τ⁰ = Σ Δt, in fp64 (the reference's loop)."""
    tau = sum(taus).clone().requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    for _ in range(steps):
        opt.zero_grad()
        loss = wudi_loss(tau, taus)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        else:   # every expert zero: no loss, no step
            tau.grad = torch.zeros_like(tau)
        opt.step()
    return tau.detach()


# ---- §5, §6: TSV-M, Iso-C, Iso-CTS -------------------------------------------------------------------------------

def polar(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh


def tsv_slots(taus: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ū (m×r), s̄ (r), V̄ (r×n) of §5 step 1, k = ⌊r/T⌋ triplets per expert, the rest zero."""
    m, n = taus[0].shape
    r = min(m, n)
    k = r // len(taus)
    ubar, sbar, vbar = (torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64),
                        torch.zeros(r, n, dtype=torch.float64))
    for t, x in enumerate(taus):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        ubar[:, t * k:(t + 1) * k], sbar[t * k:(t + 1) * k], vbar[t * k:(t + 1) * k] = u[:, :k], s[:k], vh[:k]
    return ubar, sbar, vbar


def tsv_matrix(taus: list[torch.Tensor], scale: float) -> torch.Tensor:
    if min(taus[0].shape) < len(taus):
        return torch.zeros_like(taus[0])
    ubar, sbar, vbar = tsv_slots(taus)
    return scale * polar(ubar) @ torch.diag(sbar) @ polar(vbar)


def iso_c_matrix(taus: list[torch.Tensor], scale: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return scale * s.mean() * u @ vh


def iso_cts_sizes(r: int, n_experts: int, fraction: float) -> tuple[int, int]:
    """(k_c, p) of §6 step 1 (Python round, half to even)."""
    k0 = int(r * fraction)
    n_ts = round((r - k0) / n_experts) * n_experts
    return r - n_ts, n_ts // n_experts


def iso_cts_matrix(taus: list[torch.Tensor], fraction: float, scale: float) -> torch.Tensor:
    m, n = taus[0].shape
    r, n_experts = min(m, n), len(taus)
    kc, p = iso_cts_sizes(r, n_experts, fraction)
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :kc]
    us, ss, vs = [], [], []
    for x in taus:
        ut, st, vt = torch.linalg.svd(x - uc @ uc.T @ x, full_matrices=False)
        us.append(ut[:, :p]), ss.append(st[:p]), vs.append(vt[:p])
    ubar = torch.cat(us + [uc], 1)
    sbar = torch.cat(ss + [s[:kc]])
    vbar = torch.cat(vs + [vh[:kc]], 0)
    return scale * sbar.mean() * polar(ubar) @ polar(vbar)


# ---- how much fp32 rounding the spectral rules amplify (tolerances of the streamed == reference tests) -------------

def _gap_ratio(s: torch.Tensor, k: int, individual: bool) -> float:
    """σ1 over the smallest singular-value gap that decides the top k triplets: every gap among the first k + 1 values
    when each triplet counts on its own (TSV's s̄ weights each one), else only σ_k − σ_{k+1} (a subspace)."""
    if k == 0 or k >= s.numel() and not individual:
        return 1.0
    gaps = s[:k + 1].diff().neg() if individual else s[k - 1:k + 1].diff().neg()
    return float(s[0] / gaps.min()) if gaps.numel() else 1.0


def _cond(x: torch.Tensor) -> float:
    """σ1/σ_min over the nonzero singular values: polar(x) moves by ~‖E‖/σ_min."""
    s = torch.linalg.svdvals(x)
    s = s[s > s[0] * 1e-10]
    return float(s[0] / s[-1])


def ace_sensitivity(taus: list[torch.Tensor], eps: float, tau: float, k_frac: float) -> float:
    """κ(A) of the LU solve, times the subspace gap of F at k where the refinement runs."""
    flag, pre, f = ace_parts(taus, eps, tau)
    n = taus[0].shape[1]
    centred = [x - x.mean(0, keepdim=True) for x in taus]   # rebuild A's singular values from its parts
    tilde = [w.T @ w / ((float((w * w).sum()) + 1e-12) if flag else 1.0) for w in centred]
    eps_sum = sum(eps / (float((w * w).sum()) + 1e-12) if flag else eps for w in centred)
    c = sum(tilde).mean(0) / ((sum(float(x.square().sum()) for x in taus) / len(taus) + 1e-12) if flag else 1.0)
    a = sum(tilde) + eps_sum * torch.eye(n, dtype=torch.float64) + torch.ones(n, 1, dtype=torch.float64) * c
    k = int(k_frac * min(pre.shape))
    refine = _gap_ratio(torch.linalg.svdvals(f), k, individual=False) if flag else 1.0
    return _cond(a) * refine


def tsv_sensitivity(taus: list[torch.Tensor]) -> float:
    r = min(taus[0].shape)
    k = r // len(taus)
    if k == 0:
        return 1.0
    ubar, _, vbar = tsv_slots(taus)
    filled = len(taus) * k
    gaps = max(_gap_ratio(torch.linalg.svdvals(x), k, individual=True) for x in taus)
    return gaps * max(_cond(ubar[:, :filled]), _cond(vbar[:filled]))


def iso_c_sensitivity(taus: list[torch.Tensor]) -> float:
    return _cond(sum(taus))


def iso_cts_sensitivity(taus: list[torch.Tensor], fraction: float) -> float:
    m, n = taus[0].shape
    kc, p = iso_cts_sizes(min(m, n), len(taus), fraction)
    u, s, _ = torch.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :kc]
    residuals = [x - uc @ uc.T @ x for x in taus]
    gaps = max([_gap_ratio(s, kc, individual=False)]
               + [_gap_ratio(torch.linalg.svdvals(x), p, individual=False) for x in residuals])
    ubar = torch.cat([torch.linalg.svd(x, full_matrices=False)[0][:, :p] for x in residuals] + [uc], 1)
    vbar = torch.cat([torch.linalg.svd(x, full_matrices=False)[2][:p] for x in residuals]
                     + [torch.linalg.svd(sum(taus), full_matrices=False)[2][:kc]], 0)
    return gaps * max(_cond(ubar), _cond(vbar))
