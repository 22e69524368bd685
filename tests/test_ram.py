"""ram and ramplus_tl (Reinforced Agent Merging, arXiv 2601.13572) as mergekit 0.1.5 defines them: against the
formula in fp64, whole tensors and in row chunks, and against mergekit itself where bench/_work's venv exists."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lowmem_merge import merge, stream
from lowmem_merge.demo import build_example

from conftest import merge_configs
from test_mergekit_methods import MERGEKIT, SHAPE, both_tools, tensors

EPSILON = 2e-3          # above some |Δ| of the test's experts, below others: entries moved by 0, 1, 2 or 3 experts
RECIPES = {
    "ram": {"epsilon": EPSILON},
    "ramplus_tl": {"epsilon": EPSILON, "r": 0.5, "alpha": 0.8},
    "ramplus_tl_defaults": {},
}


def ram64(w0: torch.Tensor, ws: list[torch.Tensor], epsilon: float = 1e-5, r: float | None = None,
          alpha: float = 0.2) -> torch.Tensor:
    """mergekit's ram (r None) and ramplus_tl, as its source writes them, in fp64 on the whole tensor."""
    tv = torch.stack([w - w0 for w in ws]).reshape(len(ws), -1)
    moved = tv.abs() > epsilon
    counts = moved.sum(0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    z = tv * moved
    lam = torch.ones(len(ws), 1, dtype=tv.dtype)
    if r is not None:
        rho = (moved & overlap).sum(1) / (moved & unique).sum(1).double().clamp(min=epsilon)
        lam = (1 + r * rho.clamp(0, alpha)).unsqueeze(-1)
    merged = (z * unique * lam + z * overlap / counts.clamp(min=1)).sum(0)
    return w0 + merged.reshape(w0.shape)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    root = tmp_path_factory.mktemp("ram")
    base, experts = build_example(root / "in", SHAPE, n_experts=3, dtype=torch.float32)
    return root, base, experts


def write_recipe(root: Path, key: str, base: Path, experts: list[Path]) -> Path:
    recipe = {"merge_method": key.removesuffix("_defaults"), "base_model": str(base), "dtype": "float32",
              "parameters": RECIPES[key], "models": [{"model": str(e)} for e in experts]}
    path = root / f"{key}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def want(key: str, base: Path, experts: list[Path]) -> dict[str, torch.Tensor]:
    p = RECIPES[key]
    plus = key.startswith("ramplus")
    w0 = tensors(base)
    ws = [tensors(e) for e in experts]
    return {name: ram64(b.double(), [w[name].double() for w in ws], p.get("epsilon", 1e-5),
                        p.get("r", 0.1) if plus else None, p.get("alpha", 0.2))
            for name, b in w0.items() if b.is_floating_point() and b.dim() > 0}


def close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for name, w in expected.items():
        # fp32 Δ and sums: a few ulps of the weights' scale. An entry at |Δ| = ε exactly could flip; the test's
        # weights are random floats, none of which sits on ε
        assert float((got[name].double() - w).abs().max()) <= 16 * 2 ** -23 * max(1.0, float(w.abs().max())), name


@pytest.fixture(scope="module")
def outputs(models) -> dict[str, Path]:
    root, base, experts = models
    return merge_configs(root, {key: write_recipe(root, key, base, experts) for key in RECIPES})


@pytest.mark.parametrize("key", list(RECIPES))
def test_ram_recipe_matches_the_formula(models, outputs, key: str) -> None:
    root, base, experts = models
    close(tensors(outputs[key]), want(key, base, experts))


def test_the_recipes_reach_every_case(models) -> None:
    """Entries moved by no expert, by one, and by several; λ_t away from 1 and from its cap."""
    root, base, experts = models
    name = "model.layers.0.mlp.down_proj.weight"
    b, ws = tensors(base)[name], [tensors(e)[name] for e in experts]
    counts = sum(((w - b).abs() > EPSILON).int() for w in ws)
    assert all(bool((counts == c).any()) for c in (0, 1, 2, 3))
    plus = ram64(b.double(), [w.double() for w in ws], EPSILON, 0.5, 0.8)
    assert not torch.allclose(plus, ram64(b.double(), [w.double() for w in ws], EPSILON))


@pytest.mark.parametrize("method,params", [("ram", {"epsilon": EPSILON}),
                                           ("ramplus_tl", {"epsilon": EPSILON, "r": 0.5, "alpha": 0.8})])
def test_row_chunks_equal_the_formula(models, tmp_path: Path, monkeypatch, method: str, params: dict) -> None:
    """The per-tensor prepass (ramplus_tl's ρ) sees a tensor chunk by chunk; chunks merge independently."""
    root, base, experts = models
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 100)     # every 2-D tensor in row ranges of 3 rows or fewer
    merge(base, experts, tmp_path / "chunks", method, device="cpu", **params)
    close(tensors(tmp_path / "chunks"), want("ram" if method == "ram" else "ramplus_tl", base, experts))


def test_lambda_of_an_expert_with_no_unique_entry_is_capped(tmp_path: Path) -> None:
    """ρ = shared / max(unique, ε): an expert that moves only shared entries gets λ = 1 + r·α."""
    w0 = torch.zeros(4, 8)
    a = w0.clone()
    a[0] = 1.0                        # a: row 0 only, shared with b
    b = w0.clone()
    b[0] = 3.0
    b[1] = 2.0                        # b: row 0 shared, row 1 alone
    for name, t in (("base", w0), ("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({"model.layers.0.mlp.down_proj.weight": t}, tmp_path / name / "model.safetensors")
    merge(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], tmp_path / "out", "ramplus_tl", device="cpu",
          r=0.5, alpha=0.8)
    got = tensors(tmp_path / "out")["model.layers.0.mlp.down_proj.weight"]
    lam_b = 1 + 0.5 * min(0.8, 8 / 8)            # b: 8 shared, 8 alone
    torch.testing.assert_close(got[0], torch.full((8,), 2.0))
    torch.testing.assert_close(got[1], torch.full((8,), 2.0 * lam_b))
    assert bool((got[2:] == 0).all())


@pytest.mark.skipif(not MERGEKIT.is_file(), reason="mergekit's venv (bench/vs_mergekit.py) is not built here")
@pytest.mark.parametrize("key", list(RECIPES))
def test_ram_recipe_matches_mergekit_itself(models, key: str) -> None:
    root, base, experts = models
    both_tools(write_recipe(root, key, base, experts), root / f"mk-{key}", root / f"lm-{key}")
