"""ONNX export: onnxruntime against transformers on tiny real models, quantized copies, and the CLI's errors.

The models are real transformers classes built from small configs with random weights and saved with
save_pretrained; the reference outputs are computed here with PyTorch, independently of export.validate.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_ir")
transformers = pytest.importorskip("transformers")

import onnx  # noqa: E402

from export import runtime  # noqa: E402
from export.pipeline import report_path, run  # noqa: E402
from export.validate import FP32_TOLERANCE, raise_if_failed, validate  # noqa: E402
from export.weights import Weights  # noqa: E402
from lowmem_merge.errors import ExportError, InputError, ValidationError  # noqa: E402

from conftest import run_cli  # noqa: E402

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256)


def _llama() -> torch.nn.Module:
    """Untied lm_head, grouped-query attention; saved in bf16 like lowmerge's merges (export upcasts to fp32)."""
    cfg = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def _gpt2() -> torch.nn.Module:
    """Tied lm_head (stored only as transformer.wte), Conv1D weights stored (in, out); saved in shards."""
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert() -> torch.nn.Module:
    return transformers.BertModel(transformers.BertConfig(**SMALL), add_pooling_layer=False)


def _bert_classifier() -> torch.nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**SMALL, num_labels=3))


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "bert-classifier": _bert_classifier}


def save(name: str, root: Path) -> Path:
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    path = root / name
    model.save_pretrained(path, max_shard_size="100KB" if name == "gpt2" else "1GB")
    return path


