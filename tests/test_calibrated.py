"""RegMean and Chain of Merges on tiny real transformers models (Llama, GPT-2, BERT), against in-memory references.

The references hold every model whole and run full forwards (no block-by-block walk, no caches): RegMean's Grams
come from one forward of each expert over its own data, Chain of Merges re-runs the whole partly merged model from
the input ids for every group of layers. Both solve in fp64.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lowmem_merge.merge import merge

from conftest import bytes_held, finish, needs_clear_refs, run_cli, run_cli_many, start_merge

SAMPLES, SEQ_LEN = 24, 12
WORDS = [f"w{i}" for i in range(56)]
# forward order of each architecture's linear layers, grouped by shared input (written by hand, not discovered)
GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    "bert": [["attention.self.query", "attention.self.key", "attention.self.value"], ["attention.output.dense"],
             ["intermediate.dense"], ["output.dense"]],
}
BLOCKS = {"llama": "model.layers", "gpt2": "transformer.h", "bert": "encoder.layer"}


def _config(arch: str, layers: int = 2):
    common = dict(vocab_size=64)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, architectures=["LlamaForCausalLM"], **common)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1,
                                       eos_token_id=2, architectures=["GPT2LMHeadModel"], **common)
    return transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                   intermediate_size=48, max_position_embeddings=64, pad_token_id=0,
                                   architectures=["BertModel"], **common)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def build(root: Path, arch: str, n_experts: int = 3, layers: int = 2, identical: bool = False):
    """A base, ``n_experts`` fine-tunes of it (every tensor moved), the tokenizer, and one text file per expert
    drawn from its own part of the vocabulary (each task its own data)."""
    torch.manual_seed(0)
    cfg = _config(arch, layers)
    model = getattr(transformers, cfg.architectures[0])(cfg).eval()
    base = root / "base"
    model.save_pretrained(base)
    _tokenizer().save_pretrained(base)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    experts, files = [], []
    for t in range(n_experts):
        g = torch.Generator().manual_seed(1 if identical else 100 + t)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(start[name] + 0.1 * start[name].abs().mean() * torch.randn(p.shape, generator=g))
        experts.append(root / f"expert{t}")
        model.save_pretrained(experts[-1])
        lines = []
        for _ in range(SAMPLES + 6):
            n = int(torch.randint(3, SEQ_LEN + 4, (1,), generator=g))
            ids = torch.randint(t * 12, t * 12 + 24, (n,), generator=g)
            lines.append(" ".join(WORDS[int(i)] for i in ids))
        files.append(root / f"task{t}.txt")
        files[-1].write_text("\n".join(lines) + "\n")
    return base, experts, files


def _batch(base: Path, file: Path) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(base)
    lines = [x for x in file.read_text().splitlines() if x.strip()][:SAMPLES]
    enc = tok(lines, max_length=SEQ_LEN, truncation=True, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _load(path: Path):
    cfg = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, cfg.architectures[0]).from_pretrained(path).eval()


def _linears(arch: str, model, layers: int) -> list[list[str]]:
    """Module names of every group, block by block, in forward order."""
    return [[f"{BLOCKS[arch]}.{i}.{m}" for m in g] for i in range(layers) for g in GROUPS[arch]]


def _oriented(arch: str, w: torch.Tensor) -> torch.Tensor:
    """(out, in): GPT-2's Conv1D stores (in, out)."""
    return w.T if arch == "gpt2" else w


def _input_gram(model, module: str, batch: dict, token_norm: bool = False) -> tuple[torch.Tensor, int]:
    """Σ x xᵀ (fp64) over every token of the module's input in one full forward, and the token count."""
    seen = {}

    def hook(m, args):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1]).double()
    h = model.get_submodule(module).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(**batch)
    h.remove()
    x = seen["x"]
    if token_norm:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return x.T @ x, x.shape[0]


