"""Shared fixtures: tiny real checkpoints on disk and a real `lowmerge` subprocess."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def run_cli_many(*commands: list[str | Path], check: bool = False) -> list[subprocess.CompletedProcess]:
    """``run_cli`` for independent commands, as many at a time as there are cores (each start is mostly torch's
    import, single-threaded); results in the order given."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda args: run_cli(*args, check=check), commands))


def merge_configs(root: Path, configs: dict[str, Path], prefix: str = "out") -> dict[str, Path]:
    """Each recipe merged through the CLI on the CPU (``run_cli_many``): key -> its output directory."""
    outs = {key: root / f"{prefix}-{key}" for key in configs}
    run_cli_many(*(["merge", "--config", configs[key], "-o", out, "-q", "--device", "cpu"] for key, out in outs.items()),
                 check=True)
    return outs


def start_merge(root: Path, out: str, *args: str, limit: int | None = None) -> subprocess.Popen:
    """Start `lowmerge merge in/base in/expert* -o OUT ARGS` in ``root`` (relative paths, so a copy of ``root``
    resumes). ``limit``: RLIMIT_FSIZE in bytes, so that writing a larger file fails with EFBIG."""
    experts = sorted(str(p.relative_to(root)) for p in (root / "in").glob("expert*"))
    cmd = [sys.executable, "-m", "lowmem_merge", "merge", "in/base", *experts, "-o", out, *args]

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                            preexec_fn=small_files if limit else None)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
