"""TSV-M, Iso-C and Iso-CTS on tall LIN tensors in row chunks (issue 17 §3, methods/spectral_tall.py), their memory,
and the plan at 70B x 8.

The chunked path sums the whole path's fp64 Grams chunk by chunk and takes each factor from them (thin_svd's and
polar_'s Gram routes), so it is NOT promised bitwise equal to the whole-tensor path: both are held to test_methods'
bound against the fp64 reference, SOLVE_C·κ·u with κ the rule's sensitivity (reference.py). Where the whole path
would take LAPACK (a Gram route's condition fails), the tall path keeps the Gram route and says so in its stats.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import reference as ref
from lowmem_merge import stream
from lowmem_merge.demo import LlamaShape, build_example
from lowmem_merge.info import TensorClass, TensorInfo
from lowmem_merge.methods import REGISTRY, tall
from lowmem_merge.methods.drive import drive
from conftest import bytes_held, needs_clear_refs, plan_70b
from test_memory import estimate, matrix_vocab, peak_rss  # noqa: F401 (matrix_vocab: a fixture)
from test_methods import SOLVE_C, U32, rel_err
from test_tall import SHAPE, _case, check_streamed_head, run_rows

RULES = ["tsv", "iso_c", "iso_cts"]
REFERENCE = {"tsv": lambda ds, p: ref.tsv_matrix(ds, p.scale),
             "iso_c": lambda ds, p: ref.iso_c_matrix(ds, p.scale),
             "iso_cts": lambda ds, p: ref.iso_cts_matrix(ds, p.common_fraction, p.scale)}
SENSITIVITY = {"tsv": lambda ds, p: ref.tsv_sensitivity(ds),
               "iso_c": lambda ds, p: ref.iso_c_sensitivity(ds),
               "iso_cts": lambda ds, p: ref.iso_cts_sensitivity(ds, p.common_fraction)}
PARAMS = {"tsv": [{}, {"scale": 0.5}], "iso_c": [{"scale": 1.5}], "iso_cts": [{}, {"common_fraction": 0.5}]}


@pytest.fixture(autouse=True)
def small_tall(monkeypatch):
    monkeypatch.setattr(tall, "TALL_MIN_ELEMS", 0)   # these small tall matrices count as tall


def _graded(case: str) -> list[torch.Tensor]:
    """Two tall 90x8 experts whose top k = 4 singular values reach 5e-4·σ1: TSV's Gram route is unproven there
    (GRAM_COND = 1e3), Iso-C's polar route still proven (σ_min of the sum above σ1/POLAR_COND)."""
    values = torch.tensor([1.0, 0.7, 0.5, 5e-4, 4e-4, 3e-4, 2e-4, 1e-4], dtype=torch.float64)
    out = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(90, 8, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
        out.append(((u * values) @ v.T).float())
    return out


def _bound(name: str, params: object, deltas64: list[torch.Tensor]) -> float:
    return SOLVE_C * SENSITIVITY[name](deltas64, params) * U32


@pytest.mark.parametrize("case", ["tall", "bf16", "heterogeneous", "zero_expert", "graded"])
@pytest.mark.parametrize("name,kwargs", [(n, k) for n in RULES for k in PARAMS[n]],
                         ids=[f"{n}-{k}" for n in RULES for k in PARAMS[n]])
def test_row_chunks_and_whole_tensor_both_match_the_fp64_reference(name: str, kwargs: dict, case: str) -> None:
    """Chunks of 7 rows (the last one short) and of 32, and the whole tensor, each within the rule's bound."""
    deltas = _graded(case) if case == "graded" else _case(case)
    params = REGISTRY[name].Params(**kwargs)
    deltas64 = [d.double() for d in deltas]
    want = REFERENCE[name](deltas64, params)
    tol = _bound(name, params, deltas64)
    for chunk in (7, 32):
        assert rel_err(run_rows(name, params, deltas, chunk), want) <= tol, chunk
    assert rel_err(run_rows(name, params, deltas, None), want) <= tol


def _tall_stats(name: str, deltas: list[torch.Tensor]) -> dict[str, float]:
    cls = REGISTRY[name]
    params = cls.Params()
    m, n = deltas[0].shape
    info = TensorInfo("lm_head.weight", (m, n), TensorClass.LIN)
    pre = cls.prepass_for(params)(len(deltas), params)
    for round_ in range(pre.rounds):
        for t, d in enumerate(deltas):
            pre.observe(round_, info, t, d)
        pre.end_round(round_)
    state = pre.state()
    return drive(cls, params, info, len(deltas), lambda pass_, t: deltas[t], state)[1]


def test_an_unproven_gram_route_is_reported() -> None:
    """Where the whole path would take LAPACK, the chunks keep the Gram route and count it (stats)."""
    assert _tall_stats("tsv", _graded("graded"))["gram_unproven"] >= 1
    assert _tall_stats("tsv", _case("tall"))["gram_unproven"] == 0
    assert _tall_stats("iso_c", _case("tall"))["gram_unproven"] == 0


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_example(tmp_path_factory.mktemp("tall_spectral"), SHAPE, n_experts=3, dtype=torch.float32)


@pytest.mark.parametrize("name", RULES)
def test_stream_reads_the_tall_head_in_its_rounds_and_matches_the_reference(example, tmp_path, monkeypatch,
                                                                           name: str) -> None:
    """A real merge with the 1200x64 LM head in row chunks of 256 rows: the prepass rounds read that tensor only
    (base and experts, once a round), and the head is within the fp64 bound."""
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 1 << 14)
    check_streamed_head(example, tmp_path, name, {}, REFERENCE[name], _bound)


# ---- memory: a vocabulary large relative to hidden (test_memory.py's matrix case) ---------------------------------

