"""PEFT LoRA adapters as experts: merging them equals merging PEFT's own merge_and_unload() checkpoints.

Every weight and LoRA factor here is dyadic with few significant bits (multiples of 2^-10, 2^-3, 2^-6, and scales
4 and 1.5), so s·B·A and W0 + s·B·A are exact in fp32: the materialized experts' Δ = W − W0 is bitwise the
adapter's Δ, and any rule gives bitwise the same output from both. With ordinary random values the fp32 rounding
of W0 + Δ in the materialized experts (≈1e-7·|W0| per element) is amplified up to ~1e-2 relative by the
covariance rules' solves on rank-deficient LoRA Grams, which would hide a wrong scale of that size.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_merge import merge
from lowmem_merge.io.checkpoint import open_checkpoint
import reference as ref
from lowmem_merge.info import TensorClass
from lowmem_merge.methods import REGISTRY
from lowmem_merge.plan import make_plan

from conftest import run_cli
from test_merge import FIXED_EXPERTS, load_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA_QV = ["q_proj", "v_proj"]
FEWER_STEPS = {"wudi": {"steps": 20}}    # an iterative rule: its step count changes the time, not the Δs it gets


def _merge(base: Path, experts: list[Path], out: Path, method: str) -> None:
    """``method`` over ``experts`` (a rule of a fixed number of experts takes the first ones; a calibrated rule
    gets a tokenizer and one text file per expert)."""
    experts = experts[:FIXED_EXPERTS[method]] if method in FIXED_EXPERTS else experts
    extra = dict(FEWER_STEPS.get(method, {}))
    if REGISTRY[method].calibration:
        extra.update(calib=calibration_files(base, out.parent / "calib", len(experts)), calib_samples=8,
                     calib_seq_len=8)
    merge(base, experts, out, method, **extra)


def calibration_files(base: Path, where: Path, n: int) -> list[Path]:
    """The base gets test_calibrated's word-level tokenizer (if it has none); one text file per task."""
    from test_calibrated import WORDS, _tokenizer
    if not (base / "tokenizer.json").exists():
        _tokenizer().save_pretrained(base)
    where.mkdir(parents=True, exist_ok=True)
    files = []
    for t in range(n):
        files.append(where / f"task{t}.txt")
        files[-1].write_text("\n".join(" ".join(WORDS[(t * 7 + i * j) % len(WORDS)] for j in range(3 + i % 6))
                                       for i in range(8)) + "\n")
    return files


def _dyadic(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 1024) / 1024)
    return model


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=64,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return _dyadic(transformers.LlamaForCausalLM(cfg).eval())


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    return _dyadic(transformers.GPT2LMHeadModel(cfg).eval())


def _adapters(tmp_path: Path, make, configs: list[dict]) -> tuple[Path, list[Path], list[Path]]:
    """The base, one adapter per LoraConfig (random dyadic factors), and PEFT's merge_and_unload of each (fp32)."""
    base = tmp_path / "base"
    make().save_pretrained(base)
    adapters, full = [], []
    for t, kw in enumerate(configs):
        model = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, **kw))
        with torch.no_grad():
            for name, p in model.named_parameters():
                g = torch.Generator().manual_seed(t * 1000 + len(name))
                if "lora_A" in name:
                    p.copy_(torch.randint(-2, 3, p.shape, generator=g) / 8)
                elif "lora_B" in name:
                    p.copy_(torch.randint(-3, 4, p.shape, generator=g) / 64)
                elif "modules_to_save" in name:     # a trained replacement of the base's tensor
                    p.add_(torch.randint(-8, 9, p.shape, generator=g) / 1024)
        adapters.append(tmp_path / f"adapter{t}")
        model.save_pretrained(adapters[-1])
        full.append(tmp_path / f"merged{t}")
        model.merge_and_unload().save_pretrained(full[-1])
    return base, adapters, full


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    return _adapters(tmp_path_factory.mktemp("llama"), _llama, [
        {"target_modules": LLAMA_QV},                                                       # s = 8/4
        {"target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"], "use_rslora": True,
         "alpha_pattern": {"o_proj": 3}},                                                   # s = 8/√4, o: 3/√4
        {"target_modules": ["v_proj", "gate_proj", "up_proj"], "rank_pattern": {"up_proj": 2},
         "modules_to_save": ["lm_head"]},                                                   # s = 8/4, up: 8/2
    ])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    return _adapters(tmp_path_factory.mktemp("gpt2"), _gpt2, [
        {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
        {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "use_rslora": True},
    ])


def assert_same_as_materialized(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    # Bitwise: the inputs are dyadic, so both runs hand the rule bitwise-equal Δs (module docstring).
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), (name, (got[name] - want[name]).abs().max())


FACTOR_RULES = {  # rules that take LoRA experts as factors (core space, ALGORITHMS.md §2): their fp64 reference
    "actmat": lambda taus: ref.actmat_matrix(taus, 1e-3),
    "wudi_cfs": lambda taus: ref.wudi_cfs_matrix(taus, 1e-5),
}


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_llama_adapters_equal_materialized_experts(llama, tmp_path, method):
    base, adapters, full = llama
    _merge(base, adapters, tmp_path / "lora", method)
    if method not in FACTOR_RULES:
        _merge(base, full, tmp_path / "full", method)
        assert_same_as_materialized(load_model(tmp_path / "lora"), load_model(tmp_path / "full"))
        return
    # The core-space solve sums in another order than the dense one, so the outputs are not bitwise equal: both are
    # checked against the fp64 rule on the materialized experts' Δs (the dense fp32 path is the less accurate one
    # on these rank-deficient Grams, see test_methods.py::test_core_space_lora_solve_matches_fp64).
    assert_matches_fp64_rule(tmp_path / "lora", base, full, method)


def assert_matches_fp64_rule(out: Path, base: Path, full: list[Path], method: str) -> None:
    """``out`` = W0 + the fp64 rule on the materialized experts' Δs, within fp32 rounding (Δ* and W0 + Δ*)."""
    infos = _infos(base, full)
    assert any(REGISTRY[method].takes_factors(i) for i in infos)
    got, w0 = load_model(out), _load(base)
    ws = [_load(f) for f in full]
    for info in infos:
        taus = [w[info.name].double() - w0[info.name].double() for w in ws]
        want = FACTOR_RULES[method](taus) if info.cls == TensorClass.LIN else ref.average(taus)
        err = float((got[info.name].double() - w0[info.name].double() - want).norm())
        assert err <= 1e-5 * float(want.norm()) + 1e-7 * float(w0[info.name].norm()), (info.name, err)


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path) if path.is_file() else load_model(path)


