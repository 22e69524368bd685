"""ALGORITHMS.md §11.2–11.5 for the seed papers' rules: ace, wudi (Adam), tsv, iso_c, iso_cts.

Streamed fp32 == fp64 reference for these rules runs in test_methods.py (REFERENCES); here are their own properties.
Tolerances: a property that holds exactly in exact arithmetic is checked to SOLVE_C·κ·u with κ the fp64 problem's
sensitivity (the same bound and κ as test_methods.py), unless stated beside the check.
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from lowmem_merge.errors import ConfigError
from lowmem_merge.info import TensorClass, TensorInfo
from lowmem_merge.methods import REGISTRY, parse_params
from lowmem_merge.methods.drive import drive
from lowmem_merge.methods.iso_cts import subspace_sizes
from test_methods import LIN, SOLVE_C, U32, rel_err, stream_one, system_condition

VEC, EMB, CONV = TensorClass.VEC, TensorClass.EMB, TensorClass.CONV
SPECTRAL = ["ace", "wudi", "tsv", "iso_c", "iso_cts"]


def run(name: str, deltas: list[torch.Tensor], **params: object) -> tuple[torch.Tensor, dict[str, float]]:
    """One LIN tensor through every pass, as the stream drives it; the deltas' dtype is kept (fp64 where asked)."""
    cls = REGISTRY[name]
    return drive(cls, cls.Params(**params), TensorInfo("w", tuple(deltas[0].shape), LIN), len(deltas),
                 lambda pass_, t: deltas[t].clone())


def tolerance(name: str, deltas: list[torch.Tensor], **params: object) -> float:
    """SOLVE_C·κ·u for one rule on these deltas (relative, Frobenius)."""
    kappa = system_condition(name, REGISTRY[name].Params(**params), [d.double() for d in deltas])
    return SOLVE_C * kappa * U32


def gaussian(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(gaussian(n, n, seed=seed))[0]


# ---- every rule: classes, parameters, memory ---------------------------------------------------------------------

@pytest.mark.parametrize("name", SPECTRAL)
@pytest.mark.parametrize("cls,shape", [(VEC, (9,)), (EMB, (7, 5)), (CONV, (4, 3, 2, 2))])
def test_other_classes_get_scale_times_the_mean(name: str, cls: TensorClass, shape: tuple[int, ...]) -> None:
    deltas = [gaussian(*shape, seed=s) for s in range(3)]
    mean = stream_one("average", deltas, cls)
    assert torch.equal(stream_one(name, deltas, cls), mean)
    if "scale" in REGISTRY[name].Params.__dataclass_fields__:
        assert torch.equal(stream_one(name, deltas, cls, scale=2.5), mean * 2.5)


@pytest.mark.parametrize("name,raw", [
    ("ace", {"eps": "-1"}), ("ace", {"k_frac": "1.5"}), ("ace", {"tau": "nan"}), ("wudi", {"lr": "-1e-5"}),
    ("wudi", {"steps": "-1"}), ("wudi", {"steps": "1.5"}), ("tsv", {"scale": "inf"}), ("iso_c", {"scale": "nan"}),
    ("iso_cts", {"common_fraction": "1.2"}), ("iso_cts", {"common_fraction": "-0.1"}),
])
def test_bad_parameter_values_are_config_errors(name: str, raw: dict) -> None:
    with pytest.raises(ConfigError):
        parse_params(REGISTRY[name], raw)


def test_defaults_are_those_of_the_spec() -> None:
    """ALGORITHMS.md §13."""
    p = {name: REGISTRY[name].Params() for name in SPECTRAL}
    assert (p["ace"].eps, p["ace"].tau, p["ace"].k_frac) == (1e-2, 0.3, 0.3)
    assert (p["wudi"].lr, p["wudi"].steps) == (1e-5, 300)
    assert p["tsv"].scale == p["iso_c"].scale == p["iso_cts"].scale == 1.0 and p["iso_cts"].common_fraction == 0.8
    assert REGISTRY["ace"].passes == REGISTRY["iso_cts"].passes == 2
    assert "2e-4" in REGISTRY["ace"].param_help["eps"]  # the paper's per-family values are documented


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 64, 48)])
def test_state_bytes_cover_the_statistics(shape: tuple[int, ...]) -> None:
    *lead, m, n = shape
    batch, r = math.prod(lead), min(m, n)
    info = TensorInfo("w", shape, LIN)
    floats = {"ace": batch * (n * n + 3 * m * n), "wudi": batch * (n * n + 2 * m * n) + 3 * m * n,
              "tsv": batch * (m * r + r + r * n), "iso_c": batch * m * n,
              "iso_cts": batch * (m * r + r + r * n + m * subspace_sizes(r, 4, 0.8)[0])}
    for name, need in floats.items():
        assert REGISTRY[name].state_bytes(info, 4, REGISTRY[name].Params()) >= 4 * need, name
        assert REGISTRY[name].state_bytes(TensorInfo("b", (m,), VEC), 4, REGISTRY[name].Params()) == 4 * m


