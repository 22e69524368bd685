"""The generation folder: onnxruntime-genai runs it and generates what transformers generates.

Tiny real transformers models of each decoder family, built from their configs with random weights and saved with
save_pretrained beside a real BPE tokenizer (the `tokenizers` library). The references are transformers itself
(greedy generation, logits) and, for the quantized graphs, the model whose weights are the closed-form
dequantization of the stored codes.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")
transformers = pytest.importorskip("transformers")

import onnx  # noqa: E402

from export import generation_check  # noqa: E402
from export.genai_export import CONFIG, DATA, GRAPH, REPORT  # noqa: E402
from export.pipeline import failed_report_path, run, run_genai  # noqa: E402
from export.tensors import dequantize_blocks, quantize_blocks  # noqa: E402
from lowmem_merge.demo import write_tokenizer  # noqa: E402
from lowmem_merge.errors import ValidationError  # noqa: E402

from conftest import run_cli  # noqa: E402

VOCAB = 512
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {   # model_type: (config class, model class, config fields beyond COMMON)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 48}),  # < the 400-token prompt
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),                            # q, k, v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),              # per-head q/k norms
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),                               # fused qkv and gate/up
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),                     # stores lm_head as embed_out
    "falcon": ("FalconConfig", "FalconForCausalLM", {"num_kv_heads": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}
GENERATES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
REFUSED = tuple(f for f in FAMILIES if f not in GENERATES)


def save_family(root: Path, family: str, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny random model of ``family`` saved as transformers saves it (bf16, like lowmerge's merges)."""
    cfg_name, cls_name, extra = FAMILIES[family]
    config = getattr(transformers, cfg_name)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval().to(dtype)
    path = root / family
    model.save_pretrained(path)
    write_tokenizer(path, VOCAB)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    for family in FAMILIES:
        save_family(root, family)
    return root


