"""The fast routes of TSV-M, Iso-C and Iso-CTS (issue 17 §2): which one is taken, and that it is still the rule.

* A square slot matrix (Ū or V̄ of a square tensor with unfilled slots) takes the Gram route of its filled side.
* Iso-CTS on m ≤ n projects each expert onto Q, the complement of U_c, and decomposes the (m − k_c)×n matrix QᵀΔt
  (``left_svd`` gives U_c and Q from one eigh of S·Sᵀ, or from LAPACK where the Gram route's condition fails).
Tolerances: those of test_methods.py (SOLVE_C·κ·u, κ the fp64 problem's sensitivity), or fp32 rounding where the
quantity is computed from an fp64 factorization (stated beside the check).
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from lowmem_merge.methods import matrix_rule
from lowmem_merge.methods.iso_cts import left_svd
from lowmem_merge.methods.matrix_rule import GRAM_COND, polar_and_values
from test_methods import U32, _with_spectrum, rel_err
from test_methods_seeds import gaussian, run, tolerance


def _no_lapack(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(x: torch.Tensor) -> None:
        raise AssertionError(f"LAPACK's SVD was taken on a {tuple(x.shape)} matrix")
    monkeypatch.setattr(matrix_rule, "_lapack_svd", refuse)


@pytest.mark.parametrize("unfilled", ["row", "column"])
def test_square_slot_matrix_takes_the_gram_route_of_its_filled_side(monkeypatch, unfilled):
    """V̄ of a square tensor has unfilled rows, Ū unfilled columns: either way the factor is the polar factor of the
    filled part (as in test_lowrank_exact.py's padded case) with zero in the unfilled lines, without LAPACK."""
    _no_lapack(monkeypatch)
    filled = _with_spectrum(37, 40, 1e3, seed=3)                  # 37 filled rows of a 40×40 V̄
    square = torch.cat([filled, torch.zeros(3, 40)], 0)
    if unfilled == "column":
        filled, square = filled.T.contiguous(), square.T.contiguous()
    got, values = polar_and_values(square)
    want = ref.polar(filled.double())
    part = got[:37] if unfilled == "row" else got[:, :37]
    rest = got[37:] if unfilled == "row" else got[:, 37:]
    # the Gram route's error, eps64·κ² (matrix_rule's doc), and the fp32 output rounding: as test_lowrank_exact.py
    bound = 4 * math.sqrt(37) * (U32 + torch.finfo(torch.float64).eps * 1e3 ** 2)
    assert float((part.double() - want).norm()) / math.sqrt(37) <= bound
    assert torch.equal(rest, torch.zeros_like(rest)) and torch.equal(values[37:], torch.zeros(3))
    assert float((values[:37].double() - torch.linalg.svdvals(filled.double())).abs().max()) <= bound


def _shared_noise_experts(m: int, n: int, seed: int) -> list[torch.Tensor]:
    """bench/speed.py's kind of task vectors: rank 4 each, plus the bf16 rounding of W0 + Δt − W0 (shared W0)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, n, generator=g)
    out = []
    for _ in range(3):
        low = torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g) / 2
        delta = 0.01 * (low + 0.05 * torch.randn(m, n, generator=g))
        out.append((base + delta).bfloat16().float() - base.bfloat16().float())
    return out


@pytest.mark.parametrize("shape", [(24, 24), (16, 40), (40, 16)])
@pytest.mark.parametrize("name", ["tsv", "iso_c", "iso_cts"])
def test_rules_on_shared_noise_experts_match_fp64_reference(name, shape):
    """Low rank plus shared rounding noise (ill-conditioned slot matrices): square, wide (Iso-CTS's Q route) and
    tall, held to test_methods.py's bound."""
    deltas = _shared_noise_experts(*shape, seed=sum(shape))
    taus = [d.double() for d in deltas]
    want = {"tsv": lambda: ref.tsv_matrix(taus, 1.0), "iso_c": lambda: ref.iso_c_matrix(taus, 1.0),
            "iso_cts": lambda: ref.iso_cts_matrix(taus, 0.8, 1.0)}[name]()
    assert rel_err(run(name, deltas)[0], want) <= tolerance(name, deltas)


@pytest.mark.parametrize("cond,gram", [(1e2, True), (1e10, False)])
def test_left_svd_gives_the_top_triplets_and_an_orthonormal_complement(cond, gram):
    """Both routes: the top triplets as fp32 LAPACK gives them (σ to 1e-6·σ1, the top vectors' angle to fp32
    rounding over the gap), and U (m×m) orthonormal, so its last m − top columns span U_c's complement."""
    m, n, top = 12, 30, 5
    x = _with_spectrum(m, n, cond, seed=11)
    s_all = torch.linalg.svdvals(x.double())
    assert (float(s_all[top - 1]) > float(s_all[0]) / GRAM_COND) == gram   # σ_i = cond^(−i/11)
    u, s, vh = left_svd(x, top)
    u0, s0, vh0 = torch.linalg.svd(x.double(), full_matrices=False)
    assert u.shape == (m, m) and s.shape == (top,) and vh.shape == (top, n)
    assert float((s.double() - s0[:top]).abs().max()) <= 1e-6 * float(s0[0])
    gap = float((s0[:top + 1].diff().neg()).min())
    for i in range(top):   # a singular vector moves by ~u·σ1/gap (test_methods.py's SOLVE_C·κ·u, κ = σ1/gap)
        assert 1 - abs(float(u[:, i].double() @ u0[:, i])) <= 50 * U32 * float(s0[0]) / gap
        assert 1 - abs(float(vh[i].double() @ vh0[i])) <= 50 * U32 * float(s0[0]) / gap
    eye = torch.eye(m, dtype=torch.float64)
    assert float((u.double().T @ u.double() - eye).abs().max()) <= 1e-6
    uc = u0[:, :top]   # the complement of the exact U_c, to within the subspace's own fp32 sensitivity
    assert float((uc.T @ u[:, top:].double()).norm()) <= 50 * U32 * float(s0[0]) / float(s0[top - 1] - s0[top])


def test_iso_cts_past_the_gram_route_matches_fp64_reference():
    """A sum whose k_c-th singular value is below σ1 / GRAM_COND: left_svd takes LAPACK, the rule still matches."""
    m, n = 12, 20
    steep = _with_spectrum(m, n, 1e6, seed=4)
    deltas = [steep + 1e-5 * gaussian(m, n, seed=5), 1e-5 * gaussian(m, n, seed=6)]
    s = torch.linalg.svdvals(sum(d.double() for d in deltas))
    kc = ref.iso_cts_sizes(m, 2, 0.8)[0]
    assert float(s[kc - 1]) < float(s[0]) / GRAM_COND
    want = ref.iso_cts_matrix([d.double() for d in deltas], 0.8, 1.0)
    assert rel_err(run("iso_cts", deltas)[0], want) <= tolerance("iso_cts", deltas)


def test_iso_cts_without_common_space_matches_fp64_reference(monkeypatch):
    """common_fraction = 0 with T dividing r: k_c = 0, Q = I, so R_t = Δt, without an SVD of S."""
    _no_lapack(monkeypatch)
    deltas = [gaussian(6, 14, seed=s) for s in range(3)]
    assert ref.iso_cts_sizes(6, 3, 0.0) == (0, 2)
    want = ref.iso_cts_matrix([d.double() for d in deltas], 0.0, 1.0)
    assert rel_err(run("iso_cts", deltas, common_fraction=0.0)[0], want) <= tolerance("iso_cts", deltas,
                                                                                      common_fraction=0.0)