# ---- ACE (§3, §11.2) ---------------------------------------------------------------------------------------------

def test_ace_homogeneous_branch_has_zero_column_sums() -> None:
    deltas = [gaussian(10, 8, seed=s) for s in range(3)]  # equal scales: γ ≈ 0
    merged, stats = run("ace", deltas)
    assert stats["branch"] == 0
    assert float(merged.double().sum(0).norm() / merged.double().norm()) <= 10 * tolerance("ace", deltas)


@pytest.mark.parametrize("scales,branch", [([1.0, 1.0, 1.0], 0.0), ([1e-3, 1.0, 1e3], 1.0), ([1e3], 0.0)])
def test_ace_branch_follows_the_spread_of_the_norms(scales: list[float], branch: float) -> None:
    """Equal norms give γ ≈ 0; norms over six decades give γ > τ; one expert gives NaN γ: homogeneous."""
    deltas = [gaussian(10, 8, seed=s, scale=c) for s, c in enumerate(scales)]
    _, stats = run("ace", deltas)
    d64 = [d.double() for d in deltas]
    assert stats["branch"] == branch and (ref.ace_gamma(d64) > 0.3) == bool(branch)
    if len(deltas) > 1:
        assert stats["gamma"] == pytest.approx(ref.ace_gamma(d64), rel=1e-5)


def test_ace_gamma_comparison_is_strict() -> None:
    deltas = [gaussian(10, 8, seed=s, scale=c) for s, c in enumerate([1e-3, 1.0, 1e3])]
    gamma = run("ace", deltas)[1]["gamma"]
    assert run("ace", deltas, tau=gamma)[1]["branch"] == 0.0
    assert run("ace", deltas, tau=gamma * (1 - 1e-9))[1]["branch"] == 1.0


@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.0], [1e-2, 1.0, 1e2]])
def test_ace_is_equivariant_under_input_permutations_but_not_rotations(scales: list[float]) -> None:
    """Centring commutes with any input rotation Q; only the prior 1cᵀ does not: ACE(ΔQ) ≠ ACE(Δ)Q catches a missing
    CSP. A permutation keeps c's structure, so ACE(ΔP) = ACE(Δ)P to rounding. In the heterogeneous branch c is divided
    by s̄ and the prior is ~1e-6 of A on these scales, so the rotation check is for the homogeneous branch."""
    deltas = [gaussian(12, 9, seed=s, scale=c) for s, c in enumerate(scales)]
    base = run("ace", deltas)[0].double()
    perm = torch.eye(9)[torch.randperm(9, generator=torch.Generator().manual_seed(7))]
    q = orthogonal(9, seed=8)
    tol = tolerance("ace", deltas)
    assert rel_err(run("ace", [d @ perm for d in deltas])[0], base @ perm.double()) <= 2 * tol
    if scales[0] == scales[-1]:
        assert rel_err(run("ace", [d @ q for d in deltas])[0], base @ q.double()) > 1e-3


def test_ace_refinement_is_rank_k_with_equal_singular_values() -> None:
    deltas = [gaussian(12, 10, seed=s, scale=c) for s, c in enumerate([1e-2, 1.0, 1e2])]
    refined, stats = run("ace", deltas)
    pre = run("ace", deltas, k_frac=0.0)[0]  # k = 0 skips the refinement: Δ_pre
    assert stats["branch"] == 1.0
    s = torch.linalg.svdvals((refined - pre).double())
    k = math.floor(0.3 * 10)
    assert float(s[k:].max()) <= 1e-5 * float(s[0])          # fp32 rounding of Δ* − Δ_pre at the scale of Δ*
    assert float((s[:k] - s[:k].mean()).abs().max()) <= 1e-5 * float(s[0])


