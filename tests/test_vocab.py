"""Experts with added tokens: merged over one vocabulary matched by token (ALGORITHMS.md §9.6, vocab.py).

Real transformers models and tokenizers: the base (60 tokens in 64 embedding rows, the last 4 padding), expert A
adds two special chat tokens and shrinks to 62 rows (resize_token_embeddings), expert B adds one of them and a
token of its own (64 rows, two of them padding). The reference matches rows by token string in fp64, written from
§9.6 alone: the base's row of a token (the mean of its token rows where it lacks one), an expert's row of it (the
base's output row where it lacks it), then task arithmetic.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import AddedToken

from lowmem_merge.errors import InputError
from lowmem_merge.merge import merge

from conftest import run_cli
from test_calibrated import _tokenizer

SCALE = 0.7
TEMPLATE_A = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
ADDED = {"A": ["<|im_start|>", "<|im_end|>"], "B": ["<|im_end|>", "<tool>"]}


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"])
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
                                   eos_token_id=2, architectures=["GPT2LMHeadModel"])     # tied lm_head


def _perturb(model, seed: int) -> None:
    """Move every trainable parameter (under PEFT: the LoRA factors and the modules_to_save copies)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def models(request, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(_config(request.param)).eval()
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    dirs = []
    for k, (name, pad) in enumerate([("A", None), ("B", 8)]):
        tok = _tokenizer()
        tok.add_tokens([AddedToken(t, special=True) for t in ADDED[name]])
        if name == "A":
            tok.chat_template = TEMPLATE_A
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=pad)
        _perturb(model, 10 + k)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    assert load_file(dirs[0] / "model.safetensors")[_emb(request.param)].shape[0] == 62
    return request.param, root / "base", dirs[0], dirs[1]


def _emb(arch: str) -> str:
    return "model.embed_tokens.weight" if arch == "llama" else "transformer.wte.weight"


def _vocab_tensors(arch: str) -> list[str]:
    return [_emb(arch), "lm_head.weight"] if arch == "llama" else [_emb(arch)]


def _tok(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path)


def _reference(out_tok, rows: int, base: Path, experts: list[Path], name: str) -> torch.Tensor:
    """§9.6 by token strings, fp64: base row (mean of its token rows where it lacks the token), each expert's row
    (the base's where it lacks the token), then W0 + λ Σ Δt."""
    def table(path: Path):
        w = load_file(path / "model.safetensors")[name].double()
        vocab = _tok(path).get_vocab()
        return w, {t: i for t, i in vocab.items() if i < w.shape[0]}
    bw, bv = table(base)
    mean = bw[sorted(bv.values())].mean(0)
    id_to_tok = {i: t for t, i in out_tok.get_vocab().items()}
    base_rows = []
    for i in range(rows):
        t = id_to_tok.get(i)
        if t is None:
            base_rows.append(bw[i] if i < bw.shape[0] and i not in bv.values() else mean)
        else:
            base_rows.append(bw[bv[t]] if t in bv else mean)
    w0 = torch.stack(base_rows)
    total = torch.zeros_like(w0)
    for path in experts:
        ew, ev = table(path)
        for i in range(rows):
            t = id_to_tok.get(i)
            if t is None:
                row = ew[i] if i < ew.shape[0] and i not in ev.values() else None
            else:
                row = ew[ev[t]] if t in ev else None
            if row is not None:
                total[i] += row - w0[i]
    return w0 + SCALE * total


def _merge(base: Path, experts: list[Path], out: Path, source: str | None) -> dict:
    report = merge(base, experts, out, "task_arithmetic", device="cpu", scale=SCALE, tokenizer_source=source)
    return report.data


@pytest.mark.parametrize("source", [None, "union", "base", "A"])
def test_vocabulary_alignment_matches_token_reference(models, tmp_path: Path, source: str | None) -> None:
    arch, base, a, b = models
    out = tmp_path / "out"
    data = _merge(base, [a, b], out, str(a) if source == "A" else source)
    tok = _tok(out)
    cfg = json.loads((out / "config.json").read_text())
    rows = {None: 64, "union": 64, "base": 64, "A": 62}[source]
    assert cfg["vocab_size"] == rows and data["vocabulary"]["rows"] == rows
    if source in (None, "union"):
        assert len(tok) == 63 and tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<tool>"]) == [60, 61, 62]
        assert data["vocabulary"]["added_tokens"] == ["<|im_start|>", "<|im_end|>", "<tool>"]
        assert all(tok.added_tokens_decoder[i].special for i in (60, 61, 62))   # added tokens keep their settings
        assert tok.chat_template == TEMPLATE_A                          # the only template among the models
    elif source == "base":
        assert len(tok) == 60 and data["vocabulary"]["added_tokens"] == []
    else:
        assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [60, 61] and len(tok) == 62
    assert any("vocabularies differ" in w for w in data["warnings"]) == (source is None)
    merged = load_file(out / "model.safetensors")
    for name in _vocab_tensors(arch):
        want = _reference(tok, rows, base, [a, b], name)
        assert merged[name].shape == want.shape, name
        torch.testing.assert_close(merged[name].double(), want, rtol=1e-6, atol=1e-6)
    other = next(n for n in merged if "layers.1" in n or ".h.1." in n)        # not vocabulary-indexed: as always
    w = [load_file(p / "model.safetensors")[other].double() for p in (base, a, b)]
    torch.testing.assert_close(merged[other].double(), w[0] + SCALE * (w[1] + w[2] - 2 * w[0]), rtol=1e-6,
                               atol=1e-6)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("<|im_start|> w1 w2 <|im_end|>", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], rows) and torch.isfinite(logits).all()


