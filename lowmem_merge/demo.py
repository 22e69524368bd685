"""A built-in example: a Llama-shaped base and experts made here (no download), merged end to end.

The experts are the base plus low-rank task updates in distinct random subspaces (what fine-tuning leaves
behind), a little dense noise, and small changes to norms and embeddings. Tensors are generated one at a
time from per-name seeds, so even large examples are written in bounded memory.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import LowmergeError
from .io.writer import write_model


@dataclass(frozen=True)
class LlamaShape:
    hidden: int = 256
    intermediate: int = 688
    layers: int = 4
    vocab: int = 2048
    heads: int = 4
    kv_heads: int = 2
    tie_embeddings: bool = False

    def specs(self, dtype: torch.dtype) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        out = [("model.embed_tokens.weight", dtype, (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", dtype, (h, h)),
                    (p + "self_attn.k_proj.weight", dtype, (self.kv_heads * hd, h)),
                    (p + "self_attn.v_proj.weight", dtype, (self.kv_heads * hd, h)),
                    (p + "self_attn.o_proj.weight", dtype, (h, h)),
                    (p + "mlp.gate_proj.weight", dtype, (i, h)),
                    (p + "mlp.up_proj.weight", dtype, (i, h)),
                    (p + "mlp.down_proj.weight", dtype, (h, i)),
                    (p + "input_layernorm.weight", dtype, (h,)),
                    (p + "post_attention_layernorm.weight", dtype, (h,))]
        out.append(("model.norm.weight", dtype, (h,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", dtype, (self.vocab, h)))
        return out

    def config(self, dtype: torch.dtype) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": self.tie_embeddings,
                "bos_token_id": 1, "eos_token_id": 2, "dtype": str(dtype).removeprefix("torch.")}


def _gen(*key: object) -> torch.Generator:
    seed = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(seed)


def base_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _gen("base", seed, name)
    if len(shape) == 1:
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * (0.02 if "embed" in name or "lm_head" in name else shape[1] ** -0.5)


def task_delta(name: str, shape: tuple[int, ...], seed: int, expert: int, rank: int = 4) -> torch.Tensor:
    """Expert ``expert``'s update: low rank in its own subspace plus 5 % dense noise, ~1 % of the weights' scale."""
    g = _gen("delta", seed, expert, name)
    if len(shape) == 1:
        return 0.01 * torch.randn(shape, generator=g)
    m, n = shape
    scale = 0.01 * (0.02 if "embed" in name or "lm_head" in name else n ** -0.5)
    low = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)) / rank ** 0.5
    return scale * (low + 0.05 * torch.randn(shape, generator=g)) * (1.0 + 0.5 * expert)


def build_example(root: Path, shape: LlamaShape = LlamaShape(), n_experts: int = 3,
                  dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  shard_size: int = 4 * 10**9) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/expert{t}`` as Hugging Face directories; returns their paths."""
    specs = shape.specs(dtype)
    shapes = {name: s for name, _, s in specs}
    dirs = [root / "base"] + [root / f"expert{t}" for t in range(n_experts)]
    for t, d in enumerate(dirs):
        def produce(name: str, t: int = t) -> torch.Tensor:
            w = base_tensor(name, shapes[name], seed)
            return w if t == 0 else w.add_(task_delta(name, shapes[name], seed, t - 1))
        write_model(d, specs, produce, shard_size)
        (d / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
        (d / "lowmerge_example.json").write_text(json.dumps({"shape": asdict(shape), "seed": seed}) + "\n")
    return dirs[0], dirs[1:]


def run_demo(directory: Path, method: str, force: bool = False, export: bool = True) -> Iterator[str]:
    """Build the example (if absent), merge it, try it in transformers; then export it to ONNX, validate it,
    quantize it to int8 and end with one table of what each step cost (skipped without the ONNX extras)."""
    from .merge import merge
    inputs, merged = directory / "inputs", directory / "merged"
    if force and directory.exists():
        shutil.rmtree(inputs, ignore_errors=True)
    if not (inputs / "base" / "model.safetensors").is_file():
        yield f"building a Llama-shaped base and 3 experts in {inputs} ..."
        base, experts = build_example(inputs)
    else:
        base, experts = inputs / "base", sorted(inputs.glob("expert*"))
    yield f"merging with {method} ..."
    report = merge(base, experts, merged, method, force=True, device="auto")
    yield from report.summary_lines()
    yield f"merged model: {merged}"
    yield f"report: {report.path}"
    yield from _try_transformers(merged)
    if export:
        yield from _export(report.data, merged, directory / "onnx" / "model.onnx")


def _export(merge_data: dict, merged: Path, onnx_path: Path) -> Iterator[str]:
    """The deployment half: ONNX export + validation + int8, summarized with the merge in one table."""
    try:
        from export.runtime import require
        require("onnx", "onnx_ir", "onnxscript", "transformers", "onnxruntime")
    except LowmergeError as e:
        yield f"(skipping the ONNX export: {e.msg}; {e.hint})"
        return
    from export.pipeline import report_path, run
    yield f"exporting to {onnx_path}, validating against PyTorch, quantizing to int8 ..."
    data = run(merged, onnx_path, check=True, schemes=("int8",), force=True)
    yield from demo_table(merge_data, data)
    yield f"onnx report: {report_path(onnx_path)}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def demo_table(merge_data: dict, export_data: dict) -> list[str]:
    """One row per step: time, peak memory, size on disk, onnxruntime latency, error against its reference."""
    e, v, q = export_data["export"], export_data["validation"], export_data["quantized"]
    fp32, int8 = q["fp32"], q["int8"]
    rows = [("step", "time", "peak memory", "size", f"latency {fp32['latency_input']}", "error vs reference"),
            (f"merge ({merge_data['method']}, {len(merge_data['inputs']['experts'])} experts)",
             f"{merge_data['timings_s']['total']:.1f} s", _mb(merge_data["memory"]["peak_rss_bytes"]),
             _mb(merge_data["output"]["bytes"]), "-", "-"),
            ("ONNX export fp32 + validation", f"{e['seconds'] + v['seconds']:.1f} s",
             _mb(max(e["peak_rss_bytes"], v["peak_rss_bytes"])),
             _mb(e["bytes"]), f"{fp32['latency_ms']:.2f} ms",
             f"vs PyTorch: max abs {v['max_abs']:.1e}, rel {v['max_rel']:.1e}, top-1 {100 * v['top1']:.0f}%"),
            ("ONNX int8 (dynamic)", f"{int8['seconds']:.1f} s", _mb(int8["peak_rss_bytes"]), _mb(int8["bytes"]),
             f"{int8['latency_ms']:.2f} ms",
             f"vs fp32 ONNX: max abs {int8['vs_fp32']['max_abs']:.1e}, rel {int8['vs_fp32']['max_rel']:.1e}, "
             f"top-1 {100 * int8['vs_fp32']['top1']:.0f}%")]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return [lines[0], "-" * len(lines[0]), *lines[1:]]


def _try_transformers(merged: Path) -> Iterator[str]:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        yield "(install transformers to load the merged model: pip install 'lowmerge[hf]')"
        return
    model = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    yield (f"transformers loaded it as {type(model).__name__}: logits {tuple(logits.shape)}, "
           f"finite={bool(torch.isfinite(logits).all())}")


def write_tokenizer(directory: Path, vocab: int, seed: int = 0) -> None:
    """A real byte-level BPE tokenizer (the `tokenizers` library) of at most ``vocab`` tokens, trained here on
    generated text, saved as transformers and onnxruntime-genai read it: tokenizer.json, tokenizer_config.json
    and a chat template. Token 0 is the end of text (the example's eos), 1 the start (its bos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = torch.Generator().manual_seed(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"] + list("aeiou")
    words = ["".join(syllables[int(i)] for i in torch.randint(len(syllables), (int(n),), generator=rng))
             for n in torch.randint(1, 4, (4 * vocab,), generator=rng)]
    corpus = [" ".join(words[int(i)] for i in torch.randint(len(words), (64,), generator=rng)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|startoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}<|startoftext|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                "{% if add_generation_prompt %}<|startoftext|>assistant: {% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "chat_template": template,
        "model_max_length": 2048}, indent=2) + "\n")