def _infos(base: Path, experts: list[Path]) -> list:
    with open_checkpoint(base) as b, contextlib.ExitStack() as stack:
        plan = make_plan(b, [stack.enter_context(open_checkpoint(e)) for e in experts])
        return [i for i in plan.tensors if i.cls in (TensorClass.LIN, TensorClass.EMB, TensorClass.VEC)]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_gpt2_fan_in_fan_out_adapter_mixed_with_a_full_expert(gpt2, tmp_path, method):
    base, adapters, full = gpt2
    with open_checkpoint(base) as b:
        assert b.entries["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)   # Conv1D: stored (in, out)
    _merge(base, [adapters[0], adapters[1], full[0]], tmp_path / "lora", method)   # c_proj is square: (B·A)ᵀ
    _merge(base, [full[0], full[1], full[0]], tmp_path / "full", method)          # would pass the shape checks
    assert_same_as_materialized(load_model(tmp_path / "lora"), load_model(tmp_path / "full"))


def test_fan_in_fan_out_without_config_json_merges_the_stored_orientation(gpt2, tmp_path):
    base, adapters, full = gpt2       # a bare .safetensors base: the plan does not know Conv1D, Δ stays (in, out)
    merge(base / "model.safetensors", adapters, tmp_path / "lora", "actmat")         # factors (Aᵀ, Bᵀ)
    assert_matches_fp64_rule(tmp_path / "lora", base / "model.safetensors",
                             [f / "model.safetensors" for f in full], "actmat")
    merge(base / "model.safetensors", adapters, tmp_path / "lora_ta", "task_arithmetic")  # the dense (B·A)ᵀ
    merge(base / "model.safetensors", [f / "model.safetensors" for f in full], tmp_path / "full_ta",
          "task_arithmetic")
    assert_same_as_materialized(load_model(tmp_path / "lora_ta"), load_model(tmp_path / "full_ta"))


def test_row_chunks_of_an_adapter_give_the_same_result(llama, tmp_path, monkeypatch):
    from lowmem_merge import stream
    base, adapters, _ = llama
    merge(base, adapters, tmp_path / "whole", "task_arithmetic")
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 100)     # every 2-D tensor in many row ranges: s·B[r0:r1]·A
    merge(base, adapters, tmp_path / "chunked", "task_arithmetic")
    got, want = load_model(tmp_path / "chunked"), load_model(tmp_path / "whole")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-8, msg=name)  # another GEMM blocking


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_untouched_tensors_get_exactly_the_zero_delta_result(llama, tmp_path, method):
    base, adapters, full = llama
    _merge(base, [adapters[0], adapters[0]], tmp_path / "lora", method)    # q, v only
    _merge(base, [full[0], full[0]], tmp_path / "full", method)            # Δ = 0 exactly off q, v
    got, want = load_model(tmp_path / "lora"), load_model(tmp_path / "full")
    untouched = [n for n in want if not any(f".{m}." in n for m in LLAMA_QV)]
    assert len(untouched) > 10
    for name in untouched:
        assert torch.equal(got[name], want[name]), name