def _solve(base_w, expert_ws, grams, weights, ridge_rel):
    """W0 + (Σ w Δt C_t)(Σ w C_t + r·tr/n·I)⁻¹ in fp64, (out, in); and the system matrix."""
    a = sum(w * g for w, g in zip(weights, grams))
    n = a.shape[0]
    a = a + ridge_rel * torch.trace(a) / n * torch.eye(n, dtype=torch.float64)
    nn = sum(w * (e - base_w) @ g for w, e, g in zip(weights, expert_ws, grams))
    return base_w + torch.linalg.solve(a, nn.T).T, a


def regmean_reference(arch: str, base: Path, experts: list[Path], files: list[Path], alpha: float, layers: int):
    base_sd = load_file(base / "model.safetensors")
    models_ = [_load(e) for e in experts]
    sds = [load_file(e / "model.safetensors") for e in experts]
    out = {k: torch.stack([sd[k].double() for sd in sds]).mean(0) for k in base_sd}
    systems = {}
    for group in _linears(arch, models_[0], layers):
        grams = []
        for model, f in zip(models_, files):
            s, rows = _input_gram(model, group[0], _batch(base, f))
            g = s / rows
            grams.append(alpha * g + (1 - alpha) * torch.diag(torch.diag(g)))
        for module in group:
            key = module + ".weight"
            w, systems[key] = _solve(_oriented(arch, base_sd[key].double()),
                                     [_oriented(arch, sd[key].double()) for sd in sds], grams, [1.0] * len(sds), 0.0)
            out[key] = _oriented(arch, w)
    return out, systems


def chain_reference(arch: str, base: Path, experts: list[Path], files: list[Path], ridge: float, layers: int,
                    normalize: str = "feature", importance: bool = True):
    """Alg. 1: start from the average, then group by group in forward order, Grams from full forwards of the
    merged model as it stands."""
    base_sd = load_file(base / "model.safetensors")
    sds = [load_file(e / "model.safetensors") for e in experts]
    out = {k: torch.stack([sd[k].double() for sd in sds]).mean(0) for k in base_sd}
    systems = {}
    merged = _load(experts[0])
    merged.load_state_dict({k: v.float() for k, v in out.items()}, strict=False)
    batches = [_batch(base, f) for f in files]
    for group in _linears(arch, merged, layers):
        grams, weights = [], []
        for batch in batches:
            s, rows = _input_gram(merged, group[0], batch, token_norm=normalize == "token")
            if normalize == "feature":
                d = torch.diag(s).sqrt()
                inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
                g = s * inv[:, None] * inv[None, :]
            else:
                g = s if normalize == "token" else s / rows
            grams.append(g)
            weights.append(float(g.abs().sum() - torch.diag(g).abs().sum()) / 2 if importance else 1.0)
        for module in group:
            key = module + ".weight"
            w, systems[key] = _solve(_oriented(arch, base_sd[key].double()),
                                     [_oriented(arch, sd[key].double()) for sd in sds], grams, weights, ridge)
            out[key] = _oriented(arch, w)
        merged.load_state_dict({k: out[k].float() for k in (m + ".weight" for m in group)}, strict=False)
    return out, systems


def _compare(arch: str, out_dir: Path, reference: tuple[dict, dict], rtol: float = 2e-4) -> None:
    """Averaged tensors to fp32 rounding. A solved layer in the norm its rule minimizes, ‖(W − W_ref) A^½‖ relative
    to ‖W_ref A^½‖ with A the reference's system matrix: fp32 Grams make the solution's error grow with A's
    condition number (~1e4 for o_proj here, whose inputs are nearly collinear), but only along directions the data
    barely reaches."""
    weights, systems = reference
    got = load_file(out_dir / "model.safetensors")
    assert set(got) == set(weights)
    for name, ref in weights.items():
        if name in systems:
            diff, want = (_oriented(arch, x) for x in (got[name].double() - ref, ref))
            a = systems[name]
            err = float(torch.trace(diff @ a @ diff.T).sqrt() / torch.trace(want @ a @ want.T).sqrt())
        else:
            err = float((got[name].double() - ref).norm() / ref.norm().clamp_min(1e-12)) * 20
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_regmean_equals_its_closed_form(tmp_path, arch):
    base, experts, files = build(tmp_path, arch)
    merge(base, experts, tmp_path / "out", "regmean", calib=files, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
          alpha=0.9)
    _compare(arch, tmp_path / "out", regmean_reference(arch, base, experts, files, 0.9, layers=2))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_chain_equals_the_sequential_rule(tmp_path, arch):
    base, experts, files = build(tmp_path, arch)
    merge(base, experts, tmp_path / "out", "chain", calib=files, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN)
    _compare(arch, tmp_path / "out", chain_reference(arch, base, experts, files, 1e-6, layers=2))


