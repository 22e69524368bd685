"""mergekit's passthrough with slices (layer stacking): depth, config and every tensor against its source layer,
and the stacked model loads and runs in transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lowmem_merge.demo import LlamaShape, build_example

from conftest import run_cli
from test_merge import load_model

SHAPE = LlamaShape(hidden=32, intermediate=48, layers=4, vocab=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("stack")
    base, experts = build_example(root / "in", SHAPE, n_experts=1, dtype=torch.float32)
    return root, base, experts[0]


def _recipe(root: Path, slices: list[tuple[Path, int, int]], name: str = "stack.yaml", **extra) -> Path:
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(m), "layer_range": [a, b]}]} for m, a, b in slices], **extra}
    path = root / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_stacked_depth_config_and_tensors_follow_the_recipe(two_models):
    root, a, b = two_models
    recipe = _recipe(root, [(a, 0, 3), (b, 1, 4), (a, 2, 4)])        # 3 + 3 + 2 = 8 layers from 4-layer models
    proc = run_cli("merge", "--config", recipe, "-o", root / "out", "--shard-size", "40KB", check=True)
    assert "stacked 8 layers from 3 slice(s)" in proc.stdout
    out = root / "out"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8 and cfg["hidden_size"] == SHAPE.hidden
    got, wa, wb = load_model(out), load_model(a), load_model(b)
    sources = [(wa, 0), (wa, 1), (wa, 2), (wb, 1), (wb, 2), (wb, 3), (wa, 2), (wa, 3)]
    layer_names = [n.removeprefix("model.layers.0.") for n in wa if n.startswith("model.layers.0.")]
    assert len(got) == len(wa) + 4 * len(layer_names)
    for i, (w, j) in enumerate(sources):
        for rest in layer_names:
            assert torch.equal(got[f"model.layers.{i}.{rest}"], w[f"model.layers.{j}.{rest}"]), (i, rest)
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])   # first slice's model
    assert torch.equal(got["model.norm.weight"], wa["model.norm.weight"])                   # last slice's model
    assert torch.equal(got["lm_head.weight"], wa["lm_head.weight"])
    assert (out / "model.safetensors.index.json").is_file()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 8
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(1, 9)[None]).logits).all()


def test_post_layer_tensors_come_from_the_last_slice(two_models):
    root, a, b = two_models
    run_cli("merge", "--config", _recipe(root, [(a, 0, 2), (b, 2, 4)], "ab.yaml"), "-o", root / "ab", "-q",
            check=True)
    got, wa, wb = load_model(root / "ab"), load_model(a), load_model(b)
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], wb["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], wb["lm_head.weight"])
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"], wb["model.layers.3.mlp.down_proj.weight"])


@pytest.mark.parametrize("slices,message", [
    ([("A", 0, 5)], "layer_range [0, 5] is outside the model's 4 layers"),
    ([("A", 2, 2)], "layer_range [2, 2] is outside"),
])
def test_bad_ranges_are_named(two_models, tmp_path, slices, message):
    root, a, _ = two_models
    recipe = _recipe(tmp_path, [(a, x, y) for _, x, y in slices])
    proc = run_cli("merge", "--config", recipe, "-o", tmp_path / "out")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_layer_of_another_width_is_refused(two_models, tmp_path):
    root, a, _ = two_models
    wide, _ = build_example(tmp_path / "wide", LlamaShape(hidden=64, intermediate=48, layers=2, vocab=64, heads=4,
                                                            kv_heads=2), n_experts=0, dtype=torch.float32)
    proc = run_cli("merge", "--config", _recipe(tmp_path, [(a, 0, 2), (wide, 0, 2)]), "-o", tmp_path / "out")
    assert proc.returncode == 1 and "layer differs from the first slice's first layer" in proc.stderr, proc.stderr
    assert str(wide) in proc.stderr


def test_several_sources_in_a_slice_are_refused(two_models, tmp_path):
    root, a, b = two_models
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}]}]}))
    proc = run_cli("merge", "--config", recipe, "-o", tmp_path / "out")
    assert "passthrough takes exactly one source per slice" in proc.stderr


def test_one_model_passthrough_copies_it_in_another_dtype(two_models, tmp_path):
    root, a, _ = two_models
    recipe = tmp_path / "copy.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "bfloat16", "models": [{"model": str(a)}]}))
    run_cli("merge", "--config", recipe, "-o", tmp_path / "out", "-q", check=True)
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_model(a)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], w.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