# one rule per memory test in the default run (the suite's 10-minute budget); `make test-slow` runs the others
@pytest.mark.parametrize("method", [m if m == "tsv" else pytest.param(m, marks=pytest.mark.slow) for m in RULES])
def test_peak_rss_is_flat_in_the_vocabulary_and_under_the_estimate(matrix_vocab, tmp_path, method):
    """`lowmerge merge` subprocesses: the 128000x256 head in row chunks adds what `average` adds (its read buffers),
    not the whole head's slots and factors; each peak is within `inspect`'s estimate."""
    examples, average_growth = matrix_vocab
    peaks, bounds = {}, {}
    for size, ex in examples.items():
        peaks[size] = peak_rss(ex, tmp_path / size, method)
        bounds[size] = estimate(ex, method)
    print(f"{method}: vocab 32000 {peaks['small'] / 2**20:.0f} MiB (inspect {bounds['small'] / 2**20:.0f}), "
          f"vocab 128000 {peaks['big'] / 2**20:.0f} MiB (inspect {bounds['big'] / 2**20:.0f}); average gains "
          f"{average_growth / 2**20:.0f} MiB")
    assert peaks["big"] - peaks["small"] <= average_growth + 48 * 2**20, (peaks, average_growth)
    assert all(peaks[s] <= bounds[s] for s in peaks), (peaks, bounds)


@needs_clear_refs
def test_an_fp64_eigh_holds_what_eigh_floats_prices():
    """A subprocess's peak RSS beside the input during one fp64 eigh (n = 2048): at most EIGH_FLOATS fp32 values per
    n², which every spectral rule's plan prices (at full width a tsv LM head measured 0.13 GiB over a plan priced at
    2.5 fp64 n²); and at least the vectors and syevd's 2n² workspace, so the measurement itself is real."""
    from lowmem_merge.methods.matrix_rule import EIGH_FLOATS
    n = 2048
    held = bytes_held("g = torch.randn(n, n, dtype=torch.float64)\ng = g @ g.T", "torch.linalg.eigh(g)", n)
    print(f"eigh held {held / (8 * n * n):.2f} fp64 n² (priced {EIGH_FLOATS / 2:.2f})")
    assert 2.5 * 8 * n * n <= held <= EIGH_FLOATS * 4 * n * n, held / (8 * n * n)


# ---- the plan at 70B x 8 (header-only, issue 17 §3) -----------------------------------------------------------

MATRIX_TARGET = 8 * 10**9


@pytest.mark.parametrize("method", RULES)
def test_every_tensor_of_the_70b_plan_is_within_8_gb(tmp_path, method):
    """hidden 8192, intermediate 28672, vocab 128256, base + 8 experts: the LM head and gate/up_proj in row chunks,
    q/o_proj and down_proj whole with in-place polar factors; each piece, runtime included, within 8 GB."""
    need = plan_70b(tmp_path, method)
    over = {k: round(v / 2**30, 2) for k, v in need.items() if v > MATRIX_TARGET}
    assert not over, over
    assert "lm_head.weight" in need


# ---- memory of the whole-tensor LAPACK route (rank-deficient experts, a wide down_proj) --------------------------

LOW_RANK = LlamaShape(hidden=1024, intermediate=4096, layers=1, vocab=1024, heads=8, kv_heads=2)


@pytest.fixture(scope="module")
def low_rank_example(tmp_path_factory) -> tuple[Path, list[Path]]:
    """fp32 base + 3 experts whose every matrix differs from the base by an exact rank-4 product (merged LoRA
    adapters): the Gram routes' conditions fail wherever more than 4 triplets (or a polar factor) are needed."""
    from safetensors.torch import load_file, save_file
    root = tmp_path_factory.mktemp("spectral_low_rank")
    base, _ = build_example(root, LOW_RANK, n_experts=0, dtype=torch.float32)
    weights = load_file(base / "model.safetensors")
    experts = []
    for t in range(3):
        g = torch.Generator().manual_seed(100 + t)
        out = {name: (w + 0.02 * torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g)
                      if w.dim() == 2 else w.clone()) for name, w in weights.items()}
        d = root / f"expert{t}"
        d.mkdir()
        save_file(out, d / "model.safetensors")
        (d / "config.json").write_text((base / "config.json").read_text())
        experts.append(d)
    return base, experts


@pytest.mark.slow   # 21 s for iso_cts alone; `make test` keeps the Gram route's bound (the vocabulary test above)
@pytest.mark.parametrize("method", RULES)
def test_the_lapack_route_of_a_wide_matrix_stays_under_the_estimate(low_rank_example, tmp_path, monkeypatch, method):
    """`lowmerge merge` subprocess on rank-4 experts: down_proj (1024x4096, whole) takes the LAPACK route (checked
    here in process), on the 1024x1024 R factor of its transpose; the run's peak stays within `inspect`'s estimate,
    which prices that route beside one of Δ or the result (matrix_rule.one_buffer_floats)."""
    from lowmem_merge.methods.matrix_rule import _gram_svd
    from safetensors.torch import load_file
    base, experts = low_rank_example
    name = "model.layers.0.mlp.down_proj.weight"
    delta = load_file(experts[0] / "model.safetensors")[name] - load_file(base / "model.safetensors")[name]
    assert _gram_svd(delta, min(delta.shape) // len(experts)) is None        # TSV's per-expert route: LAPACK
    peak = peak_rss(low_rank_example, tmp_path / method, method)
    bound = estimate(low_rank_example, method)
    print(f"{method}: rank-4 experts, down_proj 1024x4096 by LAPACK: {peak / 2**20:.0f} MiB "
          f"(inspect {bound / 2**20:.0f})")
    assert peak <= bound, (peak, bound)
