"""--quantize int8|nf4: real CLI merges of a tiny Llama, loaded by transformers from config.json on the CPU.

The format is right when transformers' loader reads it and the logits equal those of transformers' own
quantize-on-load of the unquantized merge (bit for bit: the same bitsandbytes kernels on the same values). Closeness
to the unquantized merge is the formats' own error, bounded below with the reason; everything not quantized is the
unquantized output byte for byte.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import finish, run_cli, start_merge
from safetensors.torch import load_file

from lowmem_merge.demo import LlamaShape, build_example
from lowmem_merge.info import TensorClass, TensorInfo

transformers = pytest.importorskip("transformers")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs lowmerge[bnb]")

# bitsandbytes' CPU 4-bit matmul repacks weights in blocks of 64 input features, so conftest's TINY (hidden 32)
# cannot run a forward on the CPU; real models' widths are multiples of 64.
SHAPE = LlamaShape(hidden=64, intermediate=128, layers=2, vocab=128, heads=4, kv_heads=2)
SHARD = "40KB"          # ~170 KB of bf16 weights: several shards, so a run can stop between them
MODES = ("int8", "nf4")


def cli(root: Path, out: str, *extra: str, limit: int | None = None) -> subprocess.Popen:
    return start_merge(root, out, "-q", "--shard-size", SHARD, *extra, limit=limit)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(p).items()}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.name.endswith(".safetensors") or p.name.endswith(".index.json")}


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """``root/{plain,int8,nf4}``: the same merge unquantized and quantized, run side by side."""
    root = tmp_path_factory.mktemp("quantize")
    build_example(root / "in", SHAPE, n_experts=2)
    runs = {"plain": cli(root, "plain")} | {q: cli(root, q, "--quantize", q) for q in MODES}
    for name, proc in runs.items():
        done = finish(proc)
        assert done.returncode == 0, (name, done.stderr)
        assert "kernels" not in done.stderr, done.stderr       # bitsandbytes' import warning is kept quiet
    return root


def logits(path: Path, **kw) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw).eval()
    ids = torch.randint(0, SHAPE.vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


# Measured (this seed, bf16 merge): int8 relative L2 error 0.034, top-1 agreement 0.89; nf4 0.31 and 0.67. Random
# weights are the formats' hard case (no structure, absmax/rms ~3 per row or block): int8 rounds each weight to
# 1/254 of its row's absmax (~1 % rms), nf4 to 16 levels per block of 64 (~10 % rms), and 2 layers of attention and
# MLP compound it; the logits are nearly tied (std 0.17), so top-1 flips easily. The bounds are those numbers with a
# 1.5x margin on the error and ~0.15 on agreement: they catch a wrong scale, layout or block order (errors of order
# 1, agreement near chance, 1/128), while the exact check against transformers' quantize-on-load tests the format.
BOUNDS = {"int8": (0.05, 0.75), "nf4": (0.45, 0.5)}    # (max relative L2 error, min top-1 agreement)


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_loads_with_transformers_equal_to_its_own_quantization(merged, mode):
    cfg = json.loads((merged / mode / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg[f"load_in_{mode[-1]}bit"]
    ours = logits(merged / mode)
    bnb_cfg = transformers.BitsAndBytesConfig(**{k: v for k, v in cfg.items() if k != "quant_method"})
    theirs = logits(merged / "plain", quantization_config=bnb_cfg)
    assert torch.equal(ours, theirs)
    plain = logits(merged / "plain")
    rel = float((ours - plain).norm() / plain.norm())
    top1 = float((ours.argmax(-1) == plain.argmax(-1)).float().mean())
    max_rel, min_top1 = BOUNDS[mode]
    assert rel < max_rel and top1 >= min_top1, (rel, top1)
    report = json.loads((merged / mode / "lowmerge_report.json").read_text())
    assert report["output"]["quantize"] == mode and report["output"]["quantized_tensors"] == 7 * SHAPE.layers


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_other_tensors_equal_the_unquantized_output(merged, mode):
    plain, quant = tensors(merged / "plain"), tensors(merged / mode)
    linear = {n for n in plain if n.endswith("_proj.weight")}
    assert len(linear) == 7 * SHAPE.layers
    for name, t in plain.items():
        if name not in linear:
            assert torch.equal(quant[name], t), name           # embeddings, norms, lm_head: bit for bit
    assert sum(p.stat().st_size for p in (merged / mode).glob("*.safetensors")) < \
        sum(p.stat().st_size for p in (merged / "plain").glob("*.safetensors"))


@needs_bnb
def test_int8_dequantizes_to_the_merged_weight_within_half_a_step(merged):
    plain, quant = tensors(merged / "plain"), tensors(merged / "int8")
    for name in (n for n in plain if n.endswith("_proj.weight")):
        w = plain[name].float()                                      # (out, in)
        cb, scb = quant[name], quant[name.removesuffix(".weight") + ".SCB"]
        assert cb.dtype == torch.int8 and cb.shape == w.shape
        step = scb[:, None] / 127                                    # one int8 step of each row
        err = (cb.float() * step - w).abs()
        # half a step, plus the fp16 cast bitsandbytes makes first (2^-11 relative)
        assert bool((err <= step / 2 * 1.001 + w.abs() * 2 ** -11).all()), name


@needs_bnb
def test_nf4_dequantizes_to_the_merged_weight_within_half_a_level(merged):
    import bitsandbytes.functional as F
    plain, quant = tensors(merged / "plain"), tensors(merged / "nf4")
    code = F.get_4bit_type("nf4", device="cpu")
    half_gap = float((code[1:] - code[:-1]).max()) / 2             # 0.139: the widest gap, 0.72 .. 1.0
    for name in (n for n in plain if n.endswith("_proj.weight")):
        w = plain[name].float()
        stats = {k.removeprefix(name + "."): v for k, v in quant.items() if k.startswith(name + ".")}
        state = F.QuantState.from_dict(stats, device=torch.device("cpu"))
        assert tuple(state.shape) == tuple(w.shape) and state.dtype == plain[name].dtype
        deq = F.dequantize_4bit(quant[name], state).float()
        absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)      # each block's true scale
        err = (deq - w).reshape(-1, 64).abs()
        # half the widest level gap, plus 2 % for absmax stored in 8 bits (double quantization), plus bf16 rounding
        assert bool((err <= (half_gap + 0.02) * absmax + deq.abs().reshape(-1, 64) * 2 ** -8).all()), name


@needs_bnb
@pytest.mark.parametrize("mode", MODES)
def test_streamed_rows_quantize_like_the_whole_tensor(monkeypatch, mode):
    """Row chunks (elementwise rules on large tensors) and slabs give bitsandbytes' whole-tensor bytes exactly,
    with blocks of 64 straddling chunk boundaries (75 columns)."""
    import bitsandbytes.functional as F

    from lowmem_merge import quantize as Q
    monkeypatch.setattr(Q, "SLAB", 1000)
    w = torch.randn(97, 75, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    info = TensorInfo("m.q_proj.weight", tuple(w.shape), TensorClass.LIN)
    q = Q.Quantizer(mode, [info], {info.name: w.dtype}, torch.device("cpu"))
    specs = q.specs(info.name, w.dtype, info.shape)
    got: dict[str, list[torch.Tensor]] = {}
    for r0, r1 in ((0, 10), (10, 33), (33, 34), (34, 97)):
        for name, t in q.feed(info.name, w[r0:r1].clone()):
            got.setdefault(name, []).append(t.reshape(-1))
    assert [s[0] for s in specs] == list(got)
    flat = {name: torch.cat(parts) for name, parts in got.items()}
    for name, dtype, shape in specs:                                 # what the shard header promised
        assert flat[name].dtype == dtype and flat[name].numel() == torch.Size(shape).numel(), name
    if mode == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        ref = {info.name: cb, "m.q_proj.SCB": scb}
    else:
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True,
                                        quant_storage=torch.uint8)
        ref = {info.name: packed} | {f"{info.name}.{k}": v for k, v in state.as_dict(packed=True).items()}
    for name, t in ref.items():
        if name.endswith("bitsandbytes__nf4"):                        # our JSON is padded to a planned length
            assert json.loads(bytes(flat[name].numpy())) == json.loads(bytes(t.numpy()))
        else:
            assert torch.equal(flat[name], t.reshape(-1)), name


@pytest.fixture(scope="module")
def interrupted(merged) -> Path:
    """``merged/stopped``: the int8 merge stopped by a file-size limit after its first shards."""
    sizes = [len(b) for n, b in sorted(shard_bytes(merged / "int8").items()) if n.endswith(".safetensors")]
    stop = next(i for i in range(1, len(sizes)) if sizes[i] > max(sizes[:i]))
    done = finish(cli(merged, "stopped", "--quantize", "int8", limit=sizes[stop] - 1))
    assert done.returncode == 1 and "file size limit" in done.stderr, done.stderr
    return merged / "stopped"


@needs_bnb
def test_resume_refuses_another_quantize_and_finishes_the_same_one(merged, interrupted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(merged, copy, ignore=shutil.ignore_patterns("plain", "int8", "nf4"))
    other = cli(copy, "stopped", "--quantize", "nf4", "--resume")
    same = finish(cli(merged, "stopped", "--quantize", "int8", "--resume"))
    other = finish(other)
    assert other.returncode == 1 and "cannot resume" in other.stderr and "quantize" in other.stderr, other.stderr
    assert same.returncode == 0, same.stderr
    assert json.loads((interrupted / "lowmerge_report.json").read_text())["output"]["resumed_shards"]
    assert shard_bytes(interrupted) == shard_bytes(merged / "int8")


def test_without_bitsandbytes_the_error_says_how_to_install_it(tiny, tmp_path):
    fake = tmp_path / "site" / "bitsandbytes"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    base, experts = tiny
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "out", "--quantize", "nf4",
                   env={"PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == ["error: --quantize needs bitsandbytes, which is not installed",
                                        "hint: pip install 'lowmerge[bnb]'"]
    assert not (tmp_path / "out").exists()                       # refused before the output is touched


@pytest.mark.gpu
@needs_bnb
def test_cuda_quantization_loads_and_matches_the_cpu_one(merged, tmp_path):
    shutil.copytree(merged / "in", tmp_path / "in")
    done = finish(cli(tmp_path, "gpu", "--quantize", "nf4", "--device", "cuda"))
    assert done.returncode == 0, done.stderr
    ours, cpu = logits(tmp_path / "gpu"), logits(merged / "nf4")
    assert float((ours - cpu).norm() / cpu.norm()) < 0.05       # kernels may round a few ties differently