@pytest.mark.parametrize("normalize,importance", [("token", True), ("none", False)])
def test_chain_variants(tmp_path, normalize, importance):
    base, experts, files = build(tmp_path, "llama")
    merge(base, experts, tmp_path / "out", "chain", calib=files, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN,
          normalize=normalize, importance=str(importance))
    _compare("llama", tmp_path / "out", chain_reference("llama", base, experts, files, 1e-6, 2, normalize, importance))


def test_chain_without_normalization_or_weights_is_regmean_on_the_first_layers(tmp_path):
    """ALGORITHMS.md §11.7 (4): on the first group both see the same inputs (the merged embeddings are the experts'
    mean, and with identical embeddings in every expert RegMean's inputs are those too)."""
    base, experts, files = build(tmp_path, "llama")
    sd0 = load_file(experts[0] / "model.safetensors")
    for e in experts[1:]:   # every expert gets expert 0's embeddings: the first layer's inputs agree
        sd = load_file(e / "model.safetensors")
        sd["model.embed_tokens.weight"] = sd0["model.embed_tokens.weight"]
        sd["model.layers.0.input_layernorm.weight"] = sd0["model.layers.0.input_layernorm.weight"]
        from safetensors.torch import save_file
        save_file(sd, e / "model.safetensors", metadata={"format": "pt"})
    kw = dict(calib=files, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN)
    merge(base, experts, tmp_path / "chain", "chain", normalize="none", importance="false", ridge=0, **kw)
    merge(base, experts, tmp_path / "regmean", "regmean", alpha=1, **kw)
    a, b = load_file(tmp_path / "chain" / "model.safetensors"), load_file(tmp_path / "regmean" / "model.safetensors")
    for m in GROUPS["llama"][0]:
        key = f"model.layers.0.{m}.weight"
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert not torch.allclose(a["model.layers.1.mlp.down_proj.weight"], b["model.layers.1.mlp.down_proj.weight"],
                              rtol=1e-4, atol=1e-6)   # later layers see different inputs


def _outputs(model_dir: Path, base: Path, files: list[Path]) -> list[torch.Tensor]:
    model = _load(model_dir)
    with torch.no_grad():
        return [model(**_batch(base, f), output_hidden_states=True).hidden_states[-1] for f in files]


@pytest.mark.parametrize("method", ["regmean", "chain"])
@pytest.mark.parametrize("arch,n_experts", [("llama", 3), ("gpt2", 1)])
def test_identical_experts_or_one_return_the_expert(tmp_path, method, arch, n_experts):
    """ALGORITHMS.md §11.7 (2, 5): the merged model reproduces the expert's activations on the data. (Weights equal
    the expert's only where the data spans every input direction: GPT-2's LayerNorm output, with β = 0, is centred,
    so the rules cannot see, and keep W0 along, the all-ones direction.)"""
    base, experts, files = build(tmp_path, arch, n_experts=n_experts, identical=True)
    merge(base, experts, tmp_path / "out", method, calib=files, calib_samples=SAMPLES, calib_seq_len=SEQ_LEN)
    # fp32 solves: N = Σ Δ C_t rounds at eps·‖Δ‖‖A‖ and A⁻¹ scales that by up to κ(A) (~1e4-1e5 for Llama's o_proj
    # here): measured 1e-4 (GPT-2) to 8e-4 (Llama, chain) on the outputs; a wrong Gram or order gives O(1) errors
    for got, want in zip(_outputs(tmp_path / "out", base, files), _outputs(experts[0], base, files)):
        assert float((got - want).norm() / want.norm()) < 3e-3
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(experts[0] / "model.safetensors")
    for name, w in want.items():    # averaged tensors are the expert's exactly
        if not name.endswith(".weight") or w.ndim == 1 or "emb" in name or "wte" in name or "wpe" in name:
            assert torch.allclose(got[name], w, rtol=1e-6, atol=1e-7), name


