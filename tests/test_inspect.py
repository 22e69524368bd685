"""`lowmerge inspect --stats`: task-vector diagnostics of real checkpoints through the real CLI, checked against an
fp64 computation written here from ALGORITHMS.md (§2 A = Σ ΔtᵀΔt, §3 ACE's γ), with no streaming code.

Tolerances: the reference takes Δ = W_t − W_0 as the merge defines it, formed in fp32 (exact for the bf16 experts:
both have 8-bit significands), and the CLI accumulates ⟨Δs, Δt⟩ and A in fp64, as the reference does, in another
order: norms, cosines and γ agree to
~1e-15 relative (1e-10 asserted); eigenvalues of A move by ~eps64·‖A‖, so cond(A) (≤ ~1e4 here) agrees to
~eps64·cond ≈ 1e-12 relative (measured 4e-13; 1e-9 asserted, which an A accumulated in fp32, off by ~2e-6, fails).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from lowmem_merge.demo import build_example

from conftest import TINY, run_cli
from test_lora import gpt2, llama  # noqa: F401  (module-scoped adapter fixtures, requested by name below)


def _stats(*args: object) -> dict:
    proc = run_cli("inspect", *args, "--stats", "--json", check=True)
    return json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))["stats"]


def _stats_api(base: Path, experts: list[Path], **kw: object) -> dict:
    """The same data in-process (no interpreter start), for tests that are about numbers, not the command."""
    from lowmem_merge.inspect import describe_plan
    return describe_plan(base, experts, stats=True, device="cpu", **kw)["stats"]


def _weights(path: Path) -> dict[str, np.ndarray]:
    """fp32 values: differences of them are Δ as the merge forms it."""
    return {n: t.float().numpy() for n, t in load_file(path / "model.safetensors").items()}


def _reference(base: Path, experts: list[Path], name: str, cls: str) -> dict:
    """Norms, cosines, γ and cond(A) of one tensor, in fp64 numpy."""
    w0 = _weights(base)[name]
    deltas = [(_weights(e)[name] - w0).astype(np.float64) for e in experts]
    flat = np.stack([d.reshape(-1) for d in deltas])
    g = flat @ flat.T
    norms = np.sqrt(np.diag(g))
    out = {"norms": norms, "cosine": g / np.outer(norms, norms)}
    if cls == "LIN":
        logs = np.log(norms ** 2 + 1e-12)
        out["gamma"] = np.var(logs, ddof=1) / (np.mean(logs) ** 2 + 1e-12)
        ev = np.linalg.eigvalsh(sum(d.T @ d for d in deltas))
        out["cond"] = ev[-1] / ev[0]
    return out


def test_stats_match_an_fp64_reference_per_tensor_and_per_layer(tiny):
    base, experts = tiny
    stats = _stats(base, *experts, "--device", "cpu")
    tensors = {t["name"]: t for t in stats["tensors"]}
    assert set(tensors) == {n for n in _weights(base)}            # no TIED, HEAD or INT tensor in the tiny model
    for name, got in tensors.items():
        want = _reference(base, experts, name, got["class"])
        np.testing.assert_allclose(got["norms"], want["norms"], rtol=1e-10)
        np.testing.assert_allclose(np.array(got["cosine"], dtype=float), want["cosine"], rtol=1e-10, atol=1e-12)
        if got["class"] == "LIN":
            assert got["gamma"] == pytest.approx(want["gamma"], rel=1e-10)
            assert got["rank"] == got["n"] and got["cond"] == pytest.approx(want["cond"], rel=1e-9)
        else:
            assert "gamma" not in got and "cond" not in got
    layer = next(r for r in stats["layers"] if r["name"] == "model.layers.1")
    members = [t for n, t in tensors.items() if n.startswith("model.layers.1.")]
    assert layer["tensors"] == len(members) == 9
    np.testing.assert_allclose(layer["norms"], np.sqrt(sum(np.square(t["norms"]) for t in members)), rtol=1e-10)
    assert layer["gamma_max"] == max(t["gamma"] for t in members if t["class"] == "LIN")
    assert layer["cond_max"] == max(t["cond"] for t in members if t["class"] == "LIN")
    everything = np.concatenate([[np.square(t["norms"])] for t in tensors.values()]).sum(0)
    np.testing.assert_allclose(stats["total"]["norms"], np.sqrt(everything), rtol=1e-10)
    assert stats["warnings"] == []          # the demo's experts differ in scale by 2× at most


def test_table_and_json_agree_and_json_round_trips(tiny):
    base, experts = tiny
    proc = run_cli("inspect", base, *experts, "--stats", "--json", check=True)
    data = json.loads(proc.stdout)
    assert json.loads(json.dumps(data)) == data
    text = run_cli("inspect", base, *experts, "--stats", check=True).stdout
    assert "estimated peak memory" in text                          # the plan is still there
    for row in data["stats"]["layers"] + [{"name": "total", **data["stats"]["total"]}]:
        line = next(ln for ln in text.splitlines() if ln.split()[:1] == [row["name"]])
        assert line.split()[1:4] == [f"{n:.3g}" for n in row["norms"]]
    plain = json.loads(run_cli("inspect", base, *experts, "--json", check=True).stdout)
    assert "stats" not in plain and {k: v for k, v in data.items() if k != "stats"} == plain


def test_expert_equal_to_the_base_is_named_and_scaled_expert_warns(tiny, tmp_path):
    base, experts = tiny
    copy = shutil.copytree(base, tmp_path / "copy_of_base")
    stats = _stats(base, experts[0], copy, base)      # the base itself: the plan already says so, once is enough
    zero = [w for w in stats["warnings"] if "equals the base" in w]
    assert len(zero) == 1 and "expert 1 " in zero[0] and str(copy) in zero[0]
    assert stats["total"]["norms"][1] == 0.0 and stats["total"]["cosine"][0][1] is None
    assert not any("scales" in w for w in stats["warnings"])     # zero experts are not a scale
    text = run_cli("inspect", base, experts[0], copy, base, "--stats", check=True).stdout
    assert sum("its task vector is zero" in ln or "equals the base" in ln for ln in text.splitlines()) == 2

    big = shutil.copytree(experts[1], tmp_path / "big")
    w0, w1 = load_file(base / "model.safetensors"), load_file(experts[1] / "model.safetensors")
    save_file({n: (w0[n].float() + 50 * (w1[n].float() - w0[n].float())).to(w1[n].dtype) for n in w1},
              big / "model.safetensors")
    stats = _stats(base, experts[0], big, experts[2])
    scale = [w for w in stats["warnings"] if "very different scales" in w]
    assert len(scale) == 1 and "(expert 1)" in scale[0]
    ratio = stats["total"]["norms"][1] / stats["total"]["norms"][0]
    assert 50 < ratio < 150                                      # ×50 on top of the demo's own 1.5×


def test_tied_embeddings_are_reported(tmp_path):
    base, experts = build_example(tmp_path / "tied", dataclasses.replace(TINY, tie_embeddings=True), n_experts=2)
    stats = _stats_api(base, experts)
    assert any("tie_word_embeddings" in w for w in stats["warnings"])
    for d in [base, *experts]:                          # lm_head stored too: the plan makes it a TIED alias
        sd = load_file(d / "model.safetensors")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, d / "model.safetensors")
    stats = _stats_api(base, experts)
    assert [w for w in stats["warnings"] if "tied" in w] == \
        ["tied embeddings: lm_head.weight is written as the merged model.embed_tokens.weight (the EMB rule), not "
         "merged as a LIN layer"]
    assert "lm_head.weight" not in {t["name"] for t in stats["tensors"]}   # an alias is not read again


def test_cond_max_dim_limits_the_condition_numbers(tiny):
    base, experts = tiny
    stats = _stats_api(base, experts, cond_max_dim=32)          # down_proj (n = 48) is left out
    lin = {t["name"]: t for t in stats["tensors"] if t["class"] == "LIN"}
    assert "cond" not in lin["model.layers.0.mlp.down_proj.weight"]
    assert "gamma" in lin["model.layers.0.mlp.down_proj.weight"] and "cond" in lin["lm_head.weight"]


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_lora_adapters_give_the_stats_of_their_materialized_experts(model, request):
    """Dyadic factors (test_lora.py): the adapters' Δ are bitwise the materialized experts', through the same
    arithmetic, so every number agrees. GPT-2's adapters are fan_in_fan_out on transposed Conv1D weights."""
    base, adapters, full = request.getfixturevalue(model)
    got, want = _stats_api(base, adapters), _stats_api(base, full)
    assert got["tensors"] == want["tensors"] and got["layers"] == want["layers"]
    lin = {t["name"]: t for t in got["tensors"] if t["class"] == "LIN"}
    name = "model.layers.0.self_attn.q_proj.weight" if model == "llama" else "transformer.h.0.attn.c_attn.weight"
    q = lin[name]                                  # two rank-4 adapters touch it: A has rank 8 < n, no finite cond
    assert q["rank"] == 8 < q["n"] and q["cond"] is None
    row = next(r for r in got["layers"] if name.startswith(r["name"] + "."))
    assert row["singular"] >= 1


