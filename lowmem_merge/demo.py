"""A built-in example: a Llama-shaped base and experts made here (no download), merged end to end.

The experts are the base plus low-rank task updates in distinct random subspaces (what fine-tuning leaves
behind), a little dense noise, and small changes to norms and embeddings. Tensors are generated one at a
time from per-name seeds, so even large examples are written in bounded memory.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import LowmergeError
from .io.writer import output_error, write_models


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
        return torch.randn(shape, generator=g).mul_(0.02).add_(1.0)
    return torch.randn(shape, generator=g).mul_(0.02 if "embed" in name or "lm_head" in name else shape[1] ** -0.5)


def task_delta(name: str, shape: tuple[int, ...], seed: int, expert: int, rank: int = 4) -> torch.Tensor:
    """Expert ``expert``'s update: low rank in its own subspace plus 5 % dense noise, ~1 % of the weights' scale
    (made in the noise's memory: one full-size temporary, the low-rank product)."""
    g = _gen("delta", seed, expert, name)
    if len(shape) == 1:
        return torch.randn(shape, generator=g).mul_(0.01)
    m, n = shape
    scale = 0.01 * (0.02 if "embed" in name or "lm_head" in name else n ** -0.5)
    low = (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)).div_(rank ** 0.5)
    return torch.randn(shape, generator=g).mul_(0.05).add_(low).mul_(scale).mul_(1.0 + 0.5 * expert)


