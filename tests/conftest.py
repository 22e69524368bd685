"""Shared fixtures: tiny real checkpoints on disk and a real `lowmerge` subprocess."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
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

LOWMERGE = [sys.executable, "-m", "lowmem_merge"]   # the command every CLI test runs (run_cli, start_merge)
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


class _Zygote:
    """One tests/cli_zygote.py process: torch imported once, a fork per command (see its docstring)."""

    env = dict(os.environ)   # the session's environment, as the workers start (a monkeypatched one goes fresh)

    # variables that change under pytest after the zygotes start and that neither torch's nor the CLI's import reads:
    # the test's name, the path onnxruntime records when a test module imports it, the cache folder torch's
    # inductor records when a test's export first uses it, and the terminal width click reads as it prints help
    IGNORED = ("PYTEST_CURRENT_TEST", "ORT_LIB_PATH", "TORCHINDUCTOR_CACHE_DIR", "COLUMNS")

    @staticmethod
    def same_env(env: dict) -> bool:
        """Whether ``env`` is the zygotes' but for IGNORED (a child is given ``env`` itself)."""
        def kept(e: dict) -> dict:
            return {k: v for k, v in e.items() if k not in _Zygote.IGNORED}
        return kept(env) == kept(_Zygote.env)

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env)

    def run(self, args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="lowmerge-cli-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            req = {"args": args, "env": env, "cwd": os.getcwd(), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            stdout, stderr = out.read_text(), err.read_text()
        cmd = [*LOWMERGE, *args]
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
        return subprocess.CompletedProcess(cmd, reply["rc"], stdout, stderr)


_idle: list[_Zygote] = []          # zygotes not running a command (run_cli_many's threads take one each)
_idle_lock = threading.Lock()


def run_cli(*args: str | Path, check: bool = False, env: dict | None = None, timeout: float = 300,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m lowmem_merge ARGS` in a real subprocess and capture its output.

    The process is a fork of a ``_Zygote`` that has imported torch (a tiny run is mostly that import), unless
    ``fresh`` (memory measurements: a new interpreter, nothing inherited) or the environment differs from the one the
    zygotes started with (``env``, a monkeypatched variable): then a new ``python -m lowmem_merge``."""
    full_env = {**os.environ, **(env or {})}
    if fresh or not _Zygote.same_env(full_env):
        proc = subprocess.run([*LOWMERGE, *map(str, args)], capture_output=True,
                              text=True, env=full_env, timeout=timeout)
    else:
        with _idle_lock:
            zygote = _idle.pop() if _idle else None
        if zygote is None or zygote.proc.poll() is not None:
            zygote = _Zygote()
        proc = zygote.run(list(map(str, args)), full_env, timeout)
        with _idle_lock:
            _idle.append(zygote)
    if check and proc.returncode != 0:
        raise AssertionError(f"lowmerge {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli_many(*commands: list[str | Path], check: bool = False) -> list[subprocess.CompletedProcess]:
    """``run_cli`` for independent commands, as many at a time as there are cores; results in the order given."""
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
    cmd = [*LOWMERGE, "merge", "in/base", *experts, "-o", out, *args]

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                            preexec_fn=small_files if limit else None)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


_HELD = """
import sys, torch
torch.set_num_threads(1)
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
n = int(sys.argv[1])
{setup}
base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")   # VmHWM := VmRSS now
{step}
print(status("VmHWM") - base)
"""

needs_clear_refs = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                      reason="needs Linux's /proc/self/clear_refs")


def bytes_held(setup: str, step: str, n: int) -> int:
    """Peak RSS that ``step`` adds beside what ``setup`` built (both Python source run with ``n`` bound), in a fresh
    one-thread interpreter: the high-water mark is reset to the resident size just before ``step``
    (/proc/self/clear_refs; tests using this carry ``needs_clear_refs``)."""
    script = _HELD.format(setup=setup.strip(), step=step.strip())
    proc = subprocess.run([sys.executable, "-c", script, str(n)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


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
