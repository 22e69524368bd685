"""Shared fixtures: tiny real checkpoints on disk and a real `lowmerge` subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem_merge.demo import LlamaShape, build_example

TINY = LlamaShape(hidden=32, intermediate=48, layers=2, vocab=64, heads=4, kv_heads=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A 2-layer Llama-shaped base and 3 bf16 experts as Hugging Face directories."""
    return build_example(tmp_path / "in", TINY, n_experts=3)


def run_cli(*args: str | Path, check: bool = False, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m lowmem_merge ARGS` in a real subprocess and capture its output."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "lowmem_merge", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lowmerge {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