def test_cli_and_recipe_tokenizer_source(models, tmp_path: Path) -> None:
    arch, base, a, b = models
    if arch != "llama":
        pytest.skip("one architecture is enough for the command line")
    proc = run_cli("merge", base, a, b, "-m", "task_arithmetic", "-p", f"scale={SCALE}", "--tokenizer-source",
                   "union", "--device", "cpu", "-o", tmp_path / "cli", "-q", check=True, fresh=True)  # its peak, below
    assert proc.returncode == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {a}\n"
                      f"  - model: {b}\nparameters:\n  lambda: {SCALE}\ntokenizer:\n  source: union\n")
    run_cli("merge", "--config", recipe, "--device", "cpu", "-o", tmp_path / "recipe", "-q", check=True)
    for d in ("cli", "recipe"):
        assert (tmp_path / d / "tokenizer.json").read_bytes() == (tmp_path / "cli" / "tokenizer.json").read_bytes()
        got = load_file(tmp_path / d / "model.safetensors")
        assert got[_emb(arch)].shape[0] == 64
    first, second = (load_file(tmp_path / d / "model.safetensors") for d in ("cli", "recipe"))
    assert all(torch.equal(first[n], second[n]) for n in first)
    # the process's own peak (transformers and four tokenizers loaded) within what inspect promised beforehand
    from lowmem_merge.inspect import describe_plan
    plan = describe_plan(base, [a, b])
    peak = json.loads((tmp_path / "cli" / "lowmerge_report.json").read_text())["memory"]["peak_rss_bytes"]
    assert plan["vocabulary"]["rows"] == 64 and peak <= plan["methods"]["task_arithmetic"]["peak_bytes"], peak
    shown = run_cli("inspect", base, a, b, check=True).stdout
    assert "union vocabulary, 64 rows (base 64), matched by token; added: <|im_start|>, <|im_end|>, <tool>" in shown


def test_expert_of_another_vocabulary_without_tokenizer_is_refused(models, tmp_path: Path) -> None:
    arch, base, a, b = models
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(a / f, bare / f)
    with pytest.raises(InputError) as err:
        merge(base, [bare, b], tmp_path / "out", "task_arithmetic", device="cpu")
    assert "has 62 vocabulary rows, the base has 64" in err.value.msg and "no tokenizer files" in err.value.msg
    assert err.value.path == str(bare)
    assert not (tmp_path / "out").exists()


def test_expert_tokenizer_naming_custom_code_is_refused_and_never_run(models, tmp_path: Path) -> None:
    arch, base, a, b = models
    odd = tmp_path / "odd"
    shutil.copytree(a, odd)
    marker = tmp_path / "pwned"
    (odd / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = json.loads((odd / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["custom.Tok", "custom.Tok"]}
    (odd / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc = run_cli("merge", base, odd, b, "-o", tmp_path / "out", "-m", "task_arithmetic", "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {odd}: tokenizer_config.json names custom code (auto_map)"), proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_row_chunks_read_the_same_rows(models, tmp_path: Path, monkeypatch) -> None:
    """Row ranges of the aligned tensors (runs cut anywhere, fills inside a chunk) give the whole-tensor result."""
    from lowmem_merge import stream
    arch, base, a, b = models
    _merge(base, [a, b], tmp_path / "whole", "union")
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 100)      # 3 rows of 32 per chunk
    _merge(base, [a, b], tmp_path / "chunks", "union")
    whole, chunks = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "chunks"))
    assert all(torch.equal(whole[n], chunks[n]) for n in whole)


def test_lora_adapter_with_added_tokens_equals_its_materialized_model(models, tmp_path: Path) -> None:
    """A PEFT adapter trained with added tokens (embeddings and LM head in modules_to_save, its tokenizer beside
    it) merges as its merge_and_unload() checkpoint does."""
    peft = pytest.importorskip("peft")
    arch, base, a, b = models
    if arch != "llama":
        pytest.skip("one architecture is enough for adapters")
    tok = _tokenizer()
    tok.add_tokens([AddedToken(t, special=True) for t in ADDED["B"]])
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tok))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          modules_to_save=["embed_tokens", "lm_head"])
    model = peft.get_peft_model(model, cfg)
    _perturb(model, 5)
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    full = model.merge_and_unload()
    full.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    _merge(base, [a, tmp_path / "adapter"], tmp_path / "from_adapter", None)
    _merge(base, [a, tmp_path / "full"], tmp_path / "from_full", None)
    got, want = (load_file(tmp_path / d / "model.safetensors") for d in ("from_adapter", "from_full"))
    assert got.keys() == want.keys() and got[_emb(arch)].shape[0] == 64
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "from_adapter" / "tokenizer.json").read_bytes() == \
        (tmp_path / "from_full" / "tokenizer.json").read_bytes()
