"""Shared fixtures: tiny real checkpoints on disk and a real `lowmerge` subprocess."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Each pytest worker and the `lowmerge` subprocesses it starts get an equal share of the cores (`make test` runs two
# workers on two cores). With torch's default of one thread per core, two workers' products oversubscribe the cores
# and OpenMP threads wait on each other (the likely reason a split of the memory tests ran 757 s against 630 s). Set
# before torch is imported, and inherited by every child; an OMP_NUM_THREADS given by the caller is kept.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402

from lowmem_merge.demo import LlamaShape, build_example, write_header_only

TINY = LlamaShape(hidden=32, intermediate=48, layers=2, vocab=64, heads=4, kv_heads=2)


# The files that take longest, longest first. `make test` hands whole files to its two workers in collection order
# (--dist loadfile --no-loadscope-reorder), so these start at once and the short files fill the other worker around
# them; ordered by test count instead (xdist's default), the memory tests started last and ran alone at the end.
LONGEST_FIRST = ("test_memory.py", "test_export_genai.py", "test_errors.py", "test_resume.py",
                 "test_export_memory.py", "test_moe_build.py", "test_calibrated.py", "test_export.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
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


SEVENTY_B = LlamaShape(hidden=8192, intermediate=28672, layers=1, vocab=128256, heads=64, kv_heads=8)


def plan_70b(root: Path, rule: str, n_experts: int = 8) -> dict[str, int]:
    """inspect's bytes per tensor kind (``down_proj``, ``lm_head.weight``, ...: the largest piece of each, runtime
    included) for ``rule`` with its default parameters on a header-only 70B model (one layer: every layer plans
    alike) with base + ``n_experts`` (issue 17 §3)."""
    import contextlib

    from lowmem_merge.budget import RUNTIME_BYTES, piece_bytes
    from lowmem_merge.io.checkpoint import open_checkpoint
    from lowmem_merge.methods import REGISTRY
    from lowmem_merge.plan import make_plan
    from lowmem_merge.stream import make_pieces
    if not (root / "base").is_dir():
        write_header_only(root, SEVENTY_B, n_experts)
    cls, need = REGISTRY[rule], {}
    with contextlib.ExitStack() as stack:
        plan = make_plan(stack.enter_context(open_checkpoint(root / "base")),
                         [stack.enter_context(open_checkpoint(root / f"expert{t}")) for t in range(n_experts)])
        for p in make_pieces(plan, cls, cls.Params()):
            kind = p.info.name.split(".")[-2] if ".layers." in p.info.name else p.info.name
            need[kind] = max(need.get(kind, 0), piece_bytes(plan, p, cls, cls.Params()) + RUNTIME_BYTES)
    return need
