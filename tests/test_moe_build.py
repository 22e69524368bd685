"""`lowmerge moe`: mergekit-moe's YAML in, a Mixtral checkpoint out that transformers loads and runs.

Routers are checked against mergekit-moe's formulas (mergekit/moe/router.py) written here from the full
transformers model in fp64; expert slots against the sources' bytes; the layout against an invariance (experts that
are all the base's MLP make the MoE compute the base); memory in real subprocesses, 2 against 6 experts.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_merge.demo import LlamaShape, build_example
from lowmem_merge.errors import OutputError
from lowmem_merge.moe import build_moe

from conftest import run_cli, run_cli_many
from test_errors import looks_complete, user_error

transformers = pytest.importorskip("transformers")

SHAPE = LlamaShape(hidden=64, intermediate=96, layers=3, vocab=300)
PROMPTS = {0: (["def fib(n): return", "fix this python code"], []),
           1: (["solve 3x + 4 = 10", "the integral of x squared"], ["write a python function"]),
           2: (["once upon a time", "the poem begins"], ["solve the equation", "prove the theorem"])}
# fp32 blocks against the fp64 model: rounding of a few 1e-7 per block on unit vectors; 1e-5 leaves a margin and
# is far below what separates the formulas' variants (checked in each test)
TOL = 1e-5


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_example(tmp_path_factory.mktemp("moe") / "in", SHAPE, n_experts=3, tokenizer=True)


def write_config(path: Path, base: Path, experts: list[Path], gate_mode: str, dtype: str | None = "float32",
                 extra: dict | None = None, prompts: dict = PROMPTS, **top) -> Path:
    doc = {"base_model": str(base), "gate_mode": gate_mode, **({"dtype": dtype} if dtype else {}), **top,
           "experts": [{"source_model": str(e), "positive_prompts": prompts[i % len(prompts)][0],
                        **({"negative_prompts": prompts[i % len(prompts)][1]} if prompts[i % len(prompts)][1]
                           else {}), **((extra or {}).get(i, {}))} for i, e in enumerate(experts)]}
    path.write_text(json.dumps(doc))           # JSON is YAML
    return path


def tokenized(base: Path, prompts: list[str]):
    """mergekit's tokenize_prompts with build()'s tokenizer settings (left padding with BOS)."""
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
               add_special_tokens=False)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def ref_hidden(base: Path, average: bool, prompts: list = list(PROMPTS.values())) -> torch.Tensor:
    """(layers, experts, hidden) fp64: mergekit's get_hidden_states on the whole model, then pos − neg, unit."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64).eval()

    def states(prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            hs = torch.stack(model(**tokenized(base, prompts), output_hidden_states=True).hidden_states[:-1])
        x = hs.sum(dim=2) / hs.shape[2] if average else hs[:, :, -1, :]
        return x.sum(dim=1) / x.shape[1]
    vecs = [unit(states(pos) - (states(neg) if neg else 0)) for pos, neg in prompts]
    return torch.stack(vecs, dim=1)


def ref_cheap_embed(base: Path) -> torch.Tensor:
    embed = load_file(base / "model.safetensors")["model.embed_tokens.weight"].double()

    def emb(prompts: list[str]) -> torch.Tensor:
        t = tokenized(base, prompts)
        h = torch.nn.functional.one_hot(t["input_ids"], embed.shape[0]).double() @ embed
        return unit((h * t["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0))
    vecs = [unit(emb(pos) - (emb(neg) if neg else 0)) for pos, neg in PROMPTS.values()]
    return torch.stack(vecs).unsqueeze(0).repeat(SHAPE.layers, 1, 1)


def loaded(out: Path):
    """The output in transformers, every weight from the checkpoint (none left at its random init, none unused)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def routers(out: Path) -> torch.Tensor:
    sd = load_file(out / "model.safetensors")
    return torch.stack([sd[f"model.layers.{i}.mlp.gate.weight"] for i in range(SHAPE.layers)]).double()


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_routers_follow_mergekit_moe(example, tmp_path, mode):
    base, experts = example
    out = tmp_path / "out"
    build_moe(write_config(tmp_path / "moe.yml", base, experts, mode), out, device="cpu")
    got, want = routers(out), ref_hidden(base, average=mode == "hidden_avg")
    assert got.shape == (SHAPE.layers, 3, SHAPE.hidden)
    assert (got - want).abs().max() < TOL
    other = ref_hidden(base, average=mode != "hidden_avg")          # the other reduction is told apart
    assert (got - other).abs().max() > 100 * TOL


def test_cheap_embed_routers_follow_mergekit_moe(example, tmp_path):
    base, experts = example
    out = tmp_path / "out"
    build_moe(write_config(tmp_path / "moe.yml", base, experts, "cheap_embed"), out)
    got, want = routers(out), ref_cheap_embed(base)
    assert (got - want).abs().max() < TOL
    assert (got[:, 1] - got[:, 0]).abs().max() > 100 * TOL            # the experts' routers differ


def test_random_routers_are_the_seeded_draw(example, tmp_path):
    base, experts = example
    outs = []
    for seed in (3, 3, 4):
        out = tmp_path / f"out{len(outs)}"
        build_moe(write_config(tmp_path / "moe.yml", base, experts, "random"), out, seed=seed)
        outs.append(routers(out))
    torch.manual_seed(3)               # mergekit draws torch.randn((layers, experts, hidden)) from the global RNG
    assert torch.equal(outs[0], torch.randn((SHAPE.layers, 3, SHAPE.hidden)).double())
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_expert_slots_hold_the_sources_mlp_bit_for_bit(example, tmp_path):
    base, experts = example
    out = tmp_path / "out"
    order = [experts[2], experts[0], experts[1]]
    build_moe(write_config(tmp_path / "moe.yml", base, order, "random", dtype=None, extra={2: {"residual_scale": 0.5}}),
              out)
    got, b = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    inter = SHAPE.intermediate
    for i in range(SHAPE.layers):
        p = f"model.layers.{i}."
        gate_up, down = got[p + "mlp.experts.gate_up_proj"], got[p + "mlp.experts.down_proj"]
        assert gate_up.shape == (3, 2 * inter, SHAPE.hidden) and down.shape == (3, SHAPE.hidden, inter)
        for slot, src in enumerate(order):
            e = load_file(src / "model.safetensors")
            assert torch.equal(gate_up[slot, :inter], e[p + "mlp.gate_proj.weight"])
            assert torch.equal(gate_up[slot, inter:], e[p + "mlp.up_proj.weight"])
            scale = 0.5 if slot == 2 else 1.0                        # mergekit's residual_scale on down_proj
            assert torch.equal(down[slot], e[p + "mlp.down_proj.weight"] * scale)
        for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "input_layernorm.weight"):
            assert torch.equal(got[p + name], b[p + name])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[name], b[name])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_local_experts"] == 3
    assert cfg["num_experts_per_tok"] == 2 and cfg["dtype"] == "bfloat16"


def test_experts_that_are_the_base_make_the_moe_compute_the_base(example, tmp_path):
    """Top-k weights sum to 1, so identical experts give the dense MLP: the output's logits are the base's (this
    checks gate/up order and every layout detail that transformers reads)."""
    base, _ = example
    out = tmp_path / "out"
    build_moe(write_config(tmp_path / "moe.yml", base, [base, base, base], "hidden"), out)
    ids = tokenized(base, ["the poem begins with a line", "solve it"])
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    moe = loaded(out)
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.dtype == torch.float32
    with torch.no_grad():
        want, got = dense(**ids).logits, moe(**ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_cli_output_loads_and_generates(example, tmp_path):
    base, experts = example
    out = tmp_path / "out"
    proc = run_cli("moe", write_config(tmp_path / "moe.yml", base, experts, "hidden", dtype="bfloat16"), "-o", out,
                   check=True)
    assert "merged 3 experts" in proc.stdout
    assert not list(out.glob("*.partial")) and (out / "tokenizer.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = loaded(out)
    assert type(model).__name__ == "MixtralForCausalLM" and model.dtype == torch.bfloat16
    ids = tok("once upon a time", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 6
    report = json.loads((out / "lowmerge_report.json").read_text())
    assert report["method"] == "moe" and report["output"]["experts"] == 3


SHARED = (["a general question", "tell me about it"], ["solve 3x + 4 = 10"])


def test_shared_expert_makes_a_qwen2_moe(example, tmp_path):
    """mergekit-moe's Qwen2-MoE form: one shared expert, its MLP and its sigmoid gate (its prompts' router row);
    a Llama base gets zero q/k/v biases, as mergekit writes."""
    base, experts = example
    out = tmp_path / "out"
    shared = {"source_model": str(experts[2]), "positive_prompts": SHARED[0], "negative_prompts": SHARED[1]}
    build_moe(write_config(tmp_path / "moe.yml", base, experts[:2], "hidden", shared_experts=[shared]), out)
    got = load_file(out / "model.safetensors")
    want = ref_hidden(base, average=False, prompts=[PROMPTS[0], PROMPTS[1], SHARED])
    src = load_file(experts[2] / "model.safetensors")
    for i in range(SHAPE.layers):
        p = f"model.layers.{i}."
        assert (got[p + "mlp.gate.weight"].double() - want[i, :2]).abs().max() < TOL
        assert (got[p + "mlp.shared_expert_gate.weight"].double() - want[i, 2:]).abs().max() < TOL
        for q in ("gate", "up", "down"):
            assert torch.equal(got[f"{p}mlp.shared_expert.{q}_proj.weight"], src[f"{p}mlp.{q}_proj.weight"])
        assert not got[p + "self_attn.k_proj.bias"].any()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["num_experts"] == 2
    model = loaded(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = tokenized(base, ["once upon a time"])
    assert model.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4


MERGEKIT_MOE = Path(__file__).resolve().parent.parent / "bench" / "_work" / "mergekit-venv" / "bin" / "mergekit-moe"


@pytest.mark.skipif(not MERGEKIT_MOE.exists(), reason="mergekit's venv is made by bench/vs_mergekit.py")
@pytest.mark.parametrize("mode, tol", [("cheap_embed", TOL),
                                       # mergekit runs the base in bf16 (ε = 2^-8 per element, over 3 layers);
                                       # distinct experts' unit rows differ by O(1)
                                       ("hidden", 2 ** -6)])
def test_same_model_as_mergekit_moe(example, tmp_path, mode, tol):
    """mergekit-moe itself on the same config. mergekit 0.1.5 under transformers 5 writes the same stacked layout:
    every tensor but the routers equal bit for bit, the routers as close as the two computations' rounding, the same
    config."""
    base, experts = example
    cfg = write_config(tmp_path / "moe.yml", base, experts, mode)
    out_mk, out_lm = tmp_path / "mk", tmp_path / "lm"
    proc = subprocess.run([str(MERGEKIT_MOE), str(cfg), str(out_mk), "--device", "cpu"], capture_output=True,
                          text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    build_moe(cfg, out_lm)
    mk = {k: v for f in sorted(out_mk.glob("*.safetensors")) for k, v in load_file(f).items()}
    lm = load_file(out_lm / "model.safetensors")
    assert set(mk) == set(lm)
    for name, t in mk.items():
        if name.endswith("mlp.gate.weight"):
            assert (t.double() - lm[name].double()).abs().max() < tol, name
        else:
            assert torch.equal(t, lm[name]), name
    keys = ("architectures", "num_local_experts", "num_experts_per_tok", "sliding_window", "dtype", "hidden_size",
            "intermediate_size", "num_hidden_layers", "num_key_value_heads", "rope_parameters", "vocab_size")
    a, b = (json.loads((d / "config.json").read_text()) for d in (out_mk, out_lm))
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


# -- bad input: one line (and its hint), nothing written ---------------------------------------------------------

def test_expert_of_another_width_is_refused(example, tmp_path):
    base, experts = example
    wide = build_example(tmp_path / "wide", LlamaShape(hidden=64, intermediate=128, layers=3, vocab=300),
                         n_experts=1)[1][0]
    out = tmp_path / "out"
    line = user_error(run_cli("moe", write_config(tmp_path / "moe.yml", base, [experts[0], wide], "random"),
                              "-o", out), "intermediate_size 128 differs from the base's 96")
    assert str(wide) in line
    assert not out.exists()


def test_expert_of_another_architecture_is_refused(example, tmp_path):
    base, experts = example
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300)) \
        .save_pretrained(gpt2)
    out = tmp_path / "out"
    user_error(run_cli("moe", write_config(tmp_path / "moe.yml", base, [experts[0], gpt2], "random"), "-o", out),
               str(gpt2), "model_type 'gpt2' differs from the base's 'llama'")
    assert not out.exists()


def test_empty_prompt_list_for_hidden_is_refused(example, tmp_path):
    base, experts = example
    prompts = {0: (["fix this code"], []), 1: ([], [])}
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "moe.yml", base, experts[:2], "hidden", prompts=prompts)
    user_error(run_cli("moe", cfg, "-o", out), "experts[1]", "no positive_prompts", "gate_mode hidden")
    assert not out.exists()


def test_a_config_that_is_a_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "moe.yaml"
    os.mkfifo(fifo)
    proc = run_cli("moe", fifo, "-o", tmp_path / "out", timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {fifo}: the MoE config is not a regular file")
    assert not (tmp_path / "out").exists()


def test_unknown_key_and_shared_experts_are_refused(example, tmp_path):
    base, experts = example
    out = tmp_path / "out"
    cfgs = [write_config(tmp_path / "a.yml", base, experts, "random", extra={0: {"weight": 1}}),
            write_config(tmp_path / "b.yml", base, experts, "random", shared_experts=[{"source_model": str(base)}] * 2),
            write_config(tmp_path / "c.yml", base, experts, "random", experts_per_token=4)]
    procs = run_cli_many(*[["moe", c, "-o", out] for c in cfgs])
    user_error(procs[0], "experts[0] has unknown key(s) weight")
    user_error(procs[1], "shared_experts must list exactly one expert")
    user_error(procs[2], "experts_per_token 4 is outside 1..3")
    assert not out.exists()


# -- memory: flat in the number of experts -----------------------------------------------------------------------

MEM_SHAPE = LlamaShape(hidden=1024, intermediate=4096, layers=2, vocab=2048, heads=8, kv_heads=8)


def test_peak_rss_is_flat_in_the_number_of_experts(tmp_path):
    """Each stacked expert tensor is 2 (or 6) × 16 MiB per projection: a build that held one would grow by ≥ 128 MiB
    from 2 to 6 experts; the bound allows 15 %."""
    base, experts = build_example(tmp_path / "in", MEM_SHAPE, n_experts=2, dtype=torch.float32, tokenizer=True)
    cfgs = {n: write_config(tmp_path / f"moe{n}.yml", base, [experts[i % 2] for i in range(n)], "hidden",
                            dtype=None) for n in (2, 6)}
    for n, cfg in cfgs.items():
        run_cli("moe", cfg, "-o", tmp_path / f"out{n}", "-q", check=True, fresh=True)
    peak = {n: json.loads((tmp_path / f"out{n}" / "lowmerge_report.json").read_text())["memory"]["peak_rss_bytes"]
            for n in cfgs}
    print(f"moe peak RSS: 2 experts {peak[2] / 2**20:.0f} MiB, 6 experts {peak[6] / 2**20:.0f} MiB")
    assert peak[6] <= 1.15 * peak[2], peak


def test_a_failed_build_leaves_nothing_complete_and_force_replaces_it(example, tmp_path):
    """A write that fails (RLIMIT_FSIZE: EFBIG) leaves only temporary names; the directory is then refused without
    --force, and --force builds into it."""
    base, experts = example
    cfg, out = write_config(tmp_path / "moe.yml", base, experts, "random"), tmp_path / "out"
    cmd = [sys.executable, "-m", "lowmem_merge", "moe", str(cfg), "-o", str(out)]
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16)))
    user_error(failed, "file size limit reached")
    assert out.is_dir() and looks_complete(out) == []
    with pytest.raises(OutputError, match="output directory exists and is not empty"):
        build_moe(cfg, out)
    build_moe(cfg, out, force=True)
    assert sorted(looks_complete(out)) == ["lowmerge_report.json", "model.safetensors"]
    assert not list(out.glob("*.partial"))
