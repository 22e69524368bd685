"""Mixture-of-experts layers stored as stacked 3-D weights are batches of LIN matrices (ALGORITHMS.md §13).

Real transformers MoE models: GPT-OSS stores its experts stacked as (E, in, out); a safetensors file with a stacked
(E, out, in) `experts.*` tensor (Mixtral/Qwen-MoE's layout inside transformers 5) covers the other orientation.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import reference as ref
from lowmem_merge.info import TensorClass
from lowmem_merge.io.checkpoint import open_checkpoint
from lowmem_merge.merge import merge
from lowmem_merge.plan import make_plan

transformers = pytest.importorskip("transformers")


def _gpt_oss(root: Path, n_experts: int = 2) -> tuple[Path, list[Path]]:
    """A tiny GPT-OSS base and experts whose every float tensor moved by a small random delta."""
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, num_local_experts=3, num_experts_per_tok=2,
                                    vocab_size=64, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg)
    base = root / "base"
    model.save_pretrained(base)
    experts = []
    for t in range(n_experts):
        g = torch.Generator().manual_seed(100 + t)
        sd = load_file(base / "model.safetensors")
        for name, w in sd.items():
            if w.is_floating_point():
                w.add_(0.02 * torch.randn(w.shape, generator=g, dtype=torch.float32).to(w.dtype))
        d = root / f"expert{t}"
        d.mkdir()
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text((base / "config.json").read_text())
        experts.append(d)
    return base, experts


def test_gpt_oss_stacked_experts_are_lin_batches_merged_per_expert(tmp_path: Path) -> None:
    base, experts = _gpt_oss(tmp_path / "in")
    with open_checkpoint(base) as b, open_checkpoint(experts[0]) as e:
        infos = {i.name: i for i in make_plan(b, [e]).tensors}
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    stored = load_file(base / "model.safetensors")[gate_up].shape       # (E, in, out)
    assert infos[gate_up].cls == TensorClass.LIN and infos[gate_up].transposed
    assert infos[gate_up].shape == (stored[0], stored[2], stored[1])
    assert infos[gate_up + "_bias"].cls == TensorClass.VEC             # (E, out) biases are vectors

    out = tmp_path / "merged"
    merge(base, experts, out, "actmat", device="cpu", dtype="float32")
    got = load_file(out / "model.safetensors")
    w0 = load_file(base / "model.safetensors")
    ws = [load_file(e / "model.safetensors") for e in experts]
    for name in (gate_up, "model.layers.0.mlp.experts.down_proj"):
        taus = [(w[name].double() - w0[name].double()).mT for w in ws]   # (E, out, in), the method's orientation
        want = ref.per_matrix(lambda ds: ref.actmat_matrix(ds, 1e-3), taus).mT + w0[name].double()
        err = float((got[name].double() - want).norm() / (want - w0[name].double()).norm())
        assert err < 1e-4, (name, err)
    bias = "model.layers.0.mlp.experts.down_proj_bias"
    mean = torch.stack([w[bias].double() for w in ws]).mean(0)
    assert torch.allclose(got[bias].double(), mean, atol=1e-6)

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert torch.isfinite(logits).all()


def test_stacked_out_in_experts_are_merged_per_matrix(tmp_path: Path) -> None:
    """(E, out, in) under `.experts.`: LIN, not transposed; a 3-D tensor elsewhere stays CONV (the mean)."""
    g = torch.Generator().manual_seed(0)
    names = {"model.layers.0.mlp.experts.gate_up_proj": (3, 10, 6), "conv.weight": (4, 3, 2)}
    w0 = {n: torch.randn(s, generator=g) for n, s in names.items()}
    paths = [tmp_path / "base.safetensors"] + [tmp_path / f"e{t}.safetensors" for t in range(3)]
    weights = [w0] + [{n: w + 0.1 * torch.randn(w.shape, generator=g) for n, w in w0.items()} for _ in range(3)]
    for p, sd in zip(paths, weights):
        save_file(sd, p)
    out = tmp_path / "merged"
    merge(paths[0], paths[1:], out, "wudi_cfs", device="cpu")
    got = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    taus = [sd[name].double() - w0[name].double() for sd in weights[1:]]
    want = w0[name].double() + ref.per_matrix(lambda ds: ref.wudi_cfs_matrix(ds, 1e-5), taus)
    assert float((got[name].double() - want).norm() / (want - w0[name]).norm()) < 1e-4
    conv_mean = w0["conv.weight"].double() + torch.stack(
        [sd["conv.weight"].double() - w0["conv.weight"].double() for sd in weights[1:]]).mean(0)
    assert torch.allclose(got["conv.weight"].double(), conv_mean, atol=1e-6)
