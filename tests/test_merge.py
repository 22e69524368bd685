"""The engine end to end: streamed output == the same rule applied in memory to whole tensors, on real files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_merge import merge, stream
from lowmem_merge.demo import build_example
from lowmem_merge.info import TensorClass
from lowmem_merge.io.checkpoint import open_checkpoint
from lowmem_merge.methods import REGISTRY, parse_params
from lowmem_merge.methods.drive import drive, gather
from lowmem_merge.plan import make_plan

from conftest import TINY, run_cli


FIXED_EXPERTS = {"slerp": 1, "nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}   # rules of a fixed number of experts take the first ones


def load_model(d: Path) -> dict[str, torch.Tensor]:
    files = sorted(d.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def in_memory_merge(base: Path, experts: list[Path], method: str, out_dtype: torch.dtype | None = None,
                    **params) -> dict[str, torch.Tensor]:
    """Whole tensors, every expert at once, no streaming code: the rule applied straight to the state dicts through
    ``drive`` (the stream's loop). ``out_dtype``: the merged tensors' dtype (None: the base's)."""
    cls = REGISTRY[method]
    parsed = parse_params(cls, {k: str(v) for k, v in params.items()})
    with open_checkpoint(base) as b:
        plan = make_plan(b, [open_checkpoint(e) for e in experts])
    W0 = load_model(base) if base.is_dir() else load_file(base)
    Ws = [load_model(e) if e.is_dir() else load_file(e) for e in experts]

    def deltas(info):
        ds = [(W[info.name].double() - W0[info.name].double()).float() for W in Ws]
        return [d.T.contiguous() for d in ds] if info.transposed else ds

    merged_infos = [i for i in plan.tensors if i.cls in stream.MERGED]
    prepass = cls.prepass_for(parsed)
    def base_of(info):
        return W0[info.name].T if info.transposed else W0[info.name]

    state = gather(cls, parsed, len(Ws), lambda: [(i, deltas(i)) for i in merged_infos], base_of=base_of) \
        if prepass and prepass.scope == "model" else None
    out: dict[str, torch.Tensor] = {}
    for info in plan.tensors:
        if info.cls not in stream.MERGED and info.cls != TensorClass.TIED:
            out[info.name] = W0[info.name]
            continue
        src = next(i for i in plan.tensors if i.name == info.tied_to) if info.cls == TensorClass.TIED else info
        if prepass and prepass.scope == "tensor":
            state = gather(cls, parsed, len(Ws), lambda: [(src, deltas(src))], base_of=base_of)
        ds = deltas(src)
        delta, _ = drive(cls, parsed, src, len(Ws), lambda p, t: ds[t].clone(), state,
                         base=base_of(src) if cls.needs_base else None)
        delta = delta.T if src.transposed else delta
        out[info.name] = (W0[src.name].float() + delta).to(out_dtype or W0[src.name].dtype)
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        if exact:
            assert torch.equal(got[name], want[name]), name
        else:  # fp32 results computed in another order: within rounding of the stored dtype
            torch.testing.assert_close(got[name].float(), want[name].float(), rtol=2e-2 if got[name].dtype != torch.float32 else 1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_elementwise_equals_fp64_formula(tiny, tmp_path, method):
    base, experts = tiny
    out = tmp_path / "out"
    merge(base, experts, out, method, dtype="float32")
    got = load_model(out)
    W0, Ws = load_model(base), [load_model(e) for e in experts]
    lam = 1 / len(Ws) if method == "average" else 0.4
    for name, w0 in W0.items():
        want = w0.double() + lam * sum(W[name].double() - w0.double() for W in Ws)
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-7)  # fp32 rounding of Δ sums


@pytest.mark.parametrize("method", sorted(m for m, c in REGISTRY.items() if not c.calibration))  # calibrated
def test_streamed_equals_in_memory(tiny, tmp_path, method):                # rules: tests/test_calibrated.py
    base, experts = tiny
    experts = experts[:FIXED_EXPERTS[method]] if method in FIXED_EXPERTS else experts      # the base and one expert
    out = tmp_path / "out"
    merge(base, experts, out, method)
    assert_same(load_model(out), in_memory_merge(base, experts, method), exact=False)


@pytest.mark.parametrize("method,params", [("karcher", {}), ("karcher", {"tol": 1e-12, "max_iter": 4}), ("sce", {}),
                                           ("sce", {"select_topk": 0.5})])
def test_multi_pass_rules_streamed_equal_in_memory_in_fp32(tiny, tmp_path, method, params):
    """Rules that read every expert several times (karcher: 1 + max_iter, sce: 2 or 3 by select_topk): the stream
    and the in-memory ``drive`` see the same fp32 Δs, so their fp32 outputs are bitwise equal. With the in-memory
    side at a wrong pass count, the tol=1e-12 karcher and the select_topk=0.5 sce cases fail (karcher at its
    default tol converges in its first step on these small task vectors, and sce's third pass is unused when every
    entry is kept, so a wrong count does not change those two)."""
    base, experts = tiny
    merge(base, experts, tmp_path / "out", method, dtype="float32", **params)
    got, want = load_model(tmp_path / "out"), in_memory_merge(base, experts, method, torch.float32, **params)
    w0 = load_model(base)
    assert sum(not torch.equal(want[n], w0[n].float()) for n in want) > 10     # the rule moved most tensors
    assert_same(got, want, exact=True)


def test_output_loads_in_transformers_and_matches(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, experts = tiny
    out = tmp_path / "out"
    merge(base, experts, out, "task_arithmetic")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(base)
    ref.load_state_dict(in_memory_merge(base, experts, "task_arithmetic"), strict=False)
    ids = torch.randint(0, TINY.vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    report = json.loads((out / "lowmerge_report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["params"] == {"scale": 0.4, "weights": []}
    assert report["inputs"]["experts"][0]["files"][0]["header_sha256"]
    assert report["memory"]["peak_rss_bytes"] > 0 and report["timings_s"]["total"] > 0
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    assert (out / "README.md").read_text().startswith("---")
    assert not (out / "lowmerge-manifest.json").exists()


def test_sharded_inputs_and_outputs_equal_single_file(tmp_path):
    base, experts = build_example(tmp_path / "single", TINY, n_experts=2)
    sbase, sexperts = build_example(tmp_path / "sharded", TINY, n_experts=2, shard_size=8_000)
    assert (sbase / "model.safetensors.index.json").is_file()
    merge(base, experts, tmp_path / "a", "task_arithmetic")
    merge(sbase, sexperts, tmp_path / "b", "task_arithmetic", shard_size="10KB")
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same(load_model(tmp_path / "b"), load_model(tmp_path / "a"), exact=True)


def test_mixed_input_dtypes(tmp_path):
    base, experts = build_example(tmp_path / "in", TINY, n_experts=2, dtype=torch.bfloat16)
    for e, dt in zip(experts, (torch.float16, torch.float32)):  # same weights, other storage dtypes
        sd = {k: v.to(dt) for k, v in load_file(e / "model.safetensors").items()}
        save_file(sd, e / "model.safetensors")
    merge(base, experts, tmp_path / "out", "average", dtype="float32")
    got, W0 = load_model(tmp_path / "out"), load_model(base)
    Ws = [load_model(e) for e in experts]
    for name in W0:
        want = W0[name].double() + sum(W[name].double() - W0[name].double() for W in Ws) / 2
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-7)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "float32"


def test_row_chunks_give_the_same_bytes(tiny, tmp_path, monkeypatch):
    base, experts = tiny
    merge(base, experts, tmp_path / "whole", "task_arithmetic")
    monkeypatch.setattr(stream, "CHUNK_ELEMS", 100)   # every 2-D tensor is split into many row ranges
    plan = make_plan(open_checkpoint(base), [open_checkpoint(e) for e in experts])
    pieces = stream.make_pieces(plan, REGISTRY["task_arithmetic"], REGISTRY["task_arithmetic"].Params())
    assert any(p.rows is not None for p in pieces)
    merge(base, experts, tmp_path / "chunked", "task_arithmetic")
    assert_same(load_model(tmp_path / "chunked"), load_model(tmp_path / "whole"), exact=True)


def test_tied_lm_head_is_written_as_the_merged_embedding(tmp_path):
    base, experts = build_example(tmp_path / "in", TINY, n_experts=2)
    for d in [base, *experts]:   # a checkpoint that stores a tied lm_head (config says tied)
        sd = load_file(d / "model.safetensors")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, d / "model.safetensors")
        cfg = json.loads((d / "config.json").read_text())
        cfg["tie_word_embeddings"] = True
        (d / "config.json").write_text(json.dumps(cfg))
    merge(base, experts, tmp_path / "out", "task_arithmetic")
    got = load_model(tmp_path / "out")
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert not torch.equal(got["model.embed_tokens.weight"], load_model(base)["model.embed_tokens.weight"])


def _gpt2(tmp_path: Path, n_experts: int = 2) -> tuple[Path, list[Path]]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    base = tmp_path / "gpt2-base"
    model.save_pretrained(base)
    experts = []
    for t in range(n_experts):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "wte" not in name and "wpe" not in name:  # low-rank task update
                    p.add_(0.01 * torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]))
                else:
                    p.add_(1e-3 * torch.randn_like(p))
        experts.append(tmp_path / f"gpt2-expert{t}")
        model.save_pretrained(experts[-1])
    return base, experts


def test_gpt2_conv1d_weights_are_merged_in_out_in_orientation(tmp_path):
    transformers = pytest.importorskip("transformers")
    base, experts = _gpt2(tmp_path)
    with open_checkpoint(base) as b:
        plan = make_plan(b, [open_checkpoint(e) for e in experts])
    infos = {i.name: i for i in plan.tensors}
    c_fc = infos["transformer.h.0.mlp.c_fc.weight"]
    assert c_fc.transposed and c_fc.cls == TensorClass.LIN and c_fc.shape == (128, 32)   # (out, in)
    assert infos["transformer.wte.weight"].cls == TensorClass.EMB
    method = "actmat" if "actmat" in REGISTRY else "average"
    merge(base, experts, tmp_path / "out", method)
    assert_same(load_model(tmp_path / "out"), in_memory_merge(base, experts, method), exact=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(10)[None]).logits).all()


def test_demo_command_runs_end_to_end(tmp_path):
    """The merge half of the demo; tests/test_export.py runs it on to ONNX."""
    proc = run_cli("demo", tmp_path / "demo", "--no-export", check=True)
    assert "merged model:" in proc.stdout and "transformers loaded it" in proc.stdout
    assert (tmp_path / "demo" / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "demo" / "onnx").exists()


def test_demo_directory_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("demo", tmp_path / "file" / "demo", "--no-export")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'file' / 'demo'}: ") and "Not a directory" in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_demo_directory_is_one_line(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        proc = run_cli("demo", tmp_path / "ro" / "demo", "--no-export")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Permission denied" in proc.stderr
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_methods_command_lists_every_method_with_defaults():
    proc = run_cli("methods", check=True)
    for name, cls in REGISTRY.items():
        assert proc.stdout.count(f"{name}") >= 1
    assert "scale=0.4" in proc.stdout