def test_plain_expert_files_are_untouched_and_nothing_is_materialized(llama, tmp_path):
    base, adapters, _ = llama
    merge(base, [adapters[0]], tmp_path / "out", "task_arithmetic")
    report = json.loads((tmp_path / "out" / "lowmerge_report.json").read_text())
    files = [Path(f["path"]).name for f in report["inputs"]["experts"][0]["files"]]
    assert files == ["adapter_model.safetensors", "adapter_config.json"]
    assert sorted(p.name for p in adapters[0].iterdir()) == ["README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"]


def _edited_adapter(adapter: Path, out: Path, edit) -> Path:
    """A copy of ``adapter`` whose tensors went through ``edit(state_dict) -> state_dict``."""
    out.mkdir()
    (out / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    save_file(edit(load_file(adapter / "adapter_model.safetensors")), out / "adapter_model.safetensors")
    return out


def _one_line_error(proc) -> str:
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.splitlines()[0]


def test_adapter_naming_a_module_the_base_lacks_is_a_one_line_error(llama, tmp_path):
    base, adapters, _ = llama
    bad = _edited_adapter(adapters[0], tmp_path / "bad",
                          lambda sd: {k.replace("layers.1.", "layers.7."): v for k, v in sd.items()})
    out = tmp_path / "out"
    line = _one_line_error(run_cli("merge", base, bad, "-o", out))
    assert "adapter_model.safetensors" in line and "layers.7.self_attn.q_proj.lora_A" in line, line
    assert "base has no weight" in line and not out.exists()


def test_adapter_shape_mismatch_is_a_one_line_error(llama, tmp_path):
    base, adapters, _ = llama
    key = next(k for k in load_file(adapters[0] / "adapter_model.safetensors")
               if "layers.0.self_attn.q_proj.lora_B" in k)
    bad = _edited_adapter(adapters[0], tmp_path / "bad", lambda sd: {**sd, key: torch.randn(40, 4)})
    out = tmp_path / "out"
    line = _one_line_error(run_cli("merge", base, adapters[1], bad, "-o", out))
    assert "adapter_model.safetensors" in line and key in line and "[40, 32]" in line, line
    assert not out.exists()


def test_unknown_adapter_tensor_and_adapter_as_base_are_errors(llama, tmp_path):
    base, adapters, _ = llama
    bad = _edited_adapter(adapters[0], tmp_path / "bad",
                          lambda sd: {**sd, "base_model.model.model.extra_gate.weight": torch.zeros(3)})
    line = _one_line_error(run_cli("merge", base, bad, "-o", tmp_path / "out"))
    assert "adapter_model.safetensors" in line and "model.extra_gate.weight" in line and "not in the base" in line
    line = _one_line_error(run_cli("merge", adapters[0], base, "-o", tmp_path / "out2"))
    assert "cannot be the base" in line, line


def _adapter_with_config(adapter: Path, out: Path, change: dict) -> Path:
    """A copy of ``adapter`` with ``change`` applied to adapter_config.json (written as Python's json writes NaN)."""
    out.mkdir()
    cfg = {**json.loads((adapter / "adapter_config.json").read_text()), **change}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    (out / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return out


BAD_CONFIGS = {   # case -> (change to adapter_config.json, what the error line must say)
    "rank-pattern-list": ({"rank_pattern": ["up_proj", 2]}, "rank_pattern is a JSON list, not an object"),
    "rank-pattern-value": ({"rank_pattern": {"up_proj": "two"}}, "rank_pattern['up_proj'] is 'two'"),
    "alpha-pattern-regex": ({"alpha_pattern": {"(o_proj": 3}}, "alpha_pattern key '(o_proj' is not a valid regular"),
    "alpha-nan": ({"lora_alpha": float("nan")}, "lora_alpha nan gives the scale nan"),
    "alpha-huge": ({"lora_alpha": 1e300}, "lora_alpha 1e+300 gives the scale 2.5e+299"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_adapter_config_values_are_one_line_errors_naming_them(llama, tmp_path, case):
    base, adapters, _ = llama
    change, needle = BAD_CONFIGS[case]
    bad = _adapter_with_config(adapters[0], tmp_path / "bad", change)
    out = tmp_path / "out"
    line = _one_line_error(run_cli("merge", base, bad, adapters[1], "-o", out, "-m", "task_arithmetic"))
    assert "adapter_config.json" in line and needle in line and "corrupt" not in line, line
    assert not out.exists()