def test_cli_chain_output_loads_and_resumes(tmp_path):
    """Through the CLI with JSONL calibration files: transformers loads the result and runs it. A run stopped by a
    file-size limit after some shards, resumed with --resume, keeps those shards and ends byte-identical (the walk
    runs again from the first layer; finished tensors are not written twice)."""
    base, experts, files = build(tmp_path / "in", "llama")
    jsonl = []
    for f in files:
        jsonl.append(f.with_suffix(".jsonl"))
        jsonl[-1].write_text("".join(json.dumps({"text": x}) + "\n" for x in f.read_text().splitlines()))
    args = ["-m", "chain", *[str(a) for f in jsonl for a in ("--calib", f)], "--calib-samples", str(SAMPLES),
            "--calib-seq-len", str(SEQ_LEN), "--shard-size", "12KB", "-q"]
    proc = finish(start_merge(tmp_path, "ref", *args))
    assert proc.returncode == 0, proc.stderr
    model = _load(tmp_path / "ref")
    with torch.no_grad():
        logits = model(**_batch(base, files[0])).logits
    assert torch.isfinite(logits).all()
    shards = json.loads((tmp_path / "ref" / "lowmerge_report.json").read_text())["output"]["shards"]
    sizes = [(tmp_path / "ref" / s).stat().st_size for s in shards]
    stop = next(i for i in range(1, len(sizes)) if sizes[i] > max(sizes[:i]))
    proc = finish(start_merge(tmp_path, "out", *args, limit=sizes[stop] - 1))
    assert proc.returncode == 1 and "file size limit" in proc.stderr, proc.stderr
    proc = finish(start_merge(tmp_path, "out", *args, "--resume"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out" / "lowmerge_report.json").read_text())
    assert report["output"]["resumed_shards"] == shards[:stop]
    for s in shards:
        assert (tmp_path / "out" / s).read_bytes() == (tmp_path / "ref" / s).read_bytes(), s


def test_calibration_errors(tmp_path):
    base, experts, files = build(tmp_path, "llama", n_experts=2)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [   # independent runs (an output directory each), two at a time: method, --calib files, message
        ("regmean", [], "regmean needs calibration data: --calib FILE once per expert"),
        ("chain", [files[0]], "chain: 1 --calib files for 2 experts"),
        ("average", files, "average is data-free: --calib is not used"),
        ("chain", [files[0], empty], f"{empty}: the calibration file holds no examples"),
    ]
    procs = run_cli_many(*(["merge", base, *experts, "-o", tmp_path / f"o{i}", "-m", method,
                            *[a for f in calib for a in ("--calib", f)]] for i, (method, calib, _) in enumerate(cases)))
    for (method, _, message), proc in zip(cases, procs):
        assert message in proc.stderr, proc.stderr
        if method != "average":
            assert proc.returncode != 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink(missing_ok=True)
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "o", "-m", "chain", "--calib", files[0], "--calib",
                   files[1])
    assert "cannot load the base's tokenizer" in proc.stderr or "tokenizer" in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_custom_code_named_by_the_base_is_refused_and_never_run(tmp_path):
    """A config.json with auto_map makes transformers offer to import the model's own Python: lowmerge refuses."""
    base, experts, files = build(tmp_path / "in", "llama", n_experts=2)
    marker = tmp_path / "pwned"
    (base / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for name in ("config.json", "tokenizer_config.json"):
        cfg = json.loads((base / name).read_text())
        cfg["auto_map"] = {"AutoConfig": "custom.Config", "AutoTokenizer": ["custom.Tok", None],
                           "AutoModel": "custom.Model"}
        (base / name).write_text(json.dumps(cfg))
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "out", "-m", "regmean", "--calib", files[0], "--calib",
                   files[1])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {base}: ") and "auto_map" in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("line", ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "[" * 100_000 + "]" * 100_000],
                         ids=["nested-text", "nested-line"])
