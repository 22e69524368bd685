"""--output-format peft: PEFT's merge_and_unload() of lowmerge's merged adapter equals lowmerge's full-model merge.

The adapters are test_lora's (dyadic weights and factors, dyadic scales): with dyadic rule weights every product and
sum below is exact in fp32, so the concatenating rules give bitwise the full merge. The truncating rules are held to
the error the report states, and that error to the Eckart–Young optimum computed in fp64 from the full merge.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_merge import merge
from lowmem_merge.errors import ConfigError
from test_lora import _adapters, _gpt2, _llama, _one_line_error
from conftest import run_cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

EPS32 = torch.finfo(torch.float32).eps
LLAMA_CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},                                                   # s = 2
    {"target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"], "use_rslora": True,
     "alpha_pattern": {"o_proj": 3}},                                                           # s = 4, o: 1.5
    {"target_modules": ["v_proj", "gate_proj", "up_proj"], "rank_pattern": {"up_proj": 2},
     "layers_to_transform": [1]},                                                               # layer 1 only
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    return _adapters(tmp_path_factory.mktemp("llama"), _llama, LLAMA_CONFIGS)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    return _adapters(tmp_path_factory.mktemp("gpt2"), _gpt2, [
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
        {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "use_rslora": True},
    ])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base with lowmerge's adapter loaded by PEFT, merged by PEFT."""
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


def _both(base: Path, adapters: list[Path], where: Path, method: str, **kw) -> tuple[dict, dict, dict]:
    """(PEFT's merge of lowmerge's adapter, lowmerge's full merge, the report) for one rule."""
    merge(base, adapters, where / "full", method, **kw)
    report = merge(base, adapters, where / "adapter", method, output_format="peft", **kw)
    return _peft_merged(base, where / "adapter"), _state(where / "full"), report.data


def _adapter_targets(adapters: list[Path]) -> dict[str, int]:
    """Σ r_t per adapted module, from the input adapters' own files."""
    ranks: dict[str, int] = {}
    for a in adapters:
        for key, t in load_file(a / "adapter_model.safetensors").items():
            if ".lora_A." in key:
                name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                ranks[name] = ranks.get(name, 0) + t.shape[0]
    return ranks


def test_average_through_the_cli_is_bitwise_the_full_merge(llama, tmp_path):
    base, adapters, _ = llama
    run_cli("merge", base, *adapters, "-o", tmp_path / "full", "-m", "average", "-p", "weights=1,2,1", check=True)
    proc = run_cli("merge", base, *adapters, "-o", tmp_path / "adapter", "-m", "average", "-p", "weights=1,2,1",
                   "--output-format", "peft", check=True)
    assert "PEFT adapter" in proc.stdout
    got, want = _peft_merged(base, tmp_path / "adapter"), _state(tmp_path / "full")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())


def test_concatenation_has_the_sum_of_ranks_and_nothing_for_untouched_tensors(llama, tmp_path):
    base, adapters, _ = llama
    got, want, report = _both(base, adapters, tmp_path, "task_arithmetic", scale=0.5, weights="1,0.25,2")
    for name in want:
        assert torch.equal(got[name], want[name]), name
    ranks = _adapter_targets(adapters)
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.").split(".lora_")[0] for k in written} == set(ranks)
    for name, r in ranks.items():
        assert written[f"base_model.model.{name}.lora_A.weight"].shape[0] == r
        assert report["adapter"]["modules"][name] == {"rank": r, "form": "concat"}
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(ranks)
    assert not (tmp_path / "adapter" / "lowmerge-manifest.json").exists()
    card = (tmp_path / "adapter" / "README.md").read_text()       # the Hub reads the card's front matter
    assert "library_name: peft" in card and f"base_model: {json.dumps(str(base))}" in card, card


