"""Tall LIN tensors merged by the matrix rules in row chunks (issue 17 §3, methods/tall.py).

The chunked path is the whole-tensor arithmetic in another order (each expert's Gram summed chunk by chunk, N formed
from the experts' Grams instead of the running sum, wudi_cfs's weights from the fp64 Gram's trace instead of an fp32
norm), so it is NOT promised bitwise equal to the whole-tensor path: both are held to test_methods' bounds against
the fp64 reference (SOLVE_C·κ·u for the covariance rules, (SOLVE_C·N + T + 2)·u for wudi), on the same cases.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import reference as ref
from lowmem_merge import merge, stream
from lowmem_merge.demo import LlamaShape, build_example
from lowmem_merge.info import TensorClass, TensorInfo
from lowmem_merge.methods import REGISTRY, tall
from test_merge import load_model
from test_methods import SOLVE_C, U32, rel_err, system_condition

RULES = [("actmat", {}), ("actmat", {"rho": 0.0}), ("wudi_cfs", {}), ("wudi_cfs", {"omega": 0.1}),
         ("wudi_cfs", {"omega": 0.0}), ("wudi", {}), ("wudi", {"steps": 20}), ("ace", {}), ("ace", {"k_frac": 0.0}),
         ("ace", {"tau": 1e9})]   # ace: the heterogeneous branch (refined, or k = 0) on "heterogeneous", else not
REFERENCE = {"actmat": lambda ds, p: ref.actmat_matrix(ds, p.rho),
             "wudi_cfs": lambda ds, p: ref.wudi_cfs_matrix(ds, p.omega),
             "wudi": lambda ds, p: ref.wudi_matrix(ds, p.lr, p.steps),
             "ace": lambda ds, p: ref.ace_matrix(ds, p.eps, p.tau, p.k_frac)}


def _low_rank(m: int, n: int, rank: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


def _case(case: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(len(case))
    if case == "tall":
        return [s * torch.randn(60, 8, generator=g) for s in (1.0, 0.5, 2.0)]
    if case == "rank_deficient":   # two rank-3 experts: ΣΔᵀΔ has rank 6 of 10 (pinv at ridge 0)
        return [_low_rank(90, 10, 3, g) for _ in range(2)]
    if case == "bf16":             # deltas of bf16 checkpoints: coarse values, exact ties
        base = torch.randn(72, 6, generator=g)
        return [(base + 0.01 * torch.randn(72, 6, generator=g)).bfloat16().float() - base.bfloat16().float()
                for _ in range(3)]
    if case == "heterogeneous":    # γ far above τ = 0.3: ace's normalized branch with its spectral refinement
        return [s * torch.randn(90, 8, generator=g) for s in (1e-3, 1.0, 10.0)]
    if case == "zero_expert":      # wudi's 1/‖Δt‖² skips it
        return [torch.randn(48, 6, generator=g), torch.zeros(48, 6), 0.3 * torch.randn(48, 6, generator=g)]
    raise KeyError(case)


def run_rows(name: str, params: object, deltas: list[torch.Tensor], chunk: int | None) -> torch.Tensor:
    """The rule as the stream runs it: with ``chunk``, the per-tensor prepass over row chunks, then each chunk merged
    alone from the prepass' state and the chunks stacked; without, the whole tensor with no state."""
    cls = REGISTRY[name]
    m, n = deltas[0].shape
    whole = TensorInfo("lm_head.weight", (m, n), TensorClass.LIN)
    if chunk is None:
        pieces, state = [(whole, 0, m)], None
    else:
        pieces = [(replace(whole, shape=(min(m, r + chunk) - r, n), row_start=r), r, min(m, r + chunk))
                  for r in range(0, m, chunk)]
        pre = cls.prepass_for(params)(len(deltas), params)
        assert pre.covers(params, whole)
        for round_ in range(pre.rounds):
            for info, r0, r1 in pieces:
                for t, d in enumerate(deltas):
                    pre.observe(round_, info, t, d[r0:r1].clone())
            pre.end_round(round_)
        state = pre.state()
        assert state is not None
    parts = []
    for info, r0, r1 in pieces:
        method = cls(info, len(deltas), params, state)
        buf = torch.empty(r1 - r0, n)
        for pass_ in range(cls.passes_for(params)):
            for t, d in enumerate(deltas):
                method.add(t, buf.copy_(d[r0:r1]), pass_)
                buf.fill_(float("nan"))      # the stream reuses its buffers: a kept reference gives NaN
        parts.append(method.finalize())
    return torch.cat(parts)


def bound(name: str, params: object, deltas64: list[torch.Tensor]) -> float:
    if name == "wudi":
        return (SOLVE_C * params.steps + len(deltas64) + 2) * U32
    return SOLVE_C * system_condition(name, params, deltas64) * U32


@pytest.fixture(autouse=True)
def small_tall(monkeypatch):
    monkeypatch.setattr(tall, "TALL_MIN_ELEMS", 0)   # these small tall matrices count as tall