@pytest.mark.gpu
def test_cuda_stats_equal_cpu_stats(tiny):
    base, experts = tiny
    cpu, gpu = _stats(base, *experts, "--device", "cpu"), _stats(base, *experts, "--device", "cuda")
    for a, b in zip(cpu["tensors"], gpu["tensors"]):
        np.testing.assert_allclose(a["norms"], b["norms"], rtol=1e-10)
        if "cond" in a:
            assert a["cond"] == pytest.approx(b["cond"], rel=1e-6)



def test_stacked_moe_experts_are_matrices_in_the_method_orientation(tmp_path):
    """GPT-OSS stores its experts (E, in, out): γ and cond(A) are per (out, in) matrix, the largest reported."""
    from test_moe import _gpt_oss
    base, experts = _gpt_oss(tmp_path / "in")
    stats = _stats_api(base, experts)
    got = {t["name"]: t for t in stats["tensors"]}["model.layers.0.mlp.experts.gate_up_proj"]
    w0 = _weights(base)["model.layers.0.mlp.experts.gate_up_proj"]
    deltas = [(_weights(e)["model.layers.0.mlp.experts.gate_up_proj"] - w0).astype(np.float64)   # (E, in, out)
              for e in experts]
    gammas, conds = [], []
    for j in range(w0.shape[0]):
        mats = [d[j].T for d in deltas]                                                          # (out, in)
        logs = np.log([np.sum(m ** 2) + 1e-12 for m in mats])
        gammas.append(np.var(logs, ddof=1) / (np.mean(logs) ** 2 + 1e-12))
        ev = np.linalg.eigvalsh(sum(m.T @ m for m in mats))
        conds.append(ev[-1] / ev[0])
    assert got["n"] == w0.shape[1] and got["gamma"] == pytest.approx(max(gammas), rel=1e-10)
    assert got["cond"] == pytest.approx(max(conds), rel=1e-9)