@pytest.mark.parametrize("rank", [None, 2])
def test_truncated_rules_are_within_the_reported_error(llama, tmp_path, rank):
    base, adapters, _ = llama
    got, want, report = _both(base, adapters, tmp_path, "ties", adapter_rank=rank)
    base_sd = _state(base)
    modules = report["adapter"]["modules"]
    truncated = 0
    for name, info in modules.items():
        key = name + ".weight"
        w0 = base_sd[key].double()
        full = want[key].double() - w0            # Δ* of the full merge, fp64
        s = torch.linalg.svdvals(full)
        k = info["rank"]
        assert info["form"] == "svd" and k == (rank or _adapter_targets(adapters)[name])
        optimum = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
        # both sides rounded W0 + Δ in fp32: ≤ eps32·|W| per element each, against ‖Δ*‖
        slack = 4 * EPS32 * float(want[key].double().norm()) / float(full.norm())
        assert abs(info["rel_error"] - optimum) <= slack + 1e-6, (name, info, optimum)
        err = float((got[key].double() - w0 - full).norm() / full.norm())
        assert err <= info["rel_error"] + slack, (name, err, info)
        truncated += optimum > 1e-3
    assert truncated > 0, "the test must exercise a real truncation"
    assert report["adapter"]["max_rel_error"] == max(i["rel_error"] for i in modules.values())


@pytest.mark.parametrize("method", ["wudi_cfs", "actmat"])
def test_covariance_rules_are_exact_in_their_core_space(llama, tmp_path, method):
    base, adapters, _ = llama
    got, want, report = _both(base, adapters, tmp_path, method)
    base_sd = _state(base)
    ranks = _adapter_targets(adapters)
    for name, info in report["adapter"]["modules"].items():
        key = name + ".weight"
        full = want[key].double() - base_sd[key].double()
        assert info["form"] == "core" and info["rank"] == min(ranks[name], full.shape[1])
        # the projection onto an fp32 orthonormal basis of ≤ 16 columns: a few eps32 of ‖Δ*‖
        assert info["rel_error"] <= 1e-5, (name, info)
        slack = 4 * EPS32 * float(want[key].double().norm()) / float(full.norm())
        err = float((got[key].double() - base_sd[key].double() - full).norm() / full.norm())
        assert err <= info["rel_error"] + slack, (name, err, info)


@pytest.mark.parametrize("method", ["task_arithmetic", "wudi_cfs"])
def test_adapter_rank_cuts_the_exact_forms_above_it(llama, tmp_path, method):
    base, adapters, _ = llama
    got, want, report = _both(base, adapters, tmp_path, method, adapter_rank=4)
    base_sd = _state(base)
    ranks = _adapter_targets(adapters)
    for name, info in report["adapter"]["modules"].items():
        assert info["rank"] == min(ranks[name], 4)
        assert info["form"] == ("svd" if ranks[name] > 4 else "concat" if method == "task_arithmetic" else "core")
        key = name + ".weight"
        full = want[key].double() - base_sd[key].double()
        slack = 4 * EPS32 * float(want[key].double().norm()) / float(full.norm())
        err = float((got[key].double() - base_sd[key].double() - full).norm() / full.norm())
        assert err <= info["rel_error"] + slack, (name, err, info)
    assert report["adapter"]["max_rel_error"] > 1e-3      # q_proj and v_proj (rank 8) were cut to 4


def test_gpt2_fan_in_fan_out_adapters(gpt2, tmp_path):
    base, adapters, _ = gpt2
    got, want, _ = _both(base, adapters, tmp_path / "avg", "average")
    for name in want:
        assert torch.equal(got[name], want[name]), name
    got, want, report = _both(base, adapters, tmp_path / "ties", "ties", adapter_rank=3)
    base_sd = _state(base)
    for name, info in report["adapter"]["modules"].items():
        key = name + ".weight"
        full = want[key].double() - base_sd[key].double()
        slack = 4 * EPS32 * float(want[key].double().norm()) / float(full.norm())
        err = float((got[key].double() - base_sd[key].double() - full).norm() / full.norm())
        assert err <= info["rel_error"] + slack, (name, err, info)