def test_merge_cli_prints_summary_and_quiet_prints_nothing(tiny, tmp_path):
    base, experts = tiny
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "o1", "--method", "average", check=True)
    assert "merged 3 experts" in proc.stdout and proc.stderr == ""
    proc = run_cli("merge", base, *experts, "-o", tmp_path / "o2", "--method", "average", "-q", check=True)
    assert proc.stdout == ""
    assert torch.equal(load_model(tmp_path / "o1")["lm_head.weight"], load_model(tmp_path / "o2")["lm_head.weight"])


def test_max_memory_refuses_before_writing_and_names_the_tensor(tiny, tmp_path):
    base, experts = tiny
    out = tmp_path / "out"
    proc = run_cli("merge", base, *experts, "-o", out, "--method", "actmat", "--max-memory", "10KB")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.splitlines()[0]
    assert line.startswith("error: ") and "more than --max-memory" in line and ".weight" in line, line
    assert not out.exists() or not any(out.glob("*.safetensors*"))
    run_cli("merge", base, *experts, "-o", tmp_path / "ok", "--method", "actmat", "--max-memory", "4GB", check=True)


def test_inspect_reports_the_plan_without_merging(tiny, tmp_path):
    base, experts = tiny
    proc = run_cli("inspect", base, *experts, "--json", check=True)
    data = json.loads(proc.stdout)
    assert set(data["methods"]) == set(REGISTRY)
    assert data["classes"]["LIN"]["count"] == 2 * 7 + 1 and data["classes"]["EMB"]["count"] == 1   # + lm_head
    assert data["methods"]["ties"]["reads"] == 3 and data["methods"]["average"]["reads"] == 1
    tensor_bytes = 0
    for d in [base, *experts]:
        with open_checkpoint(d) as ck:
            tensor_bytes += sum(e.nbytes for e in ck.entries.values())
    assert data["bytes_per_pass"] == tensor_bytes          # every tensor of every input, once
    text = run_cli("inspect", base, *experts, check=True).stdout
    assert "estimated peak memory" in text and "actmat" in text