def test_ace_single_expert_gives_the_documented_output_not_the_expert() -> None:
    delta = gaussian(10, 8, seed=9)
    got = run("ace", [delta])[0]
    assert rel_err(got, ref.ace_matrix([delta.double()], 1e-2, 0.3, 0.3)) <= tolerance("ace", [delta])
    assert rel_err(got, delta.double()) > 1e-2


def test_ace_k_zero_skips_the_refinement_instead_of_nan() -> None:
    deltas = [gaussian(3, 3, seed=s, scale=c) for s, c in enumerate([1e-2, 1.0, 1e2])]  # ⌊0.3·3⌋ = 0
    got, stats = run("ace", deltas)
    assert stats["branch"] == 1.0 and bool(torch.isfinite(got).all())
    assert rel_err(got, ref.ace_parts([d.double() for d in deltas], 1e-2, 0.3)[1]) <= tolerance("ace", deltas)


# ---- WUDI, Adam (§4.1, §11.3) ------------------------------------------------------------------------------------

def test_wudi_gradient_identity_matches_autograd_of_the_per_expert_loss() -> None:
    """In fp64 the accumulated A, B give ∇L = 2(τA − B) and the reported loss equals Σ_t w_t‖(τ − Δt)Δtᵀ‖F²."""
    deltas = [gaussian(7, 5, seed=s, scale=c).double() for s, c in enumerate([1.0, 0.1, 3.0])]
    cls = REGISTRY["wudi"]
    method = cls(TensorInfo("w", (7, 5), LIN), 3, cls.Params(steps=0))
    for t, d in enumerate(deltas):
        method.add(t, d)
    a, b = method._a[0], method._b[0]
    tau = gaussian(7, 5, seed=10).double().requires_grad_(True)
    ref.wudi_loss(tau, deltas).backward()
    assert rel_err(2 * (tau.detach() @ a - b), tau.grad) < 1e-12
    method.finalize()
    assert method.stats()["loss_before"] == pytest.approx(float(ref.wudi_loss(sum(deltas), deltas)), rel=1e-10)


def test_wudi_single_expert_stays_within_ten_lr() -> None:
    """τ⁰ = Δ is stationary; Adam's 1e-8 eps turns rounding into ~lr steps, so only |τ − Δ| ≤ 10·lr holds (§11.3)."""
    delta = gaussian(16, 12, seed=11)
    assert float((run("wudi", [delta])[0] - delta).abs().max()) <= 10 * 1e-5


def test_wudi_moves_at_most_adams_bound_and_lowers_the_loss() -> None:
    deltas = [gaussian(16, 12, seed=s, scale=c) for s, c in enumerate([1.0, 0.3, 2.0])]
    lr, steps = 1e-4, 200
    got, stats = run("wudi", deltas, lr=lr, steps=steps)
    start = sum(deltas)
    moved = float((got - start).abs().max())
    assert 0 < moved <= 3.2 * lr * steps  # (1 − β1)/√(1 − β2) ≈ 3.16 per step at most
    assert stats["loss_after"] < stats["loss_before"]
    assert torch.equal(run("wudi", deltas, steps=0)[0], start)  # no step: the task-arithmetic sum


def test_wudi_ignores_expert_order_to_rounding() -> None:
    deltas = [gaussian(10, 8, seed=s, scale=c) for s, c in enumerate([1.0, 0.3, 2.0])]
    forward, backward = run("wudi", deltas)[0], run("wudi", deltas[::-1])[0]
    assert rel_err(backward, forward.double()) <= 2 * (SOLVE_C * 300 + 5) * U32  # test_methods.py's wudi bound


# ---- TSV-M (§5, §11.4) -------------------------------------------------------------------------------------------