def test_a_model_with_the_adapter_generates_as_the_merged_model(llama, tmp_path):
    base, adapters, _ = llama
    merge(base, adapters, tmp_path / "full", "average")
    merge(base, adapters, tmp_path / "adapter", "average", output_format="peft")
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full").eval()
    prompt = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        got = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        want = merged.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        logits = model(input_ids=prompt).logits
        ref = merged(input_ids=prompt).logits
    assert got.shape == (1, 10) and torch.equal(got, want)
    assert torch.allclose(logits, ref, rtol=0, atol=1e-5)   # unmerged LoRA sums x·W0ᵀ + (x·A'ᵀ)·B'ᵀ: fp32 order


def test_a_full_weight_expert_is_one_line_and_nothing_is_written(llama, tmp_path):
    base, adapters, full = llama
    out = tmp_path / "out"
    line = _one_line_error(run_cli("merge", base, adapters[0], full[1], "-o", out, "--output-format", "peft"))
    assert str(full[1]) in line and "full-weight" in line, line
    assert not out.exists()


def test_modules_to_save_and_a_stray_adapter_rank_are_refused(llama, tmp_path):
    base, adapters, _ = llama
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    sd = load_file(adapters[0] / "adapter_model.safetensors")
    save_file({**sd, "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(64, 32)},
              saved / "adapter_model.safetensors")
    out = tmp_path / "out"
    line = _one_line_error(run_cli("merge", base, saved, "-o", out, "--output-format", "peft"))
    assert "modules_to_save" in line and "lm_head.weight" in line, line
    assert not out.exists()
    for option in ({"quantize": "int8"}, {"resume": True}, {"tokenizer_source": "union"}):
        with pytest.raises(ConfigError, match="--output-format peft does not take"):
            merge(base, adapters, out, "ties", output_format="peft", **option)
    assert not out.exists()
    proc = run_cli("merge", base, *adapters, "-o", out, "--adapter-rank", "4")
    assert proc.returncode != 0 and "--adapter-rank is for --output-format peft" in proc.stderr
    assert not out.exists()


def _plain_model(where: Path, layers: int, n_adapters: int, dim: int = 512, rank: int = 8) -> tuple[Path, list]:
    """A base of ``layers`` (dim, dim) fp32 weights in one file, and adapters of rank ``rank`` on every one."""
    where.mkdir()
    g = torch.Generator().manual_seed(layers)
    save_file({f"layers.{i}.proj.weight": torch.randn(dim, dim, generator=g) for i in range(layers)},
              where / "base.safetensors")
    adapters = []
    for t in range(n_adapters):
        a = where / f"adapter{t}"
        a.mkdir()
        (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": rank,
                                                           "target_modules": ["proj"]}))
        save_file({f"base_model.model.layers.{i}.proj.lora_{w}.weight": torch.randn(*shape, generator=g) / 32
                   for i in range(layers) for w, shape in (("A", (rank, dim)), ("B", (dim, rank)))},
                  a / "adapter_model.safetensors")
        adapters.append(a)
    return where / "base.safetensors", adapters


def test_peak_memory_is_flat_in_depth(tmp_path):
    """32 vs 128 layers of 1 MiB (both above the 16 MiB read-ahead): a run holding the model would grow by 96 MiB."""
    peaks = []
    for layers in (32, 128):
        base, adapters = _plain_model(tmp_path / f"m{layers}", layers, 2)
        out = tmp_path / f"out{layers}"
        run_cli("merge", base, *adapters, "-o", out, "-m", "ties", "--output-format", "peft", "--device", "cpu",
                check=True, fresh=True)
        report = json.loads((out / "lowmerge_report.json").read_text())
        assert len(report["adapter"]["modules"]) == layers
        peaks.append(report["memory"]["peak_rss_bytes"])
    assert peaks[1] / peaks[0] <= 1.15, peaks
