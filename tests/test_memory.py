"""The memory rule (DESIGN.md §3): peak RSS does not grow with depth or with the number of experts.

Each merge runs in its own `lowmerge merge` subprocess, which measures its own peak (VmHWM of its memory image) and
writes it to lowmerge_report.json. Neither the parent's RUSAGE_CHILDREN (the maximum over every child so far) nor the
child's ru_maxrss (which keeps the forking parent's size across exec) would measure the merge alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowmem_merge.demo import LlamaShape, build_example

from conftest import run_cli

WIDTH = dict(hidden=1024, intermediate=2816, vocab=32000, heads=16, kv_heads=16)
GIB = 2**30


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("memory")
    return {
        "small": build_example(root / "small", LlamaShape(layers=4, **WIDTH), n_experts=2, dtype=torch.bfloat16),
        "big": build_example(root / "big", LlamaShape(layers=12, **WIDTH), n_experts=6, dtype=torch.bfloat16),
    }


def peak_rss(example: tuple[Path, list[Path]], out: Path, method: str, *params: str) -> int:
    base, experts = example
    extra = [a for p in params for a in ("-p", p)]
    run_cli("merge", base, *experts, "-o", out, "--method", method, "--device", "cpu", "-q", *extra, check=True,
            timeout=900)
    return json.loads((out / "lowmerge_report.json").read_text())["memory"]["peak_rss_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("actmat", ()), ("average", ()), ("ties", ())])
def test_peak_rss_is_flat_in_depth_and_experts(examples, tmp_path, method, params):
    small = peak_rss(examples["small"], tmp_path / "small", method, *params)
    big = peak_rss(examples["big"], tmp_path / "big", method, *params)
    print(f"{method}: 4 layers x 2 experts {small / 2**20:.0f} MiB, 12 layers x 6 experts {big / 2**20:.0f} MiB")
    assert big <= 1.15 * small, (small, big)
    assert big < GIB, big