def test_deeply_nested_jsonl_is_one_line(tmp_path, line):
    base, experts, files = build(tmp_path / "in", "llama", n_experts=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "out", "-m", "regmean", "--calib", files[0], "--calib",
                   bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {bad}: line 1") and "hint: " in proc.stderr, proc.stderr


def test_a_calibration_file_that_is_a_fifo_is_refused_instead_of_blocking(tmp_path):
    base, experts, files = build(tmp_path / "in", "llama", n_experts=2)
    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "out", "-m", "regmean", "--calib", files[0],
                   "--calib", fifo, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {fifo}: the calibration file is not a regular file")
    assert not (tmp_path / "out").exists()


def test_one_huge_line_is_cut_before_it_is_tokenized(tmp_path):
    """An 11 MB line costs what SEQ_LEN tokens cost: the peak memory of the merge stays where it is without it."""
    base, experts, files = build(tmp_path / "in", "llama", n_experts=2)
    huge = tmp_path / "huge.txt"
    huge.write_text(" ".join(WORDS[i % 56] for i in range(3_500_000)) + "\n" + files[1].read_text())
    assert huge.stat().st_size > 11e6
    peaks = []
    for name, calib in (("plain", files[1]), ("huge", huge)):
        out = tmp_path / name
        args = ["-m", "regmean", "--calib", files[0], "--calib", calib, "--calib-samples", str(SAMPLES),
                "--calib-seq-len", str(SEQ_LEN), "-q"]
        run_cli("merge", base, *experts, "-o", out, *args, check=True, fresh=True)
        peaks.append(json.loads((out / "lowmerge_report.json").read_text())["memory"]["peak_rss_bytes"])
    assert peaks[1] < peaks[0] + 150 * 2**20, peaks


_SINGULAR_GRAM = """
from lowmem_merge.methods.regmean import Inverse
b = torch.randn(n, n // 2, generator=torch.Generator().manual_seed(0))
a = b @ b.T
a.diagonal().sub_(1e-3 * float(a.trace()) / n)   # indefinite: the fp32 and the fp64 Cholesky both fail
"""
_INVERSE = """
inv = Inverse(a, 0.0)
assert inv.vecs is not None, "expected the eigh pseudo-inverse"
"""


@needs_clear_refs
def test_the_eigh_fallback_of_a_singular_calibration_gram_holds_what_the_plan_prices():
    """RegMean's solver on a Gram whose two Cholesky attempts fail (subprocess, n = 2048): its peak beside A is the
    fp64 attempt (a copy and its factor, 4 fp32 n²) or the eigh (EIGH_FLOATS / 2), as ``_matrix_floats`` prices,
    plus a few MiB of library pages touched on first use. It held 5.36 n² while the failed fp32 factor stayed alive
    through the fp64 attempt and the failed fp64 factor through the eigh."""
    import math
    from lowmem_merge.methods.matrix_rule import EIGH_FLOATS
    n = 2048
    held = bytes_held(_SINGULAR_GRAM, _INVERSE, n)
    priced = 4 * max(4 * n * n, math.ceil(EIGH_FLOATS / 2 * n * n))
    print(f"Inverse held {held / (4 * n * n):.2f} fp32 n² (priced {priced / (4 * n * n):.2f})")
    assert 0.95 * 16 * n * n <= held <= priced + (8 << 20), held / (4 * n * n)