def test_inspect_stops_on_the_same_input_errors_as_merge(tiny, tmp_path):
    base, experts = tiny
    sd = load_file(experts[0] / "model.safetensors")
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_file(sd, experts[0] / "model.safetensors")
    proc = run_cli("inspect", base, *experts)
    assert proc.returncode == 1 and "model.layers.0.mlp.up_proj.weight" in proc.stderr


def test_max_memory_shrinks_row_chunks_of_elementwise_rules_to_fit(tmp_path):
    """A 4M-element embedding: at the default chunking its buffers need ~150 MB; under --max-memory 20MB the run
    takes smaller row chunks and read-ahead, records them in the report, and writes the same bytes (average is
    elementwise and deterministic). The same budget refuses actmat, naming the LIN tensor it cannot chunk."""
    g = torch.Generator().manual_seed(0)
    names = {"embed_tokens.weight": (4096, 1024), "layers.0.mlp.weight": (1024, 1024)}
    paths = [tmp_path / f"m{t}.safetensors" for t in range(3)]
    for t, p in enumerate(paths):
        save_file({n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in names.items()}, p)
    run_cli("merge", *paths, "-o", tmp_path / "free", "--method", "average", "-q", check=True)
    run_cli("merge", *paths, "-o", tmp_path / "tight", "--method", "average", "-q", "--max-memory", "20MB",
            check=True)
    report = json.loads((tmp_path / "tight" / "lowmerge_report.json").read_text())
    assert report["strategy"]["chunk_elems"] < 1 << 22 and report["strategy"]["peak_buffer_bytes"] <= 20 * 10**6
    free = json.loads((tmp_path / "free" / "lowmerge_report.json").read_text())["strategy"]
    assert free["chunk_elems"] == 1 << 22 and free["peak_buffer_bytes"] > 20 * 10**6
    assert (tmp_path / "free" / "model.safetensors").read_bytes() == \
        (tmp_path / "tight" / "model.safetensors").read_bytes()
    proc = run_cli("merge", *paths, "-o", tmp_path / "no", "--method", "actmat", "--max-memory", "20MB")
    assert proc.returncode == 1 and "layers.0.mlp.weight" in proc.stderr and "even in row chunks" in proc.stderr