@pytest.fixture(scope="module")
def llama_int4(models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "deploy"
    run_genai(models / "llama", out, precision="int4", check=False)
    return out


@pytest.mark.parametrize("family", GENERATES)
def test_fp32_folder_generates_what_transformers_generates(models, tmp_path, family):
    out = tmp_path / "deploy"
    report = run_genai(models / family, out, precision="fp32")
    v = report["validation"]
    assert v["passed"] and v["tokens_agree"] and v["tokenizer_agrees"]
    assert all(r["same_tokens"] == r["new_tokens"] == generation_check.NEW_TOKENS for r in v["prompts"])
    assert max(r["prompt_tokens"] for r in v["prompts"]) >= 300           # the KV cache carries a long context
    assert v["max_logit_rel"] < 1e-5                                      # fp32 against fp32: rounding only
    assert abs(v["perplexity"]["onnx"] / v["perplexity"]["transformers"] - 1) < 1e-4
    assert {GRAPH, DATA, CONFIG, REPORT, "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_genai_config_names_the_graphs_inputs_and_outputs(models, tmp_path):
    out = tmp_path / "deploy"
    run_genai(models / "qwen2", out, check=False)
    graph = onnx.load(out / GRAPH, load_external_data=False)
    config = json.loads((out / CONFIG).read_text())["model"]
    decoder, layers = config["decoder"], config["decoder"]["num_hidden_layers"]
    inputs = {i.name for i in graph.graph.input}
    outputs = {o.name for o in graph.graph.output}
    assert {decoder["inputs"]["input_ids"], decoder["inputs"]["attention_mask"]} <= inputs
    assert {decoder["inputs"]["past_key_names"] % i for i in range(layers)} <= inputs
    assert {decoder["outputs"]["present_value_names"] % i for i in range(layers)} <= outputs
    assert config["type"] == "qwen2" and config["vocab_size"] == VOCAB and decoder["num_key_value_heads"] == 2
    every = [i for i in graph.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert {e.external_data[0].value for e in every} == {DATA}            # one data file beside the graph


def _session_logits(folder: Path, ids: np.ndarray, accuracy_level: int | None = None) -> np.ndarray:
    """The graph's logits for a prompt with an empty cache, in a plain onnxruntime session."""
    import onnxruntime as ort
    model = onnx.load(folder / GRAPH, load_external_data=False)
    if accuracy_level is not None:
        for node in model.graph.node:
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = accuracy_level
    path = folder / f"variant{accuracy_level}.onnx"
    onnx.save(model, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cfg = json.loads((folder / CONFIG).read_text())["model"]["decoder"]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in range(cfg["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]),
                                                            np.float32)
    return sess.run(["logits"], feeds)[0]


def _dequantized_reference(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """transformers with every linear weight replaced by the dequantized codes export stores (head: 8 bits)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                bits = 8 if name.startswith("lm_head") else 4
                codes, scales = quantize_blocks(p.data.clone(), bits, 32)
                p.data = dequantize_blocks(codes, scales, bits, p.shape[1])
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def test_int4_graph_computes_the_dequantized_model(models, llama_int4):
    """Exact with fp32 arithmetic (accuracy_level 0); within int8 activation rounding at the shipped level 4."""
    ids = np.random.default_rng(0).integers(2, VOCAB, size=(1, 48))
    want = _dequantized_reference(models / "llama", ids)
    scale = np.abs(want).max()
    exact = _session_logits(llama_int4, ids, accuracy_level=0)
    assert np.abs(exact - want).max() / scale < 1e-5
    shipped = _session_logits(llama_int4, ids)
    assert np.abs(shipped - want).max() / scale < 3e-2       # activations rounded to int8 per block of 32
    assert (shipped.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_block_quantization_closed_form():
    w = torch.randn(5, 70) * torch.logspace(-3, 1, 70)       # K not a multiple of 32: zero-padded to 96
    for bits in (4, 8):
        codes, scales = quantize_blocks(w, bits, 32)
        assert codes.shape == (5, 3, 32 * bits // 8) and scales.shape == (5, 3)
        back = dequantize_blocks(codes, scales, bits, 70)
        blocks = torch.nn.functional.pad(w, (0, 26)).reshape(5, 3, 32)
        extreme = blocks.abs().amax(-1)
        assert torch.allclose(torch.from_numpy(scales).abs(), extreme / 2 ** (bits - 1))
        err = (back - w).abs()
        step = torch.from_numpy(scales).repeat_interleave(32, dim=1)[:, :70]
        clamped = w / step + 2 ** (bits - 1) > 2 ** bits - 1.5   # beyond the top code (the range is -h..h-1)
        assert bool((err[~clamped] <= step.abs()[~clamped] / 2 * (1 + 1e-5)).all())   # rounding: half a step
        assert bool((err[clamped] <= step.abs()[clamped] * (1 + 1e-5)).all())
    codes, _ = quantize_blocks(torch.tensor([[-8.0, 7.0] + [0.0] * 30]), 4, 32)
    assert codes[0, 0, 0] == 0 | (15 << 4)                   # even element in the low nibble: -8 -> 0, 7 -> 15


def test_quantized_and_fp16_folders_report_agreement_and_perplexity(models, tmp_path):
    for precision in ("fp16", "int8", "int4"):
        report = run_genai(models / "llama", tmp_path / precision, precision=precision)
        v = report["validation"]
        assert v["passed"] and v["precision"] == precision
        assert all(len(r["logit_abs_per_step"]) == r["new_tokens"] for r in v["prompts"])
        assert np.isfinite(v["perplexity"]["onnx"]) and v["decode_tokens_per_s"] > 0
        if precision == "fp16":
            assert v["max_logit_rel"] < 1e-2                  # fp16 rounding of 2 layers, not a wrong graph


def test_a_wrong_fp32_graph_fails_validation_and_leaves_no_folder(models, tmp_path, monkeypatch):
    import export.genai_export as ge
    real = ge.spec_of
    monkeypatch.setattr(ge, "spec_of", lambda config, d: real(config, d).__class__(
        **{**real(config, d).__dict__, "eps": 0.5}))           # a norm epsilon the model does not use
    out = tmp_path / "deploy"
    with pytest.raises(ValidationError, match="does not generate what transformers generates") as e:
        run_genai(models / "llama", out)
    assert not out.exists() and failed_report_path(out).is_file()
    assert not json.loads(failed_report_path(out).read_text())["validation"]["passed"]
    assert e.value.diffs["max_logit_rel"] > 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("family", [f if f in ("gemma2", "gpt2") else pytest.param(f, marks=pytest.mark.slow)
                                    for f in REFUSED])   # a Llama-like and a GPT-2 layout in `make test`
def test_other_decoders_are_refused_in_one_line_naming_why(models, tmp_path, family):
    proc = run_cli("export", models / family, "-o", tmp_path / "deploy")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    first, hint = proc.stderr.strip().splitlines()
    assert first.startswith("error: ") and family in first and "not in lowmerge's generation graph" in first
    assert hint.startswith("hint: ") and not (tmp_path / "deploy").exists()


@pytest.mark.parametrize("family", ["gpt_neox", "gemma2"])
def test_plain_graph_exports_the_decoders_generation_refuses(models, tmp_path, family):
    """GPT-NeoX's checkpoint names lm_head embed_out (transformers renames it); Gemma 2 builds without SDPA."""
    report = run(models / family, tmp_path / "model.onnx")
    assert report["validation"]["passed"] and report["validation"]["top1"] == 1.0


def test_mixture_of_experts_plain_export_is_refused_in_one_line(models, tmp_path):
    proc = run_cli("export", models / "mixtral", "-o", tmp_path / "model.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "mixture-of-experts" in proc.stderr


def test_multimodal_models_are_refused_in_one_line(tmp_path):
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, vocab_size=64)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=16)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    proc = run_cli("export", tmp_path / "clip", "-o", tmp_path / "out.onnx")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "combines several models" in proc.stderr


def test_bad_inputs_get_one_line_and_leave_nothing(models, tmp_path):
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, vocab_size=64)).save_pretrained(bert)
    no_tok = tmp_path / "no-tokenizer"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)).save_pretrained(no_tok)
    remote = tmp_path / "remote"
    save_family(tmp_path, "llama").rename(remote)
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    for model_dir, fmt, expected in ((bert, "genai", "not a decoder LM"), (no_tok, "auto", "no tokenizer.json"),
                                     (remote, "auto", "never runs code")):
        proc = run_cli("export", model_dir, "-o", tmp_path / "out", "--format", fmt)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()


def test_an_existing_output_is_refused_and_force_replaces_only_an_export(models, tmp_path):
    out = tmp_path / "deploy"
    run_cli("export", models / "llama", "-o", out, "--no-validate", check=True)
    again = run_cli("export", models / "llama", "-o", out, "--no-validate")
    assert again.returncode == 1 and "output folder exists" in again.stderr and "--force" in again.stderr
    first = (out / DATA).stat().st_mtime_ns
    run_cli("export", models / "llama", "-o", out, "--no-validate", "--force", "--precision", "int4", check=True)
    assert (out / DATA).stat().st_mtime_ns != first and json.loads((out / REPORT).read_text())["precision"] == "int4"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = run_cli("export", models / "llama", "-o", tmp_path / "mine", "--force")
    assert refused.returncode == 1 and "never deletes" in refused.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_disk_that_fills_mid_export_leaves_nothing(models, tmp_path):
    limit = 200_000    # the data file outgrows this half way through the weights
    proc = subprocess.run([sys.executable, "-m", "lowmem_merge", "export", str(models / "llama"), "-o",
                           str(tmp_path / "deploy"), "--no-validate"], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "cannot write" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path):
    from safetensors.torch import load_file, save_file
    model_dir = save_family(tmp_path, "llama", torch.float32)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("export", model_dir, "-o", tmp_path / "deploy")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "model.layers.1.mlp.down_proj.weight" in proc.stderr and "NaN" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["llama"]


@pytest.mark.parametrize("fmt", ["genai", "plain"])
def test_an_output_under_a_regular_file_is_one_line(models, tmp_path, fmt):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / ("deploy" if fmt == "genai" else "model.onnx")
    proc = run_cli("export", models / "llama", "-o", out, "--format", fmt, "--no-validate")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {out}: ") and "is a file, not a folder" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
@pytest.mark.parametrize("fmt", ["genai", "plain"])
def test_an_unwritable_output_is_one_line(models, tmp_path, fmt):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        out = parent / ("deploy" if fmt == "genai" else "model.onnx")
        proc = run_cli("export", models / "llama", "-o", out, "--format", fmt, "--no-validate")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "Permission denied" in proc.stderr and os.listdir(parent) == []
    finally:
        parent.chmod(0o755)
