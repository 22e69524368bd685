"""``lowmerge export`` of a decoder LM: a folder that onnxruntime-genai opens as it is, written in flat memory.

The folder: ``model.onnx`` (the graph, a few hundred KB), ``model.onnx.data`` (every weight, streamed in and
quantized as it streams), ``genai_config.json`` (input/output names, shapes, search defaults), and the tokenizer
files and chat template copied from the model. Everything is written in a hidden temporary folder beside the
output and renamed into place at the end, so a failed or interrupted export leaves nothing that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowmem_merge.errors import InputError, OutputError

from . import models
from .folders import make_parent
from .decoder import DecoderSpec, spec_of
from .genai_graph import DecoderWriter
from .tensors import ExternalData
from .weights import ByParameter, Weights

GRAPH, DATA, CONFIG = "model.onnx", "model.onnx.data", "genai_config.json"
REPORT = "export_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json")


@dataclass
class GenaiResult:
    folder: Path
    spec: DecoderSpec
    precision: str
    seconds: float
    bytes: int


def check_output(out: Path, force: bool) -> None:
    """A new folder, or with ``force`` a previous export (recognized by its genai_config.json), nothing else."""
    if out.suffix == ".onnx":
        raise OutputError("a decoder exports to a folder, not a .onnx file", path=out,
                          hint="pass a directory (e.g. -o ./deploy), or --format plain for one graph without "
                               "KV cache")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError("the output exists and is not a folder", path=out, hint="choose another -o")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutputError("output folder exists", path=out,
                              hint="pass --force to replace a previous export, or choose another -o")
        if not (out / CONFIG).is_file():
            raise OutputError("--force replaces only a previous export, and this folder holds no genai_config.json",
                              path=out, hint="choose another -o; lowmerge never deletes a folder it did not write")
    make_parent(out)


def export_genai(model_dir: Path, out: Path, precision: str, *, force: bool = False, opset: int = 21,
                 check: Callable[[Path, GenaiResult], None] | None = None) -> GenaiResult:
    """Write the folder; peak memory is the runtime plus a layer's q, k, v (or the largest tensor) in fp32.

    ``check(folder, result)`` runs on the finished folder under its temporary name: when it raises, the folder is removed
    and nothing appears at ``out``.
    """
    t0 = time.perf_counter()
    check_output(out, force)
    config = models.load_config(model_dir)
    kind = models.kind_of(config, model_dir)
    if kind.task != "causal-lm":
        raise InputError("not a decoder LM: generation export needs *ForCausalLM", path=model_dir / "config.json",
                         hint="encoders and classifiers export with --format plain")
    spec = spec_of(config, model_dir)
    tokenizer = _tokenizer_files(model_dir)
    weights = Weights(model_dir)
    meta = models.meta_model(config, kind, torch.float32)
    params = ByParameter(meta, weights, models.buffers_and_ties(meta)[1])
    with staged(out) as tmp:
        data = ExternalData(tmp / DATA)
        try:
            writer = DecoderWriter(spec, precision, params.read, params.has, data, rope_tables(meta, spec))
            proto = writer.build(opset)
        finally:
            data.close()
            weights.close()
        _save_graph(proto, tmp / GRAPH)
        for name in tokenizer:
            shutil.copyfile(model_dir / name, tmp / name)
        _write_json(tmp / CONFIG, genai_config(config, spec, model_dir))
        result = GenaiResult(out, spec, precision, time.perf_counter() - t0,
                             sum(f.stat().st_size for f in tmp.iterdir()))
        if check is not None:
            check(tmp, result)
    return result


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden temporary folder beside ``out``, renamed to ``out`` when the block ends well, removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tmp.chmod(0o755)                      # mkdtemp's 0700 would hide the finished folder from other users
        yield tmp
        _put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rope_tables(meta: torch.nn.Module, spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (context, head_dim / 2), fp32, computed by the model's own rotary module (every RoPE variant
    transformers implements, scaling included, as transformers computes it)."""
    rotary = next(m for name, m in meta.named_modules() if name.endswith("rotary_emb"))
    positions = torch.arange(spec.context).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _tokenizer_files(model_dir: Path) -> list[str]:
    found = [n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
    if "tokenizer.json" not in found:
        raise InputError("no tokenizer.json: onnxruntime-genai needs the fast tokenizer's file beside the model",
                         path=model_dir, hint="save the tokenizer into the model folder: "
                                              "AutoTokenizer.from_pretrained(BASE).save_pretrained(MERGED)")
    return found


def genai_config(config, spec: DecoderSpec, model_dir: Path) -> dict:
    gen = _read_json(model_dir / "generation_config.json")
    eos = gen.get("eos_token_id", config.eos_token_id)
    pad = getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    search = {"diversity_penalty": 0.0, "do_sample": bool(gen.get("do_sample", False)), "early_stopping": True,
              "length_penalty": 1.0, "max_length": spec.context, "min_length": 0, "no_repeat_ngram_size": 0,
              "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": True,
              "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
              "temperature": float(gen.get("temperature", 1.0)), "top_k": int(gen.get("top_k", 50)),
              "top_p": float(gen.get("top_p", 1.0))}
    decoder = {"session_options": {"log_id": "onnxruntime-genai", "provider_options": []}, "filename": GRAPH,
               "head_size": spec.head_dim, "hidden_size": spec.hidden,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"},
               "num_attention_heads": spec.heads, "num_hidden_layers": spec.layers,
               "num_key_value_heads": spec.kv_heads}
    model = {"bos_token_id": config.bos_token_id, "context_length": spec.context, "decoder": decoder,
             "eos_token_id": eos, "pad_token_id": pad, "type": spec.genai_type, "vocab_size": spec.vocab}
    return {"model": model, "search": search}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4) + "\n")


def _save_graph(proto, path: Path) -> None:
    """The graph alone (its initializers already point into the data file)."""
    try:
        path.write_bytes(proto.SerializeToString())
    except OSError as e:
        raise OutputError(f"cannot write: {e.strerror}", path=path, hint="check free disk space") from None


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; a replaced previous export is removed only after that."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
