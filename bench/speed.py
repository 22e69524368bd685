"""How close is a merge to the time it takes just to read its inputs once and write its output once?

One run, on the same files: build (or reuse, under bench/_work/) a synthetic Llama-shaped base and experts; measure
the I/O floor (read every input file once, write the output's number of bytes once with fsync) in a fresh
subprocess, cold and warm; run each method's merge in a fresh subprocess, cold and warm; measure the fp32 matmul rate
and, for the covariance rules, the FLOP time of their Grams and solves. Prints one table and appends it to
bench/RESULTS.md.

Run (on a quiet machine):
    python bench/speed.py
Before and after in one run (the same files, floor and matmul rate; each method merged by both trees in turn):
    git worktree add /tmp/before main && python bench/speed.py --methods tsv,iso_c,iso_cts --baseline /tmp/before
Tiny check (well under a minute; keep it out of RESULTS.md):
    python bench/speed.py --hidden 256 --intermediate 688 --layers 2 --vocab 4096 --heads 4 --kv-heads 4 \
        --experts 2 --results /tmp/scratch.md

Cold means: every input file is fsync'd, then dropped from the page cache with
posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) (no root needed); the fraction still resident is checked with mincore
and printed. Warm means: every input file was read once just before.

Only the standard library at module level: the floor subprocess runs this file and must not pay for torch's import.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "_work"
BUFFER_BYTES = 8 << 20          # the floor's reused read/write buffer
FLOOR_CHILD = "_floor"          # argv[1] that makes this file run the floor measurement
DEFAULT_METHODS = "average,task_arithmetic,dare,ties:trim=global,ties:trim=tensor,actmat,wudi_cfs"
ELEMENTWISE_TARGET, GLOBAL_TIES_TARGET, COVARIANCE_TARGET, SPECTRAL_TARGET = 1.2, 2.2, 1.3, 3.0
SPECTRAL = ("tsv", "iso_c", "iso_cts")  # rules with a FLOP model in spectral_flops
EIGH_FLOPS = 9                          # × r³: one symmetric eigendecomposition with vectors
IMPORT_REPEAT, MATMUL_REPEAT = 3, 5


# ---------------------------------------------------------------------------------------------------- method specs

@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return self.name + "".join(f" {k}={v}" for k, v in self.params)

    def cli_args(self) -> list[str]:
        out = ["--method", self.name]
        for k, v in self.params:
            out += ["-p", f"{k}={v}"]
        return out


@dataclass(frozen=True)
class Target:
    kind: str       # "elementwise", "global TIES", "covariance" or "spectral"
    limit: float

    @property
    def text(self) -> str:
        against = "max(cold floor, FLOP time)" if self.kind in ("covariance", "spectral") else "cold floor"
        return f"≤ {self.limit}× {against} ({self.kind})"


def parse_methods(text: str) -> tuple[list[MethodSpec], list[str]]:
    """``NAME[:KEY=VALUE[:KEY=VALUE]]`` items, comma separated; returns those in REGISTRY and the names skipped."""
    from lowmem_merge.methods import REGISTRY
    specs, skipped = [], []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, *pairs = item.split(":")
        if name not in REGISTRY:
            skipped.append(item)
            continue
        params = tuple(tuple(p.split("=", 1)) for p in pairs)
        if any(len(p) != 2 for p in params):
            raise SystemExit(f"error: --methods item {item!r}: parameters are KEY=VALUE, e.g. ties:trim=tensor")
        specs.append(MethodSpec(name, params))  # type: ignore[arg-type]
    return specs, skipped


def target_of(spec: MethodSpec) -> Target | None:
    from lowmem_merge.methods import REGISTRY, parse_params
    from lowmem_merge.methods.covariance import CovarianceMethod
    from lowmem_merge.methods.matrix_rule import MatrixRule
    cls = REGISTRY[spec.name]
    parsed = parse_params(cls, dict(spec.params))
    if issubclass(cls, CovarianceMethod):
        return Target("covariance", COVARIANCE_TARGET)
    if spec.name in SPECTRAL:
        return Target("spectral", SPECTRAL_TARGET)
    if issubclass(cls, MatrixRule):  # SVD or iterative rules: no target, the ratio is what there is to know
        return None
    if spec.name == "ties" and cls.uses_prepass(parsed):
        return Target("global TIES", GLOBAL_TIES_TARGET)
    if cls.passes == 1 and not cls.uses_prepass(parsed):
        return Target("elementwise", ELEMENTWISE_TARGET)
    return None


# ---------------------------------------------------------------------------------------------------- the example

def example_root(args: argparse.Namespace) -> Path:
    key = (f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-a{args.heads}-kv{args.kv_heads}"
           f"-e{args.experts}-{args.dtype}-s{args.seed}")
    return WORK / f"example-{key}"


def ensure_example(args: argparse.Namespace) -> tuple[Path, list[Path], bool]:
    """The base and expert directories, built once per shape; returns (base, experts, built now)."""
    root = example_root(args)
    marker = root / "complete.json"
    base, experts = root / "base", [root / f"expert{t}" for t in range(args.experts)]
    if marker.is_file() and not args.rebuild:
        return base, experts, False
    import torch
    from lowmem_merge.demo import LlamaShape, build_example
    shutil.rmtree(root, ignore_errors=True)
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=args.heads, kv_heads=args.kv_heads)
    base, experts = build_example(root, shape, args.experts, getattr(torch, args.dtype), args.seed)
    for path in input_files(base, experts):
        sync_file(path)
    marker.write_text(json.dumps({"built": now().isoformat()}) + "\n")
    return base, experts, True


def input_files(base: Path, experts: Sequence[Path]) -> list[Path]:
    """Every weight file the merge reads (headers and tensors), base first."""
    from lowmem_merge.io.checkpoint import open_checkpoint
    files: list[Path] = []
    for model in [base, *experts]:
        with open_checkpoint(model) as ck:
            files += [Path(f.path) for f in ck.files]
    return files


# ---------------------------------------------------------------------------------------------------- page cache

def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(paths: Sequence[Path]) -> None:
    """Cold: fsync (dirty pages are not dropped), then POSIX_FADV_DONTNEED on the whole file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths: Sequence[Path]) -> None:
    """Warm: read every file once, so the page cache holds it."""
    read_all(paths, bytearray(BUFFER_BYTES))