def build_example(root: Path, shape: LlamaShape = LlamaShape(), n_experts: int = 3,
                  dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  shard_size: int = 4 * 10**9, tokenizer: bool = False) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/expert{t}`` as Hugging Face directories; returns their paths. All of them
    are written in one pass over the tensor names: each base tensor is made once, and each expert's from it.

    ``tokenizer``: also a real BPE tokenizer of the example's vocabulary in each (:func:`write_tokenizer`)."""
    specs = shape.specs(dtype)
    shapes = {name: s for name, _, s in specs}
    dirs = [root / "base"] + [root / f"expert{t}" for t in range(n_experts)]

    def produce(name: str) -> Iterator[torch.Tensor]:
        base = base_tensor(name, shapes[name], seed)
        yield base
        for t in range(n_experts):
            yield task_delta(name, shapes[name], seed, t).add_(base)   # base + Δt: the sum is symmetric
    write_models(dirs, specs, produce, shard_size)
    for d in dirs:
        (d / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
        (d / "lowmerge_example.json").write_text(json.dumps({"shape": asdict(shape), "seed": seed}) + "\n")
        if tokenizer:
            write_tokenizer(d, shape.vocab, seed)
    return dirs[0], dirs[1:]


def write_header_only(root: Path, shape: LlamaShape, n_experts: int) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` of ``shape`` as sparse bf16 checkpoints: a real safetensors header, the data a hole
    of the full size. ``lowmerge inspect`` plans a merge of models of any size from them and reads nothing else
    (bench/flat70b.py and the 70B plan tests)."""
    dirs = [root / "base"] + [root / f"expert{t}" for t in range(n_experts)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        header, offset = {}, 0
        for name, _, s in shape.specs(torch.bfloat16):
            size = 2 * torch.Size(s).numel()
            header[name] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(d / "model.safetensors", "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(8 + len(text) + offset)
        (d / "config.json").write_text(json.dumps(shape.config(torch.bfloat16), indent=2) + "\n")
    return dirs[0], dirs[1:]


def _writable(directory: Path) -> None:
    """Make DIRECTORY, or refuse in one line (a file in the way, no permission) before building anything."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise output_error(e, directory) from None


def run_demo(directory: Path, method: str, force: bool = False, export: bool = True) -> Iterator[str]:
    """Build the example (if absent), merge it, try it in transformers; then export it for onnxruntime-genai
    (fp32 and int4 folders, each validated by generation against transformers), generate a short text from the
    int4 folder and end with one table of what each step cost (the export is skipped without the ONNX extras)."""
    from .merge import merge
    _writable(directory)
    inputs, merged = directory / "inputs", directory / "merged"
    if force and directory.exists():
        shutil.rmtree(inputs, ignore_errors=True)
    if not (inputs / "base" / "tokenizer.json").is_file():
        shutil.rmtree(inputs, ignore_errors=True)
        yield f"building a Llama-shaped base and 3 experts with a BPE tokenizer in {inputs} ..."
        base, experts = build_example(inputs, tokenizer=True)
    else:
        base, experts = inputs / "base", sorted(inputs.glob("expert*"))
    yield f"merging with {method} ..."
    report = merge(base, experts, merged, method, force=True, device="auto")
    yield from report.summary_lines()
    yield f"merged model: {merged}"
    yield f"report: {report.path}"
    yield from _try_transformers(merged)
    if export:
        yield from _deploy(report.data, merged, directory / "deploy")


def _deploy(merge_data: dict, merged: Path, root: Path) -> Iterator[str]:
    """The deployment half: generation folders for onnxruntime-genai, validated, then text from the int4 one."""
    try:
        from export.pipeline import require_genai
        require_genai()
    except LowmergeError as e:
        yield f"(skipping the ONNX export: {e.msg}; {e.hint})"
        return
    from export.pipeline import run_genai
    reports = {}
    for precision in ("fp32", "int4"):
        yield f"exporting {root / precision} ({precision}) for onnxruntime-genai, validating against transformers ..."
        reports[precision] = run_genai(merged, root / precision, precision=precision, force=True)
    yield from demo_table(merge_data, reports)
    yield from _generate_text(merged, root / "int4")


def _generate_text(merged: Path, folder: Path) -> Iterator[str]:
    """A short greedy generation from the int4 folder with onnxruntime-genai, beside transformers' own."""
    import onnxruntime_genai as og
    from export.generation_check import generate_greedy, reference_logits
    from transformers import AutoModelForCausalLM
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = "Once upon a time"
    ids = [int(i) for i in tokenizer.encode(prompt)]
    tokens, _, seconds, steps = generate_greedy(og, model, ids, 32)
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    choices = reference_logits(reference, ids, tokens).argmax(-1).tolist()
    same = next((i for i, (a, b) in enumerate(zip(tokens, choices)) if a != b), len(tokens))
    yield (f"int4 folder, onnxruntime-genai on {'GPU' if og.is_cuda_available() else 'CPU'}: {prompt!r} -> "
           f"{tokenizer.decode(tokens)!r}")
    yield (f"  {len(tokens)} tokens, decode {steps / seconds:.0f} tokens/s; the first {same} of them are "
           "transformers' (fp32) greedy tokens (random weights: the text is noise, the agreement is the point)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def demo_table(merge_data: dict, reports: dict[str, dict]) -> list[str]:
    """One row per step: time, peak memory, size on disk, decode speed, agreement with transformers."""
    rows = [("step", "time", "peak memory", "size", "decode", "vs transformers (fp32, greedy, 4 prompts)"),
            (f"merge ({merge_data['method']}, {len(merge_data['inputs']['experts'])} experts)",
             f"{merge_data['timings_s']['total']:.1f} s", _mb(merge_data["memory"]["peak_rss_bytes"]),
             _mb(merge_data["output"]["bytes"]), "-", "-")]
    for precision, r in reports.items():
        e, v = r["export"], r["validation"]
        same = sum(p["same_tokens"] for p in v["prompts"])
        total = sum(p["new_tokens"] for p in v["prompts"])
        ppl = v["perplexity"]
        top1 = sum(p["teacher_forced_top1"] * p["new_tokens"] for p in v["prompts"]) / total
        rows.append((f"ONNX {precision} export + validation", f"{e['seconds'] + v['seconds']:.1f} s",
                     f"{_mb(e['peak_rss_bytes'])} / {_mb(v['peak_rss_bytes'])}", _mb(e["bytes"]),
                     f"{v['decode_tokens_per_s']:.0f} tok/s",
                     f"tokens {same}/{total}, top-1 {100 * top1:.0f}%, max logit err {v['max_logit_abs']:.1e}, "
                     f"perplexity {ppl['onnx']:.1f} vs {ppl['transformers']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return [lines[0], "-" * len(lines[0]), *lines[1:],
            "(tokens: greedy tokens equal to transformers'; top-1: its choice at every step of the ONNX path; peak memory:",
            " the export / its validation, which loads the model twice. The example's weights are random, so its",
            " logits are nearly tied (perplexity ~ the vocabulary size): int4 rounding flips many greedy choices here,",
            " where a trained model's margins are wide. fp32 must agree on every token.)"]


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
    and a chat template. Tokens 0, 1 and 2 are padding, start and end of text (the example's pad, bos and eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = torch.Generator().manual_seed(seed)
    syllables = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"] + list("aeiou")
    words = ["".join(syllables[int(i)] for i in torch.randint(len(syllables), (int(n),), generator=rng))
             for n in torch.randint(1, 4, (4 * vocab,), generator=rng)]
    corpus = [" ".join(words[int(i)] for i in torch.randint(len(words), (64,), generator=rng)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|pad|>", "<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    template = ("{% for m in messages %}<|startoftext|>{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                "{% if add_generation_prompt %}<|startoftext|>assistant: {% endif %}")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>", "add_bos_token": False, "chat_template": template,
        "model_max_length": 2048}, indent=2) + "\n")