def test_tsv_singular_values_are_the_kept_ones_plus_zeros() -> None:
    deltas = [gaussian(8, 8, seed=s) for s in range(3)]  # k = 2: six kept values, two empty slots
    got = torch.linalg.svdvals(run("tsv", deltas)[0].double())
    kept = torch.cat([torch.linalg.svdvals(d.double())[:2] for d in deltas] + [torch.zeros(2, dtype=torch.float64)])
    want = kept.sort(descending=True).values
    assert float((got - want).abs().max()) <= tolerance("tsv", deltas) * float(want[0])


def test_tsv_single_expert_is_returned() -> None:
    delta = gaussian(12, 7, seed=12)
    assert rel_err(run("tsv", [delta])[0], delta.double()) <= tolerance("tsv", [delta])


def test_tsv_is_transpose_equivariant_and_linear_in_scale() -> None:
    deltas = [gaussian(12, 9, seed=s) for s in range(3)]
    got = run("tsv", deltas)[0]
    tol = tolerance("tsv", deltas)
    assert rel_err(run("tsv", [d.T for d in deltas])[0].T, got.double()) <= 2 * tol
    assert rel_err(run("tsv", deltas, scale=0.3)[0], 0.3 * got.double()) <= 2 * U32


def test_tsv_more_experts_than_rank_gives_zero() -> None:
    got, stats = run("tsv", [gaussian(3, 5, seed=s) for s in range(4)])
    assert torch.equal(got, torch.zeros(3, 5)) and stats["k"] == 0


# ---- Iso-C, Iso-CTS (§6, §11.5) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(10, 8), (6, 14)])
def test_iso_c_flattens_the_spectrum_and_keeps_the_nuclear_norm(shape: tuple[int, int]) -> None:
    deltas = [gaussian(*shape, seed=s, scale=c) for s, c in enumerate([1.0, 0.2, 3.0])]
    got = torch.linalg.svdvals(run("iso_c", deltas)[0].double())
    total = torch.linalg.svdvals(sum(d.double() for d in deltas))
    tol = tolerance("iso_c", deltas)
    assert float((got - got.mean()).abs().max()) <= tol * float(got[0])
    assert float(got.sum()) == pytest.approx(float(total.sum()), rel=tol)


def test_iso_cts_with_all_common_space_is_iso_c() -> None:
    deltas = [gaussian(10, 8, seed=s) for s in range(3)]
    want = run("iso_c", deltas)[0].double()
    assert rel_err(run("iso_cts", deltas, common_fraction=1.0)[0], want) <= 2 * tolerance("iso_c", deltas)


def test_iso_cts_is_not_transpose_equivariant_but_iso_c_is() -> None:
    deltas = [gaussian(12, 9, seed=s) for s in range(3)]
    got = run("iso_cts", deltas)[0]
    assert rel_err(run("iso_cts", [d.T for d in deltas])[0].T, got.double()) > 1e-3
    iso = run("iso_c", deltas)[0]
    assert rel_err(run("iso_c", [d.T for d in deltas])[0].T, iso.double()) <= 2 * tolerance("iso_c", deltas)


@pytest.mark.parametrize("r,n_experts,fraction", [(10, 2, 0.75), (10, 4, 0.8), (768, 8, 0.8), (9, 3, 0.5),
                                                  (64, 3, 0.0)])
def test_iso_cts_sizes_follow_the_spec(r: int, n_experts: int, fraction: float) -> None:
    """k_c + T·p = r, with Python's half-to-even round: (10, 2, 0.75) rounds 1.5 up, (10, 4, 0.8) rounds 0.5 down."""
    kc, p = subspace_sizes(r, n_experts, fraction)
    assert (kc, p) == ref.iso_cts_sizes(r, n_experts, fraction) and kc + n_experts * p == r and kc >= 0


def test_iso_cts_never_asks_for_more_slots_than_the_rank() -> None:
    """r = 3, f = 0, T = 2: round(1.5)·2 = 4 > 3 task slots; the documented deviation keeps p = ⌊r/T⌋ = 1."""
    assert subspace_sizes(3, 2, 0.0) == (1, 1)
    got = run("iso_cts", [gaussian(3, 5, seed=s) for s in range(2)], common_fraction=0.0)[0]
    assert bool(torch.isfinite(got).all())