def resident_fraction(paths: Sequence[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore on a mapping that is never touched); None if unknown."""
    libname = ctypes.util.find_library("c")
    if not sys.platform.startswith("linux") or not libname:
        return None
    libc = ctypes.CDLL(libname, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            vec = (ctypes.c_ubyte * pages)()
            ok = libc.mincore(addr, size, vec) == 0
            libc.munmap(addr, size)
        finally:
            os.close(fd)
        if not ok:
            return None
        resident += sum(b & 1 for b in vec)
        total += pages
    return resident / total if total else None


# ---------------------------------------------------------------------------------------------------- I/O floor

def read_all(paths: Sequence[str | Path], buf: bytearray) -> int:
    """Read every byte of every file sequentially into ``buf`` (reused); returns the bytes read."""
    view, done = memoryview(buf), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                done += n
    return done


def write_bytes(path: str | Path, nbytes: int, buf: bytearray) -> None:
    """Write ``nbytes`` from ``buf`` (repeated) to a new file and fsync it, as the merge's shard writer does."""
    view = memoryview(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, view[:min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)


def floor_child(request: str) -> None:
    """Runs in the fresh subprocess: time one read of the inputs and one write of the output; print JSON."""
    req = json.loads(request)
    buf = bytearray(os.urandom(BUFFER_BYTES))
    t0 = time.perf_counter()
    n_read = read_all(req["inputs"], buf)
    t1 = time.perf_counter()
    write_bytes(req["out"], req["out_bytes"], buf)
    t2 = time.perf_counter()
    os.unlink(req["out"])
    print(json.dumps({"read_s": t1 - t0, "write_s": t2 - t1, "bytes_read": n_read}))


@dataclass
class Floor:
    read_s: float
    write_s: float
    wall_s: float
    resident: float | None

    @property
    def total_s(self) -> float:
        return self.read_s + self.write_s


def measure_floor(inputs: Sequence[Path], out_bytes: int, cold: bool) -> Floor:
    prepare_cache(inputs, cold)
    resident = resident_fraction(inputs)
    request = json.dumps({"inputs": [str(p) for p in inputs], "out": str(WORK / "floor-output.bin"),
                          "out_bytes": out_bytes})
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), FLOOR_CHILD, request], cwd=REPO,
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    result = json.loads(done.stdout)
    return Floor(result["read_s"], result["write_s"], wall, resident)