@pytest.mark.parametrize("case", ["tall", "rank_deficient", "bf16", "heterogeneous", "zero_expert"])
@pytest.mark.parametrize("name,kwargs", RULES, ids=[f"{n}-{k}" for n, k in RULES])
def test_row_chunks_and_whole_tensor_both_match_the_fp64_reference(name: str, kwargs: dict, case: str) -> None:
    deltas = _case(case)
    if name == "ace" and case == "zero_expert":
        pytest.skip("ace gives a zero Δt the weight 1/1e-12 (the reference's guard): not a case for tolerances")
    params = REGISTRY[name].Params(**kwargs)
    deltas64 = [d.double() for d in deltas if d.any()]   # a zero Δt has no weight (wudi, wudi_cfs) or no part
    want = REFERENCE[name](deltas64, params)
    tol = bound(name, params, deltas64)
    for chunk in (7, 32):
        assert rel_err(run_rows(name, params, deltas, chunk), want) <= tol, chunk
    assert rel_err(run_rows(name, params, deltas, None), want) <= tol


def test_wide_and_small_matrices_keep_the_whole_tensor_path(monkeypatch) -> None:
    """No prepass read for a square or wide matrix, nor (by default) for one the stream keeps in one piece."""
    pre = REGISTRY["actmat"].prepass_for(REGISTRY["actmat"].Params())
    lin = lambda m, n: TensorInfo("w", (m, n), TensorClass.LIN)
    assert pre.covers(None, lin(3000, 1000)) and not pre.covers(None, lin(2999, 1000))
    assert not pre.covers(None, TensorInfo("w", (4, 3000, 1000), TensorClass.LIN))       # MoE batch
    assert not pre.covers(None, TensorInfo("w", (3000, 1000), TensorClass.EMB))
    monkeypatch.setattr(tall, "TALL_MIN_ELEMS", 1 << 22)
    assert not pre.covers(None, lin(4096, 1024)) and pre.covers(None, lin(4097, 1024))


SHAPE = LlamaShape(hidden=64, intermediate=128, layers=1, vocab=1200, heads=2, kv_heads=1)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_example(tmp_path_factory.mktemp("tall"), SHAPE, n_experts=3, dtype=torch.float32)


@pytest.mark.parametrize("name", ["actmat", "wudi_cfs", "wudi", "ace"])
def test_stream_reads_the_tall_head_once_more_and_matches_the_reference(example, tmp_path, monkeypatch,
                                                                        name: str) -> None:
    """A real merge with the 1200x64 LM head in row chunks of 256 rows: the prepass rounds read that tensor only
    (base and experts, once a round), and the head is within the fp64 bound."""
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 1 << 14)
    kwargs = {"steps": 20} if name == "wudi" else {}      # the fp64 reference's Adam forms m x m products
    check_streamed_head(example, tmp_path, name, kwargs, REFERENCE[name], bound)


def check_streamed_head(example: tuple[Path, list[Path]], tmp_path: Path, name: str, kwargs: dict,
                        reference, bound) -> None:
    """Merge ``example`` (SHAPE) with ``name``: the prepass rounds read the LM head only (base and experts, once a
    round), and the merged head is within ``bound(name, params, deltas64)`` of ``reference(deltas64, params)``."""
    base, experts = example
    read = {}
    for method in ("average", name):
        report = merge(base, experts, tmp_path / method, method, device="cpu", **(kwargs if method == name else {}))
        read[method] = report.data["bytes_read"]
    head = 4 * SHAPE.vocab * SHAPE.hidden
    params = REGISTRY[name].Params(**kwargs)
    rounds = REGISTRY[name].prepass_for(params).rounds
    passes = REGISTRY[name].passes_for(params)
    per_model = read["average"] // (1 + len(experts))                     # every model read once, all fp32
    assert read[name] == (1 + passes * len(experts)) * per_model + rounds * (1 + len(experts)) * head
    w0 = load_model(base)["lm_head.weight"].double()
    deltas64 = [load_model(e)["lm_head.weight"].double() - w0 for e in experts]
    got = load_model(tmp_path / name)["lm_head.weight"].double() - w0
    want = reference(deltas64, params)
    rounding = 2 * U32 * float(w0.norm() / want.norm())        # W0 + Δ* rounded to fp32, W0 subtracted in fp64
    assert rel_err(got, want) <= bound(name, params, deltas64) + rounding


@pytest.mark.parametrize("method", ["actmat", "wudi_cfs"])
def test_lora_experts_on_the_row_chunk_path_match_the_fp64_rule(tmp_path_factory, tmp_path, monkeypatch,
                                                                method: str) -> None:
    """LoRA adapters (and one adapter's full lm_head) where every LIN matrix of the tiny Llama counts as tall and is
    merged in row chunks of 16 rows: the Grams' prepass and the chunks get the factors' dense rows; within the fp64
    rule's bound that test_lora holds the core-space path to."""
    test_lora = pytest.importorskip("test_lora")
    base, adapters, full = test_lora._adapters(tmp_path_factory.mktemp("tall_lora"), test_lora._llama, [
        {"target_modules": ["q_proj", "v_proj", "k_proj"]},
        {"target_modules": ["q_proj", "gate_proj", "down_proj"], "use_rslora": True},
        {"target_modules": ["v_proj", "up_proj"], "modules_to_save": ["lm_head"]},
    ])
    monkeypatch.setattr(tall, "TALL_RATIO", 1)
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 16 * 32)
    merge(base, adapters, tmp_path / "out", method, device="cpu")
    test_lora.assert_matches_fp64_rule(tmp_path / "out", base, full, method)
