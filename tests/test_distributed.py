"""torchrun: the same merge split over 2 and 3 CPU processes (gloo), real `torch.distributed.run` subprocesses.

Every tensor must be byte-identical to a single-process merge; a failing rank stops every rank, names itself and the
tensor, and leaves no file with a final name; --resume per rank keeps the shards that ranks finished.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowmem_merge.demo import LlamaShape, build_example
from lowmem_merge.io.reader import INDEX_NAME
from lowmem_merge.io.writer import MANIFEST_NAME
from lowmem_merge.report import REPORT_NAME

SHAPE = LlamaShape(hidden=64, intermediate=96, layers=3, vocab=128, heads=4, kv_heads=2)
SHARD = "60KB"                                     # several shards per rank
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}      # torchrun's default per process; the single run gets the same


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, out: str, *args: str, procs: int = 0, limit: int | None = None) -> subprocess.CompletedProcess:
    """`lowmerge merge` on root/in, in one process (procs=0) or under torchrun with ``procs`` processes."""
    experts = sorted(str(p.relative_to(root)) for p in (root / "in").glob("expert*"))
    merge = ["-m", "lowmem_merge", "merge", "in/base", *experts, "-o", out, "--device", "cpu", "-q",
             "--shard-size", SHARD, *args]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
              "--master-port", str(free_port())] if procs else []

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**ENV, "TMPDIR": str(root)} if procs else ENV   # torchrun's torchelastic_* log folders go there, not /tmp
    return subprocess.run([sys.executable, *launch, *merge], cwd=root, capture_output=True, text=True, env=env,
                          timeout=300, preexec_fn=small_files if limit else None)


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_bytes(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].view(-1).view(torch.uint8),
                                                          tb[k].view(-1).view(torch.uint8)), k


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("dist")
    build_example(r / "in", SHAPE, n_experts=3)
    return r


# 3 ranks with ties repeats what (2, ties) checks of the histograms' all_reduce and what (3, task_arithmetic) checks of
# an uneven split: `make test-slow`
@pytest.mark.parametrize("procs,method", [(2, "ties"), pytest.param(3, "ties", marks=pytest.mark.slow), (2, "actmat"),
                                          (3, "task_arithmetic")])
def test_ranks_write_the_single_process_bytes(root: Path, procs: int, method: str) -> None:
    """ties' default global trim sums the ranks' histograms (all_reduce) before its thresholds; actmat solves per
    tensor; the index, report and a transformers load all see one model."""
    single, split = f"single-{method}", f"split-{method}-{procs}"
    if not (root / single).is_dir():
        assert run(root, single, "--method", method).returncode == 0
    proc = run(root, split, "--method", method, procs=procs)
    assert proc.returncode == 0, proc.stderr
    out = root / split
    assert_same_bytes(root / single, out)
    report = json.loads((out / REPORT_NAME).read_text())
    ranks = report["distributed"]["ranks"]
    assert [r["rank"] for r in ranks] == list(range(procs)) and all(r["tensors"] > 0 for r in ranks)
    assert sum(r["tensors"] for r in ranks) == report["output"]["tensors"]
    assert all(r["peak_rss_bytes"] > 0 for r in ranks)
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert sorted(set(index.values())) == sorted(report["output"]["shards"])
    assert not list(out.glob(".lowmerge-rank*")) and not (out / MANIFEST_NAME).exists()
    if method == "ties" and procs == 2:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(out)
        logits = model(torch.tensor([[1, 2, 3]])).logits
        assert torch.isfinite(logits).all()


def test_a_failing_rank_stops_every_rank_and_names_itself(tmp_path: Path) -> None:
    build_example(tmp_path / "in", SHAPE, n_experts=3)
    f = next((tmp_path / "in" / "expert1").glob("*.safetensors"))
    state = load_file(f)
    bad = "model.layers.1.mlp.down_proj.weight"
    state[bad][0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    proc = run(tmp_path, "out", "--method", "average", procs=2)
    assert proc.returncode != 0
    assert "rank" in proc.stderr and bad in proc.stderr and "NaN" in proc.stderr, proc.stderr
    out = tmp_path / "out"
    finals = [p.name for p in out.iterdir() if p.name.endswith(".safetensors") or p.name in (INDEX_NAME, REPORT_NAME)]
    assert finals == [], finals


def test_resume_keeps_each_ranks_finished_shards(root: Path, tmp_path: Path) -> None:
    """A file-size limit stops the rank that writes the largest shard; the other finishes. --resume without the
    limit keeps what was finished and ends with the single-process bytes."""
    single = root / "single-task_arithmetic"
    if not single.is_dir():
        assert run(root, single.name, "--method", "task_arithmetic").returncode == 0
    work = tmp_path / "w"
    work.mkdir()
    (work / "in").symlink_to(root / "in")
    assert run(work, "full", "--method", "task_arithmetic", procs=2).returncode == 0     # its shard layout
    sizes = sorted(p.stat().st_size for p in (work / "full").glob("*.safetensors"))
    assert sizes[-1] > sizes[-2]                        # exactly one shard, on one rank, hits the limit
    stopped = run(work, "out", "--method", "task_arithmetic", procs=2, limit=sizes[-1] - 1)
    assert stopped.returncode != 0 and "file size limit" in stopped.stderr, stopped.stderr
    assert not (work / "out" / REPORT_NAME).exists() and not (work / "out" / INDEX_NAME).exists()
    resumed = run(work, "out", "--method", "task_arithmetic", "--resume", procs=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_bytes(single, work / "out")
    report = json.loads((work / "out" / REPORT_NAME).read_text())
    assert report["output"]["resumed_shards"], "no rank kept a finished shard"