@pytest.mark.parametrize("model", ["tiny", "llama"])
def test_row_chunks_give_the_same_stats(model, request, monkeypatch):
    """A = Σ ΔtᵀΔt and ⟨Δs, Δt⟩ summed over row chunks of 2 rows (adapters: rows of B) equal the whole-tensor ones."""
    from lowmem_merge import diagnostics
    base, experts, *_ = request.getfixturevalue(model)
    whole = _stats_api(base, experts)
    monkeypatch.setattr(diagnostics, "STACK_ELEMS", len(experts) * 2 * 32)     # 2 rows of n = 32 per expert
    chunked = _stats_api(base, experts)
    for a, b in zip(whole["tensors"], chunked["tensors"]):
        assert a["name"] == b["name"]
        np.testing.assert_allclose(a["norms"], b["norms"], rtol=1e-12)
        for key in ("gamma", "cond"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-9), (a["name"], key)
        assert a.get("rank") == b.get("rank")


def test_zero_element_tensors_are_copied_from_the_base_not_divided_by(tiny):
    base, experts = tiny
    for d in [base, *experts]:
        tensors = load_file(d / "model.safetensors")
        tensors["model.extra.weight"] = tensors["model.norm.weight"].new_zeros(0, 32)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("inspect", base, *experts, "--stats", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"name": "model.extra.weight", "class": "INT"}.items() <= next(
        t for t in plan["tensors"] if t["name"] == "model.extra.weight").items()


def test_a_method_is_planned_with_its_given_parameters(tiny):
    """`-m sce -p select_topk=0.1` plans sce's top-k rounds (the histogram rounds and every expert's piece held),
    as the merge with those parameters would run; the other rules keep their defaults; -p alone is refused."""
    base, experts = tiny
    plain = json.loads(run_cli("inspect", base, *experts, "--json", check=True).stdout)["methods"]
    topk = json.loads(run_cli("inspect", base, *experts, "--json", "-m", "sce", "-p", "select_topk=0.1",
                              check=True).stdout)["methods"]
    assert (plain["sce"]["reads"], topk["sce"]["reads"]) == (3, 5)
    assert topk["sce"]["peak_bytes"] > plain["sce"]["peak_bytes"]
    assert {k: v for k, v in topk.items() if k != "sce"} == {k: v for k, v in plain.items() if k != "sce"}
    proc = run_cli("inspect", base, *experts, "-p", "select_topk=0.1")
    assert proc.returncode == 1 and proc.stderr.startswith("error: -p needs --method"), proc.stderr