def reference(model_dir: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    cfg = transformers.AutoConfig.from_pretrained(model_dir)
    arch = cfg.architectures[0]
    model = getattr(transformers, arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return (out.last_hidden_state if arch == "BertModel" else out.logits).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Every model exported once with validation (the Llama also quantized): {name: (model_dir, report)}."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name in MODELS:
        model_dir = save(name, root)
        schemes = ("int8", "int4") if name == "llama" else ()
        out[name] = model_dir, run(model_dir, root / f"{name}-onnx" / "model.onnx", schemes=schemes)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_validation_report_is_within_tolerance_and_written_beside_the_model(exported, name):
    model_dir, report = exported[name]
    v = report["validation"]
    assert v["passed"] and v["max_rel"] < FP32_TOLERANCE
    assert len(v["cases"]) == 3 and any("padded" in c["case"] for c in v["cases"])
    assert v["top1"] == (None if name == "bert" else 1.0)
    assert json.loads(report_path(Path(report["export"]["path"])).read_text())["validation"]["passed"]


@pytest.mark.parametrize("name", list(MODELS))
def test_dynamic_axes_match_pytorch_on_a_shape_never_used(exported, name):
    model_dir, report = exported[name]
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 256, size=(5, 19), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[3, 12:] = 0                      # right padding: compare only real tokens
    got = runtime.session(Path(report["export"]["path"])).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    ref = reference(model_dir, ids, mask)
    assert got.shape == ref.shape
    keep = mask.astype(bool) if ref.ndim == 3 else slice(None)
    # fp32 both sides, same operations in another order: a few ulps per layer (see export/validate.py)
    np.testing.assert_allclose(got[keep], ref[keep], rtol=0, atol=1e-5 * np.abs(ref[keep]).max())


@pytest.mark.parametrize("name", list(MODELS))
def test_weights_are_one_external_data_file_beside_the_graph(exported, name):
    _, report = exported[name]
    path = Path(report["export"]["path"])
    graph = onnx.load(path, load_external_data=False).graph
    locations = {e.value for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    big = [t.name for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and
           np.prod(t.dims) * 4 > 1024]
    assert big == []                       # no weight stored inside the graph file
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in
                {t.name for t in graph.initializer}] or name == "gpt2"   # folded, except GPT-2's tied lm_head
    assert path.with_name("model.onnx.data").stat().st_size > 50_000
    assert not list(path.parent.glob(".*partial"))


def test_quantized_models_are_smaller_and_agree_with_fp32(exported):
    _, report = exported["llama"]
    q = report["quantized"]
    fp32 = q["fp32"]["bytes"]
    # Random weights give nearly tied logits (256 draws of one Gaussian), so top-1 flips at small errors and its
    # bounds are loose; the errors are the quantization noise of 3 products in a row: int8 (7-bit weights, see
    # export/quantize.py) rounds to 1/127 of a channel's range (measured ~3 % of the logits' scale; full 8-bit
    # weights measured 29 % on AVX2 CPUs without VNNI, whose kernel saturates), int4 to 1/14 of a 32-block's
    # (measured ~16 %).
    assert q["int8"]["bytes"] < 0.5 * fp32 and q["int4"]["bytes"] < 0.4 * fp32
    assert q["int8"]["quantized_nodes"]["quantized"] == 15 and q["int4"]["quantized_nodes"]["quantized"] == 15
    assert q["int8"]["vs_fp32"]["max_rel"] < 0.05 and q["int8"]["vs_fp32"]["top1"] > 0.9
    assert q["int8"]["vs_fp32"]["max_rel"] < q["int4"]["vs_fp32"]["max_rel"] < 0.3
    assert q["int4"]["vs_fp32"]["top1"] > 0.6
    for scheme in ("int8", "int4"):
        r = q[scheme]
        assert r["latency_ms"] > 0 and r["peak_rss_bytes"] > 0 and r["provider"] == q["fp32"]["provider"]
        assert Path(r["path"]).with_name(f"model.{scheme}.onnx.data").is_file()


def test_validation_fails_with_the_numbers_when_weights_disagree(exported, tmp_path):
    model_dir, report = exported["bert-classifier"]
    onnx_path = Path(report["export"]["path"])
    changed = tmp_path / "changed"
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(1.01)           # a 1 % error: what a wrong tensor would look like, mildly
    model.save_pretrained(changed)
    failed = validate(changed, onnx_path)
    assert not failed["passed"] and failed["max_rel"] > 10 * FP32_TOLERANCE
    with pytest.raises(ValidationError, match="disagree: max relative error .* > tolerance 1e-04") as e:
        raise_if_failed(failed, onnx_path)
    assert e.value.diffs["cases"] and str(onnx_path) in str(e.value)


def test_cli_export_validates_quantizes_and_prints(tmp_path):
    model_dir = save("gpt2", tmp_path)
    out = tmp_path / "onnx" / "gpt2.onnx"
    proc = run_cli("export", model_dir, "-o", out, "--quantize", "int8", check=True)
    assert "validation vs transformers GPT2LMHeadModel" in proc.stdout and ": passed" in proc.stdout
    assert "int8: " in proc.stdout and "report: " in proc.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["gpt2.int8.onnx", "gpt2.int8.onnx.data", "gpt2.onnx",
                                                            "gpt2.onnx.data", "gpt2.report.json"]
    again = run_cli("export", model_dir, "-o", out, "--no-validate")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "--force" in again.stderr


def test_symlinks_planted_at_temporary_names_redirect_nothing(tmp_path):
    """Every file of a plain export and its quantized copy is written under a fresh temporary name, then renamed:
    links planted at the names the export once used (``.OUT.partial``, ``REPORT.tmp``) are never followed."""
    model_dir = save("gpt2", tmp_path)
    victim, out = tmp_path / "victim", tmp_path / "onnx" / "m.onnx"
    victim.mkdir()
    out.parent.mkdir()
    for name in (".m.onnx.partial", "m.report.json.tmp", ".m.int8.onnx.partial", "m.int8.onnx.data.tmp"):
        (out.parent / name).symlink_to(victim / name)
    run_cli("export", model_dir, "-o", out, "--quantize", "int8", "--no-validate", check=True)
    assert list(victim.iterdir()) == []
    files = {p.name: p for p in out.parent.iterdir() if not p.is_symlink()}
    assert sorted(files) == ["m.int8.onnx", "m.int8.onnx.data", "m.onnx", "m.onnx.data", "m.report.json"]
    modes = {name: p.stat().st_mode & 0o777 for name, p in files.items()}
    assert modes["m.int8.onnx.data"] == modes["m.int8.onnx"], modes    # readable as the graph is


def test_cli_truncated_checkpoint_gives_one_clear_line(tmp_path):
    model_dir = save("bert", tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    proc = run_cli("export", model_dir, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    first, hint = proc.stderr.strip().splitlines()
    assert first.startswith(f"error: {weights}: ") and "file is truncated" in first and hint.startswith("hint: ")
    assert not (tmp_path / "out.onnx").exists()


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    model_dir = save("bert", tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\x10" + weights.read_bytes()[1:200])
    with pytest.raises(InputError, match="not a safetensors file") as e:
        Weights(model_dir)
    assert e.value.path == str(weights) and e.value.hint


def test_a_bitsandbytes_checkpoint_is_refused_with_the_way_out(tmp_path):
    model_dir = save("llama", tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="already quantized") as e:
        run(model_dir, tmp_path / "out.onnx", check=False)
    assert "--quantize" in e.value.hint and not (tmp_path / "out.onnx").exists()


def test_missing_onnx_stack_names_the_pip_command(tmp_path):
    """Block onnx_ir's import in a real child process: `--help` still works and export says what to install."""
    code = ("import sys; sys.modules['onnx_ir'] = None; sys.argv = ['lowmerge', *sys.argv[1:]]; "
            "from lowmem_merge.cli import main; main()")
    help_ = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "export" in help_.stdout
    proc = subprocess.run([sys.executable, "-c", code, "export", str(tmp_path), "-o", str(tmp_path / "m.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "onnx_ir" in proc.stderr and "pip install 'lowmerge[onnx-cpu]'" in proc.stderr


def test_two_onnxruntime_distributions_are_refused_with_the_fix(monkeypatch):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda d: "1.32.0" if d in ("onnxruntime", "onnxruntime-gpu") else real(d))
    with pytest.raises(ExportError, match="onnxruntime and onnxruntime-gpu are both installed") as e:
        runtime.onnxruntime()
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in e.value.hint


def test_demo_merges_deploys_and_generates(tmp_path):
    proc = run_cli("demo", tmp_path / "demo", "--method", "average", check=True)   # the quickest merge
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step "))
    table = lines[header:header + 5]
    assert "peak memory" in table[0] and "decode" in table[0] and set(table[1]) == {"-"}
    assert table[2].startswith("merge (average, 3 experts)")
    assert table[3].startswith("ONNX fp32 export + validation") and "tokens 128/128" in table[3]
    assert table[4].startswith("ONNX int4 export + validation") and "perplexity" in table[4]
    assert any(line.startswith("int4 folder, onnxruntime-genai on CPU: 'Once upon a time' -> ") for line in lines)
    for precision in ("fp32", "int4"):
        report = json.loads((tmp_path / "demo" / "deploy" / precision / "export_report.json").read_text())
        assert report["validation"]["passed"] and report["precision"] == precision
    assert report["export"]["bytes"] < json.loads((tmp_path / "demo" / "deploy" / "fp32" /
                                                   "export_report.json").read_text())["export"]["bytes"] / 2


def test_cuda_machines_use_onnxruntime_gpu_and_a_cpu_build_there_is_explained(monkeypatch):
    ort = runtime.onnxruntime()
    monkeypatch.setattr(runtime, "_cuda_present", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert runtime.providers() == ["CPUExecutionProvider"]
    assert "pip install 'lowmerge[onnx-gpu]'" in runtime.build_note()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert runtime.providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"] and runtime.build_note() is None
    monkeypatch.setattr(runtime, "_cuda_present", lambda: False)
    assert runtime.providers() == ["CPUExecutionProvider"]