def prepare_cache(inputs: Sequence[Path], cold: bool) -> None:
    drop_cache(inputs) if cold else warm_cache(inputs)


# ---------------------------------------------------------------------------------------------------- merges

@dataclass
class MergeRun:
    wall_s: float
    total_s: float
    peak_rss: int
    bytes_read: int
    eigh_solves: int
    resident: float | None


def merge_command(spec: MethodSpec, base: Path, experts: Sequence[Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "lowmem_merge", "merge", str(base), *map(str, experts), "-o", str(out),
            *spec.cli_args(), "--device", "cpu", "-q"]


def run_merge(spec: MethodSpec, base: Path, experts: Sequence[Path], inputs: Sequence[Path], cold: bool,
              tree: Path = REPO) -> MergeRun:
    """One merge in a fresh subprocess, with lowmem_merge imported from ``tree`` (this checkout, or --baseline)."""
    out = WORK / f"out-{spec.label.replace(' ', '_').replace('=', '-')}-{'cold' if cold else 'warm'}"
    shutil.rmtree(out, ignore_errors=True)
    prepare_cache(inputs, cold)
    resident = resident_fraction(inputs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    done = subprocess.run(merge_command(spec, base, experts, out), cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        if done.returncode != 0:
            raise SystemExit(f"error: merge with {spec.label} failed (exit {done.returncode}):\n{done.stderr}")
        report = json.loads((out / "lowmerge_report.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    eigh = sum(int(s.get("eigh", 0)) for s in report.get("tensor_stats", {}).values())
    return MergeRun(wall, report["timings_s"]["total"], report["memory"]["peak_rss_bytes"], report["bytes_read"],
                    eigh, resident)


def import_time(repeat: int) -> float:
    """Wall time of a fresh interpreter that only imports the CLI and torch (best of ``repeat``, after one warm-up)."""
    cmd = [sys.executable, "-c", "import lowmem_merge.cli, torch"]
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def best_of(repeat: int, measure: Callable[[], MergeRun | Floor]) -> MergeRun | Floor:
    runs = [measure() for _ in range(repeat)]
    return min(runs, key=lambda r: r.wall_s)


# ---------------------------------------------------------------------------------------------------- FLOPs

def matmul_rates(repeat: int = MATMUL_REPEAT, dtype: str = "float32") -> dict[str, float]:
    """FLOP/s of torch matmuls of the shapes a covariance rule runs (best of ``repeat`` after a warm-up), in fp32
    (the targets' FLOP time) or fp64 (what the covariance rules' products run in since issue 17 §1)."""
    import torch
    g = torch.Generator().manual_seed(0)
    sq = torch.randn(2048, 2048, generator=g, dtype=getattr(torch, dtype))
    tall = torch.randn(4096, 1024, generator=g, dtype=getattr(torch, dtype))
    gram = torch.randn(1024, 1024, generator=g, dtype=getattr(torch, dtype))
    cases: dict[str, tuple[Callable[[], object], float]] = {
        "2048×2048 @ 2048×2048": (lambda: sq @ sq, 2 * 2048 ** 3),
        "(4096×1024)ᵀ @ 4096×1024": (lambda: tall.T @ tall, 2 * 4096 * 1024 ** 2),
        "4096×1024 @ 1024×1024": (lambda: tall @ gram, 2 * 4096 * 1024 ** 2),
    }
    rates = {}
    for label, (fn, flops) in cases.items():
        fn()
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates[label] = flops / best
    return rates


def covariance_flops(base: Path, experts: Sequence[Path]) -> tuple[float, int]:
    """FLOPs of the §1 kernel over every LIN matrix, and the number of LIN tensors.

    Per expert: Gram m·n² (a symmetric product: its lower triangle, as BLAS's syrk and methods/gram.py compute it)
    plus N = min(2·m·n², 3·m²·n) (Δ·(ΔᵀΔ), or the symmetric ΔΔᵀ and (ΔΔᵀ)·Δ); per matrix: solve ≈ n³/3 (Cholesky)
    + 2·m·n² (two triangular solves with m right-hand sides). Counted 2·m·n² for the Gram before 2026-12-07.
    """
    from lowmem_merge.info import TensorClass
    from lowmem_merge.io.checkpoint import open_checkpoint
    from lowmem_merge.plan import make_plan
    cks = [open_checkpoint(p) for p in [base, *experts]]
    try:
        plan = make_plan(cks[0], cks[1:])
        lin = [i for i in plan.tensors if i.cls == TensorClass.LIN]
    finally:
        for ck in cks:
            ck.close()
    total = 0.0
    for info in lin:
        *lead, m, n = info.shape
        per_expert = m * n * n + min(2 * m * n * n, 3 * m * m * n)
        solve = n ** 3 / 3 + 2 * m * n * n
        total += math.prod(lead) * (len(experts) * per_expert + solve)
    return total, len(lin)


def lin_shapes(base: Path, experts: Sequence[Path]) -> list[tuple[int, int, int]]:
    """(batch, m, n) of every LIN tensor of the plan."""
    from lowmem_merge.info import TensorClass
    from lowmem_merge.io.checkpoint import open_checkpoint
    from lowmem_merge.plan import make_plan
    cks = [open_checkpoint(p) for p in [base, *experts]]
    try:
        plan = make_plan(cks[0], cks[1:])
        return [(math.prod(i.shape[:-2]), *i.shape[-2:]) for i in plan.tensors if i.cls == TensorClass.LIN]
    finally:
        for ck in cks:
            ck.close()


def spectral_flops(spec: MethodSpec, shapes: Sequence[tuple[int, int, int]], n_experts: int) -> float:
    """FLOPs of TSV-M, Iso-C or Iso-CTS over every LIN matrix: the Gram products and one factorization per matrix.

    Per (m, n) matrix, r = min(m, n), M = max(m, n), T experts; a product of an a×b by a b×c matrix counts 2abc, a
    Gram xᵀx of an a×b matrix ab² (symmetric: its lower triangle, methods/gram.py; 2ab² before 2026-12-07); the one
    factorization is a symmetric eigendecomposition of an r×r Gram with its vectors, 9r³ (Golub and Van Loan's count
    for the symmetric QR algorithm), what an SVD or a polar factor of the Gram route costs. The rules take more (tsv T
    + 2 eighs per matrix, iso_cts T + 3, T of them (m − k_c)-sized where m ≤ n, iso_c 1); the ratio shows what the
    others cost.
    - tsv: per expert, the Gram of Δt and its other factor Mr² + 2Mrk (k = ⌊r/T⌋); the polar factors of Ū (m×r) and
      V̄ (r×n), a Gram and a product each, 3mr² + 3nr²; Δ* = Û·diag(s̄)·V̂, 2mrn.
    - iso_c: the Gram of S = ΣΔt and the polar factor's product, 3Mr².
    - iso_cts: S's Gram and the common factor, Mr² + 2Mr·k_c; per expert the residual's projection and SVD:
      where m ≤ n (the projection onto Q, the complement of U_c, q = m − k_c) 2qmn + nq² + 2qnp + 2mqp, else
      4mnk_c + mn² + 2mnp; the two polar factors and Δ*, as tsv's.
    """
    from lowmem_merge.methods import REGISTRY, parse_params
    from lowmem_merge.methods.iso_cts import subspace_sizes
    params = parse_params(REGISTRY[spec.name], dict(spec.params))
    total = 0.0
    for batch, m, n in shapes:
        r, big, t = min(m, n), max(m, n), n_experts
        polars = 3 * m * r * r + 3 * n * r * r + 2 * m * r * n
        if spec.name == "tsv":
            flops = t * (big * r * r + 2 * big * r * (r // t)) + polars
        elif spec.name == "iso_c":
            flops = 3 * big * r * r
        else:
            kc, p = subspace_sizes(r, t, params.common_fraction)
            q = m - kc
            residual = (2 * q * m * n + n * q * q + 2 * q * n * p + 2 * m * q * p if m <= n
                        else 4 * m * n * kc + m * n * n + 2 * m * n * p)
            flops = big * r * r + 2 * big * r * kc + t * residual + polars
        total += batch * (flops + EIGH_FLOPS * r ** 3)
    return total


# ---------------------------------------------------------------------------------------------------- machine

def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def git_commit(repo: Path = REPO) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *a], cwd=repo, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain").strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> str:
    """Type and device of the mount holding ``path`` (longest matching mount point in /proc/mounts)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    target = str(path.resolve())
    best = max((m for m in mounts if target == m[1] or target.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} ({best[0]})" if best else "unknown"


def machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    ram = ram_bytes()
    return (f"{cpu_model()}, {os.cpu_count()} cores, RAM {fmt_bytes(ram) if ram else 'unknown'}, GPU {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}; "
            f"bench/_work on {filesystem_of(WORK)}")


# ---------------------------------------------------------------------------------------------------- output

def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def fmt_pct(x: float | None) -> str:
    return "not checked" if x is None else f"{100 * x:.1f} %"


@dataclass
class MethodResult:
    spec: MethodSpec
    cold: MergeRun
    warm: MergeRun
    target: Target | None
    flop_s: float | None = None
    tree: str = ""          # "" for this checkout, else the --baseline tree's name and commit


@dataclass
class Run:
    command: str
    shape: str
    input_bytes: int
    n_inputs: int
    out_bytes: int
    floors: dict[str, Floor]
    import_s: float
    rates: dict[str, float]
    rates64: dict[str, float]
    flops: float
    n_lin: int
    results: list[MethodResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def ratios(r: MethodResult, run: Run) -> tuple[float, float, float | None]:
    """(cold, warm, covariance) ratios of the merge's time net of interpreter start and imports."""
    cold = (r.cold.wall_s - run.import_s) / run.floors["cold"].total_s
    warm = (r.warm.wall_s - run.import_s) / run.floors["warm"].total_s
    cov = None if r.flop_s is None else (r.cold.wall_s - run.import_s) / max(run.floors["cold"].total_s, r.flop_s)
    return cold, warm, cov


def verdict(r: MethodResult, run: Run) -> str:
    if r.target is None:
        return "—"
    cold, _, cov = ratios(r, run)
    value = cov if r.target.kind in ("covariance", "spectral") else cold
    return "met" if value is not None and value <= r.target.limit else "not met"


def table(run: Run) -> list[str]:
    head = ["method", "reads ÷ inputs", "wall cold s", "wall warm s", "report total cold / warm s",
            "÷ cold floor", "÷ warm floor", "FLOP time s", "÷ max(cold floor, FLOP)", "target", "met",
            "peak RSS cold / warm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in run.results:
        cold, warm, cov = ratios(r, run)
        name = f"`{r.spec.label}`" + (f" ({r.tree})" if r.tree else "")
        row = [name, f"{r.cold.bytes_read / run.input_bytes:.2f}", fmt_s(r.cold.wall_s),
               fmt_s(r.warm.wall_s), f"{fmt_s(r.cold.total_s)} / {fmt_s(r.warm.total_s)}", f"{cold:.2f}×",
               f"{warm:.2f}×", "—" if r.flop_s is None else fmt_s(r.flop_s), "—" if cov is None else f"{cov:.2f}×",
               r.target.text if r.target else "—", verdict(r, run),
               f"{fmt_bytes(r.cold.peak_rss)} / {fmt_bytes(r.warm.peak_rss)}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(run: Run, when: datetime.datetime, commit: str, machine_line: str) -> str:
    cold, warm = run.floors["cold"], run.floors["warm"]
    best_rate = max(run.rates.values())
    rates = "; ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in run.rates.items())
    eigh = [f"`{r.spec.label}` {r.cold.eigh_solves}" for r in run.results
            if r.target is not None and r.target.kind == "covariance"]
    spectral = [f"`{r.spec.label}` {r.flop_s * best_rate:.3e}" for r in run.results
                if r.target is not None and r.target.kind == "spectral" and not r.tree.startswith("baseline")]
    residents = ", ".join(f"`{r.spec.label}` {fmt_pct(r.cold.resident)}" for r in run.results)
    lines = [
        f"## speed — {when:%Y-%m-%d %H:%M} UTC — {commit}",
        "",
        "Question: how close is a merge to the time it takes just to read its inputs once and write its output once?",
        "",
        f"- machine: {machine_line}",
        f"- command: `{run.command}`",
        f"- model: {run.shape}; inputs: {run.n_inputs} files, {fmt_bytes(run.input_bytes)} "
        f"({run.input_bytes} B); output: {fmt_bytes(run.out_bytes)} (the base's weight bytes)",
        "- cold: each input file fsync'd, then dropped from the page cache with "
        "`os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)` (no root) just before the measurement; "
        f"resident after the drop (mincore): floor {fmt_pct(cold.resident)}, merges {residents}. "
        f"warm: every input file read once just before; resident: floor {fmt_pct(warm.resident)}.",
        f"- I/O floor (fresh subprocess, stdlib only; sequential `readinto` of every input file into a reused "
        f"{BUFFER_BYTES >> 20} MiB buffer, then one write of the output's bytes to bench/_work + fsync): "
        f"cold {fmt_s(cold.total_s)} s (read {fmt_s(cold.read_s)}, write {fmt_s(cold.write_s)}), "
        f"warm {fmt_s(warm.total_s)} s (read {fmt_s(warm.read_s)}, write {fmt_s(warm.write_s)})",
        "- merges: `python -m lowmem_merge merge BASE EXPERT... -o bench/_work/out-... --method M [-p K=V] "
        "--device cpu -q` in a fresh subprocess; wall includes interpreter start and imports; output deleted after",
        f"- interpreter start + `import lowmem_merge.cli, torch`: {fmt_s(run.import_s)} s "
        f"(best of {IMPORT_REPEAT}); "
        "every ratio below is (wall − this) ÷ the floor named",
        f"- fp32 matmul (torch, best of {MATMUL_REPEAT}): {rates}; "
        f"FLOP time = FLOPs ÷ the best, {best_rate / 1e9:.1f} GFLOP/s",
        f"- covariance FLOPs: {run.flops:.3e} over {run.n_lin} LIN tensors (per expert: symmetric Gram mn² + "
        "N min(2mn², 3m²n); per tensor: solve n³/3 + 2mn²; counts Cholesky solves)"
        + (f"; eigh solves taken (cold run): {', '.join(eigh)}" if eigh else ""),
    ]
    best64 = max(run.rates64.values())

    def at_fp64(kind: str) -> str:
        """Each ``kind`` result's cold wall less imports ÷ max(cold floor, its FLOPs at the fp64 rate)."""
        return ", ".join(f"`{r.spec.label}`{f' ({r.tree})' if r.tree else ''} "
                         f"{(r.cold.wall_s - run.import_s) / max(cold.total_s, r.flop_s * best_rate / best64):.2f}×"
                         for r in run.results if r.target is not None and r.target.kind == kind)

    if eigh:    # one entry per covariance result
        lines.append(f"- fp64 matmul, same shapes: best {best64 / 1e9:.1f} GFLOP/s ({best_rate / best64:.2f}× slower "
                     f"than fp32). The covariance rules take their Grams, N and solve in fp64 (issue 17 §1's "
                     f"exactness), so their own arithmetic's FLOP time is {fmt_s(run.flops / best64)} s; cold wall "
                     f"less imports ÷ max(cold floor, that): {at_fp64('covariance')} (the target above stays the fp32 "
                     "one)")
    if spectral:
        lines.append(f"- spectral FLOPs ({', '.join(spectral)}): the Gram products and one factorization per LIN "
                     f"matrix, an r×r eigh counted {EIGH_FLOPS}r³ (`spectral_flops` in bench/speed.py); the rules take "
                     "more eighs (tsv T + 2 per matrix, iso_cts T + 3, iso_c 1), the others are not counted")
        lines.append(f"- the spectral rules' Grams, eighs and root products are fp64 too (their accuracy bounds in "
                     f"matrix_rule.py): the same FLOPs at the fp64 rate ({best64 / 1e9:.1f} GFLOP/s), cold wall less "
                     f"imports ÷ max(cold floor, that): {at_fp64('spectral')} (the target above stays the fp32 one)")
    if run.skipped:
        lines.append(f"- not in REGISTRY, skipped: {', '.join(run.skipped)}")
    lines += ["", *table(run), "",
              f"Targets: elementwise ≤ {ELEMENTWISE_TARGET}× the cold floor; global TIES ≤ {GLOBAL_TIES_TARGET}× "
              "the cold floor (lowmerge's exact global threshold reads the base and experts 3 times: two histogram "
              f"rounds, then the merge); actmat and wudi_cfs ≤ {COVARIANCE_TARGET}× max(cold floor, FLOP time); "
              f"tsv, iso_c and iso_cts ≤ {SPECTRAL_TARGET}× max(cold floor, FLOP time). "
              "`reads ÷ inputs` is the merge's bytes_read over the input bytes.", ""]
    return "\n".join(lines)


def append_results(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.is_file() and path.stat().st_size > 0
    with open(path, "a", encoding="utf-8") as f:
        if not exists:
            f.write("# lowmerge benchmark results\n\nAppended by the scripts in bench/; old entries are never "
                    "edited.\n\n")
        f.write(text + "\n")


# ---------------------------------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of NAME[:KEY=VALUE...]; names not in REGISTRY are skipped")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached example under bench/_work")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of lowmerge (e.g. a git worktree of main): every method is also merged "
                        "with its code, right after this checkout's, on the same files")
    p.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md", help="markdown file appended to")
    return p.parse_args(argv)


def shape_line(args: argparse.Namespace) -> str:
    return (f"Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
            f"vocab {args.vocab}, heads {args.heads}, kv heads {args.kv_heads}, untied lm_head; "
            f"base + {args.experts} experts, {args.dtype}, seed {args.seed}")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    specs, skipped = parse_methods(args.methods)
    WORK.mkdir(parents=True, exist_ok=True)
    when, commit = now(), git_commit()
    base, experts, built = ensure_example(args)
    log(f"{'built' if built else 'reusing'} {example_root(args)}")
    inputs = input_files(base, experts)
    out_bytes = sum(p.stat().st_size for p in input_files(base, []))
    log("measuring import time, matmul rate and covariance FLOPs ...")
    import_s = import_time(IMPORT_REPEAT)
    rates = matmul_rates()
    rates64 = matmul_rates(dtype="float64")
    flops, n_lin = covariance_flops(base, experts)
    log("measuring the I/O floor ...")
    floors = {state: best_of(args.repeat, lambda c=(state == "cold"): measure_floor(inputs, out_bytes, c))
              for state in ("cold", "warm")}
    run = Run("python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]), shape_line(args),
              sum(p.stat().st_size for p in inputs), len(inputs), out_bytes, floors, import_s, rates, rates64, flops, n_lin,
              skipped=skipped)
    trees = [(REPO, "")]
    if args.baseline is not None:
        baseline = args.baseline.resolve()
        if not (baseline / "lowmem_merge" / "__init__.py").is_file():
            raise SystemExit(f"error: --baseline {baseline}: no lowmem_merge package there; "
                             "give a checkout of lowmerge, e.g. `git worktree add /tmp/before main`")
        trees.append((baseline, f"baseline {baseline.name} {git_commit(baseline)}"))
        trees[0] = (REPO, f"this tree {commit}")
    shapes = lin_shapes(base, experts)
    for spec in specs:
        target = target_of(spec)
        flop_s = (flops / max(rates.values()) if target and target.kind == "covariance" else
                  spectral_flops(spec, shapes, len(experts)) / max(rates.values())
                  if target and target.kind == "spectral" else None)
        for tree, label in trees:
            log(f"merging with {spec.label}{f' ({label})' if label else ''} (cold, warm) ...")
            cold = best_of(args.repeat, lambda: run_merge(spec, base, experts, inputs, cold=True, tree=tree))
            warm = best_of(args.repeat, lambda: run_merge(spec, base, experts, inputs, cold=False, tree=tree))
            run.results.append(MethodResult(spec, cold, warm, target, flop_s, label))
    text = render(run, when, commit, machine())
    print(text)
    append_results(args.results, text)
    log(f"appended to {args.results}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == FLOOR_CHILD:
        floor_child(sys.argv[2])
    else:
        main()