def test_tensors_too_large_for_the_device_budget_run_on_the_cpu(tiny):
    from lowmem_merge.budget import choose_strategy, device_bytes
    base, experts = tiny
    with open_checkpoint(base) as b, open_checkpoint(experts[0]) as e:
        plan = make_plan(b, [e])
        actmat = REGISTRY["actmat"]
        params = actmat.Params()
        pieces = choose_strategy(plan, actmat, params).pieces
        sizes = {p.info.name: device_bytes(plan, p, actmat, params) for p in pieces}
        limit = sorted(sizes.values())[len(sizes) // 2]
        strategy = choose_strategy(plan, actmat, params, device_budget=limit)
    assert strategy.cpu_tensors == {n for n, s in sizes.items() if s > limit} and strategy.cpu_tensors


@pytest.mark.gpu
def test_cuda_merge_with_a_small_device_budget_equals_the_cpu_fallback(tiny, tmp_path):
    base, experts = tiny
    run_cli("merge", base, *experts, "-o", tmp_path / "gpu", "--method", "actmat", "--device", "cuda", "-q",
            "--max-device-memory", "20KB", check=True)
    report = json.loads((tmp_path / "gpu" / "lowmerge_report.json").read_text())
    assert report["strategy"]["cpu_tensors"]
    run_cli("merge", base, *experts, "-o", tmp_path / "cpu", "--method", "actmat", "--device", "cpu", "-q", check=True)
    got, want = load_model(tmp_path / "gpu"), load_model(tmp_path / "cpu")
    for name in report["strategy"]["cpu_tensors"]:
        assert torch.equal(got[name], want[name]), name
