"""How much faster and leaner is lowmerge than mergekit on the same merge, and do the two give the same model?

One run, on the same files: a mergekit virtual environment made once under bench/_work/ (torch pinned first from the
local CPU wheel, then mergekit from PyPI; the project's own environment is never touched); a synthetic Llama-shaped
base and experts (lowmem_merge.demo, deterministic, no download) built once under bench/_work/ in 1 GB input shards;
then, for 3 and for 6 experts and each method both tools have (`linear`, `task_arithmetic`, `ties` with mergekit's
per-tensor trim), one mergekit recipe (`dtype: float32`, per-model weights w_t = 1 − 0.1·t, ties density 0.2) run by
`mergekit-yaml recipe.yaml OUT` and by `lowmerge merge --config recipe.yaml`, each in a fresh subprocess on a cold page
cache; wall time and the child's own peak RSS; the two outputs compared tensor by tensor. Prints one table and
appends it to bench/RESULTS.md.

Run (on a quiet machine; ~25 min on 2 cores, most of it mergekit's TIES; ~20 GB under bench/_work):
    python bench/vs_mergekit.py
--time-budget SECONDS skips a case at a larger expert count whose time, extrapolated linearly in the number of
experts from the same method's case at the previous count, would overrun the budget; RESULTS.md lists what it skipped.
Tiny check (a few minutes, the first time also the venv; keep it out of RESULTS.md):
    python bench/vs_mergekit.py --hidden 256 --intermediate 688 --layers 2 --vocab 4096 --heads 4 --kv-heads 4 \
        --experts 2,3 --shard-mb 4 --results /tmp/scratch.md

Peak RSS is read by a small stdlib launcher (this file, argv[1] = _measure) that starts the tool and reads its
ru_maxrss from os.wait4: ru_maxrss survives exec, so the launcher itself must be small (≈10 MB), never this process.
Cold page cache as in speed.py (fsync, then posix_fadvise DONTNEED on every input file). Wall time is the launcher's,
from spawn to exit (interpreter start and imports included); "+ fsync" adds the time to fsync the output files after
exit (lowmerge fsyncs its shards itself, mergekit leaves them to the kernel).

Only the standard library at module level: the launcher runs this file and must stay small.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from speed import (REPO, WORK, Floor, append_results, drop_cache, fmt_bytes, fmt_pct, fmt_s, git_commit, log, machine,
                   measure_floor, now, resident_fraction, sync_file)

MERGEKIT_PIN, TORCH_PIN = "mergekit==0.1.5", "torch==2.13.0"
VENV = WORK / "mergekit-venv"
MEASURE_CHILD = "_measure"
METHODS = ("linear", "task_arithmetic", "ties")
DENSITY = 0.2                                  # ties: fraction of each task vector kept
PEAK_TARGET = 10**9                            # lowmerge ≤ 1 GB peak RSS whatever the number of experts
SPEEDUP_TARGET = {"task_arithmetic": 4.0, "ties": 10.0}
# Equal up to rounding: both sides form W0 + Σ w_t Δt (or Σ w_t W_t / Σ w_t) in fp32 from the same bf16 inputs, in a
# different order; each of the ≤ 2n + 2 roundings is ≤ ½ ulp of a partial sum bounded by ~max|W|, so
# |a − b| ≤ (n + 1)·eps32·max|W| per tensor, and ROUNDING_MARGIN × that is still far below any real difference
# (a dropped or added trimmed entry moves the result by ≥ κ_t / n ≈ 1e-3·max|W|).
EPS32, ROUNDING_MARGIN = 2.0 ** -23, 4.0


# ---------------------------------------------------------------------------------------------------- the launcher

def busy_cpu_s() -> float:
    """CPU seconds every process has used since boot (/proc/stat: all but idle and iowait); 0 where unknown."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measure_child(request: str) -> None:
    """Runs in the small launcher: spawn the command, wait4 it, print wall time, its ru_maxrss, its exit code and the
    CPU time other processes took meanwhile (the machine's busy time less the child's own)."""
    req = json.loads(request)
    with open(req["log"], "wb") as log_file:
        busy = busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen(req["cmd"], cwd=req["cwd"], env={**os.environ, **req["env"]}, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        others = max(0.0, busy_cpu_s() - busy - usage.ru_utime - usage.ru_stime)
    proc.returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "rc": proc.returncode,
                      "others_share": others / (wall * (os.cpu_count() or 1))}))


@dataclass
class ToolRun:
    wall_s: float
    fsync_s: float
    peak_rss: int
    resident: float | None
    others_share: float               # CPU other processes took during the run, as a share of all cores
    own_peak: int | None = None      # lowmerge's report (VmHWM), a check on the launcher's number
    own_total_s: float | None = None  # lowmerge's report timings_s.total


def measure(cmd: list[str], out: Path, inputs: Sequence[Path], env: dict[str, str], name: str) -> ToolRun:
    """Run ``cmd`` (which writes ``out``) in a fresh process under the launcher, on a cold page cache."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous run's (and anyone's) dirty pages would otherwise be flushed inside this run's fsyncs
    drop_cache(inputs)
    resident = resident_fraction(inputs)
    log_path = WORK / f"{name}.log"
    request = json.dumps({"cmd": cmd, "cwd": str(WORK), "env": env, "log": str(log_path)})
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), MEASURE_CHILD, request], cwd=REPO,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    if result["rc"] != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {name} failed (exit {result['rc']}); the end of {log_path}:\n{tail}")
    t0 = time.perf_counter()
    for path in sorted(out.rglob("*")):
        if path.is_file():
            sync_file(path)
    return ToolRun(result["wall_s"], time.perf_counter() - t0, result["peak_rss"], resident, result["others_share"])


# ---------------------------------------------------------------------------------------------------- mergekit venv

def venv_python() -> Path:
    return VENV / "bin" / "python"


def venv_versions() -> dict[str, str] | None:
    """Versions of mergekit, torch and transformers in the venv, or None when it is missing or not the pinned one."""
    if not venv_python().is_file():
        return None
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({k: m.version(k) for k in ('mergekit', 'torch', 'transformers')}))")
    done = subprocess.run([str(venv_python()), "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    versions = json.loads(done.stdout)
    ok = (versions["mergekit"] == MERGEKIT_PIN.split("==")[1]
          and versions["torch"].split("+")[0] == TORCH_PIN.split("==")[1])
    return versions if ok else None


def ensure_venv() -> dict[str, str]:
    """mergekit in its own venv: torch first (the local CPU wheel), so mergekit's requirement does not pull CUDA."""
    versions = venv_versions()
    if versions:
        return versions
    log(f"making {VENV} ({TORCH_PIN}, then {MERGEKIT_PIN}) ...")
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH_PIN], check=True)
    subprocess.run([*pip, MERGEKIT_PIN], check=True)
    versions = venv_versions()
    if versions is None:
        raise SystemExit(f"error: {VENV} does not hold {MERGEKIT_PIN} with {TORCH_PIN} after installing them")
    return versions


# ---------------------------------------------------------------------------------------------------- the example

def example_root(args: argparse.Namespace) -> Path:
    key = (f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-a{args.heads}-kv{args.kv_heads}"
           f"-e{max(args.expert_counts)}-bfloat16-s{args.seed}-shard{args.shard_mb}MB")
    return WORK / f"example-{key}"


def ensure_example(args: argparse.Namespace) -> tuple[Path, list[Path], bool]:
    """Base and max(--experts) experts, built once per shape; a run with n experts uses the first n (of this build or
    of a complete one with more experts: the build is deterministic per expert)."""
    root = example_root(args)
    n = max(args.expert_counts)
    for done in sorted(WORK.glob(str(root.name).replace(f"-e{n}-", "-e*-") + "/complete.json")):
        have = int(done.parent.name.split("-e")[-1].split("-")[0])
        if have >= n:
            return done.parent / "base", [done.parent / f"expert{t}" for t in range(n)], False
    base, experts = root / "base", [root / f"expert{t}" for t in range(n)]
    import torch
    from lowmem_merge.demo import LlamaShape, build_example
    shutil.rmtree(root, ignore_errors=True)
    shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                       heads=args.heads, kv_heads=args.kv_heads)
    build_example(root, shape, n, torch.bfloat16, args.seed, shard_size=args.shard_mb * 10**6)
    for path in root.rglob("*.safetensors"):
        sync_file(path)
    (root / "complete.json").write_text(json.dumps({"built": now().isoformat()}) + "\n")
    return base, experts, True


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def recipe_text(method: str, base: Path, experts: Sequence[Path]) -> str:
    """One mergekit recipe; both tools read this same file.

    linear's weighted mean Σ w_t W_t / Σ w_t has no base; mergekit wants a weight for a base_model it is given, and
    lowmerge wants a base_model, so its base_model is the first expert (lowmerge: an expert with Δ = 0, same mean).
    """
    lines = [f"merge_method: {method}", f"base_model: {experts[0] if method == 'linear' else base}", "models:"]
    for t, expert in enumerate(experts):
        params = f"weight: {weight_of(t):g}" + (f", density: {DENSITY:g}" if method == "ties" else "")
        lines += [f"  - model: {expert}", f"    parameters: {{{params}}}"]
    return "\n".join([*lines, "dtype: float32", ""])


def weight_of(t: int) -> float:
    return round(1.0 - 0.1 * t, 6)


# ---------------------------------------------------------------------------------------------------- the two tools

def run_mergekit(recipe: Path, out: Path, inputs: Sequence[Path], shard_mb: int) -> ToolRun:
    cmd = [str(VENV / "bin" / "mergekit-yaml"), str(recipe), str(out), "--lazy-unpickle",
           "--out-shard-size", f"{shard_mb}M", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return measure(cmd, out, inputs, env, "mergekit")


def run_lowmerge(recipe: Path, out: Path, inputs: Sequence[Path], shard_mb: int) -> ToolRun:
    cmd = [sys.executable, "-m", "lowmem_merge", "merge", "--config", str(recipe), "-o", str(out),
           "--shard-size", f"{shard_mb}MB", "--device", "cpu", "-q"]
    run = measure(cmd, out, inputs, {"PYTHONPATH": str(REPO)}, "lowmerge")
    report = json.loads((out / "lowmerge_report.json").read_text())
    run.own_peak, run.own_total_s = report["memory"]["peak_rss_bytes"], report["timings_s"]["total"]
    return run


def startup_s(cmd: list[str], repeat: int = 2) -> float:
    """Wall time of a fresh process that only starts a tool and exits (best of ``repeat``, after one warm-up)."""
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=WORK, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def command_lines(shard_mb: int) -> tuple[str, str]:
    return (f"mergekit-yaml recipe.yaml OUT --lazy-unpickle --out-shard-size {shard_mb}M --no-copy-tokenizer "
            "--no-write-model-card --quiet",
            f"python -m lowmem_merge merge --config recipe.yaml -o OUT --shard-size {shard_mb}MB --device cpu -q")


# ---------------------------------------------------------------------------------------------------- comparison

@dataclass
class Agreement:
    max_abs: float = 0.0         # max |a − b| over the model
    max_scaled: float = 0.0      # max over tensors of max|a − b| / max|b|
    diff_sq: float = 0.0         # Σ (a − b)²
    ref_sq: float = 0.0          # Σ b²
    entries: int = 0
    unequal: int = 0             # a != b (bits)
    beyond: int = 0              # |a − b| beyond the rounding bound
    beyond_at_cut: int = 0       # ... where some expert's |Δt| equals its per-tensor cut-off κ_t (ties only)
    beyond_near_zero: int = 0    # ... not at a cut-off tie, where the electing sum is within rounding of 0 (ties)
    at_cut: int = 0              # entries where some expert's |Δt| equals κ_t (ties only)
    missing: list[str] = field(default_factory=list)

    @property
    def rel_fro(self) -> float:
        return (self.diff_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0


def tensor_index(model: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it."""
    from safetensors import safe_open
    out: dict[str, Path] = {}
    for path in weight_files(model):
        with safe_open(str(path), "pt") as f:
            out.update({name: path for name in f.keys()})
    return out


def load(index: dict[str, Path], name: str):  # -> torch.Tensor, fp32
    from safetensors import safe_open
    with safe_open(str(index[name]), "pt") as f:
        return f.get_tensor(name).float()


def ties_masks(name: str, inputs: Sequence[dict[str, Path]], density: float):  # -> (bool tensor, bool tensor)
    """Where the two TIES may differ for a known reason: (some expert's |Δt| equals the k-th largest |Δt| of the
    tensor, k = ⌊density·numel⌋ as in both; the weighted sum of the kept entries, which elects the sign, is within
    rounding of 0, so a different summation order may elect the other sign)."""
    import torch
    base = load(inputs[0], name)
    cut = torch.zeros(base.shape, dtype=torch.bool)
    total, magnitude = torch.zeros(base.shape), torch.zeros(base.shape)  # Σ w_t·kept Δt, Σ |w_t·kept Δt|
    k = int(density * base.numel())
    for t, index in enumerate(inputs[1:]):
        delta = load(index, name).sub_(base)
        mag = delta.abs()
        kappa = mag.reshape(-1).kthvalue(base.numel() - k + 1).values if k else torch.tensor(float("inf"))
        cut |= mag == kappa
        kept = delta.mul_(mag >= kappa).mul_(weight_of(t))
        total += kept
        magnitude += kept.abs_()
    near_zero = total.abs_() <= ROUNDING_MARGIN * (len(inputs) + 1) * EPS32 * magnitude
    return cut, near_zero


def compare(mk_out: Path, lm_out: Path, n_experts: int, ties_inputs: Sequence[Path] | None) -> Agreement:
    """a = mergekit, b = lowmerge, fp32, every tensor of lowmerge's output; ties_inputs: base and experts (ties)."""
    a_index, b_index = tensor_index(mk_out), tensor_index(lm_out)
    inputs = [tensor_index(p) for p in ties_inputs] if ties_inputs else []
    agree = Agreement(missing=sorted(set(a_index) ^ set(b_index)))
    for name in sorted(set(a_index) & set(b_index)):
        a, b = load(a_index, name), load(b_index, name)
        diff = (a - b).abs_()
        scale = float(b.abs().max()) or 1.0
        beyond = diff > ROUNDING_MARGIN * (n_experts + 1) * EPS32 * scale
        agree.max_abs = max(agree.max_abs, float(diff.max()))
        agree.max_scaled = max(agree.max_scaled, float(diff.max()) / scale)
        agree.diff_sq += float(diff.double().square().sum())
        agree.ref_sq += float(b.double().square().sum())
        agree.entries += b.numel()
        agree.unequal += int((a != b).sum())
        agree.beyond += int(beyond.sum())
        if inputs:
            cut, near_zero = ties_masks(name, inputs, DENSITY)
            agree.at_cut += int(cut.sum())
            agree.beyond_at_cut += int((beyond & cut).sum())
            agree.beyond_near_zero += int((beyond & near_zero & ~cut).sum())
        del a, b, diff, beyond
    return agree


# ---------------------------------------------------------------------------------------------------- one case

@dataclass
class Case:
    method: str
    n_experts: int
    mergekit: ToolRun
    lowmerge: ToolRun
    agree: Agreement
    elapsed_s: float = 0.0  # both runs, the comparison and the cache drops: what a --time-budget estimate scales

    @property
    def speedup(self) -> float:
        return self.mergekit.wall_s / self.lowmerge.wall_s


def run_case(method: str, base: Path, experts: Sequence[Path], shard_mb: int, keep: bool) -> Case:
    n = len(experts)
    recipe = WORK / f"recipe-{method}-{n}.yaml"
    recipe.write_text(recipe_text(method, base, experts))
    models = list(experts) if method == "linear" else [base, *experts]
    inputs = [p for model in models for p in weight_files(model)]
    mk_out, lm_out = WORK / f"out-mergekit-{method}-{n}", WORK / f"out-lowmerge-{method}-{n}"
    log(f"{method}, {n} experts: mergekit ...")
    t0 = time.perf_counter()
    mk = run_mergekit(recipe, mk_out, inputs, shard_mb)
    log(f"  {fmt_s(mk.wall_s)} s, peak {fmt_bytes(mk.peak_rss)}; lowmerge ...")
    lm = run_lowmerge(recipe, lm_out, inputs, shard_mb)
    log(f"  {fmt_s(lm.wall_s)} s, peak {fmt_bytes(lm.peak_rss)}; comparing ...")
    agree = compare(mk_out, lm_out, n, [base, *experts] if method == "ties" else None)
    if not keep:
        shutil.rmtree(mk_out, ignore_errors=True)
        shutil.rmtree(lm_out, ignore_errors=True)
    return Case(method, n, mk, lm, agree, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- output

def unexplained(a: Agreement) -> int:
    """Entries beyond rounding with no known reason (ties: neither at a cut-off tie nor at a near-0 election)."""
    return a.beyond - a.beyond_at_cut - a.beyond_near_zero


def equal_text(c: Case) -> str:
    """'met' when every entry is within the rounding bound; ties: every entry beyond it has a known reason."""
    a = c.agree
    if a.missing:
        return f"not met ({len(a.missing)} tensors in one output only)"
    if c.method != "ties":
        return "met" if a.beyond == 0 else "not met"
    return "met (differences only at cut-off ties or near-0 elections)" if unexplained(a) == 0 else "not met"


def speed_text(c: Case) -> str:
    target = SPEEDUP_TARGET.get(c.method)
    if target is None:
        return "—"
    return f"≥ {target:g}×: {'met' if c.speedup >= target else 'not met'}"


def speed_table(cases: Sequence[Case], floors: dict[int, Floor]) -> list[str]:
    head = ["method", "experts", "mergekit wall s (+ fsync)", "lowmerge wall s (+ fsync)", "speed-up", "target",
            "wall ÷ cold I/O floor, mergekit / lowmerge", "mergekit peak RSS", "lowmerge peak RSS",
            "lowmerge ≤ 1 GB",
            "other processes' CPU during the run, mergekit / lowmerge"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        mk, lm = c.mergekit, c.lowmerge
        row = [f"`{c.method}`", str(c.n_experts), f"{fmt_s(mk.wall_s)} ({fmt_s(mk.wall_s + mk.fsync_s)})",
               f"{fmt_s(lm.wall_s)} ({fmt_s(lm.wall_s + lm.fsync_s)})", f"{c.speedup:.1f}×", speed_text(c),
               f"{mk.wall_s / floors[c.n_experts].total_s:.1f}× / {lm.wall_s / floors[c.n_experts].total_s:.1f}×",
               fmt_bytes(mk.peak_rss), fmt_bytes(lm.peak_rss), "met" if lm.peak_rss <= PEAK_TARGET else "not met",
               f"{fmt_pct(mk.others_share)} / {fmt_pct(lm.others_share)}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def agreement_table(cases: Sequence[Case]) -> list[str]:
    head = ["method", "experts", "max abs diff", "max diff ÷ max|b| (per tensor)", "‖a−b‖F/‖b‖F",
            "entries ≠ (bits)", "beyond rounding", "… at a cut-off tie / near-0 election / other",
            "equal up to rounding"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        a = c.agree
        why = (f"{a.beyond_at_cut} / {a.beyond_near_zero} / {unexplained(a)}" if c.method == "ties" else "—")
        row = [f"`{c.method}`", str(c.n_experts), f"{a.max_abs:.2e}", f"{a.max_scaled:.2e}", f"{a.rel_fro:.2e}",
               fmt_frac(a.unequal, a.entries), fmt_frac(a.beyond, a.entries), why, equal_text(c)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def fmt_frac(k: int, n: int) -> str:
    return f"{k} ({100 * k / n:.3g} %)" if n else str(k)


def ties_note(cases: Sequence[Case]) -> str:
    ties = [c for c in cases if c.method == "ties"]
    if not ties:
        return ""
    parts = [f"{c.n_experts} experts: {fmt_frac(c.agree.at_cut, c.agree.entries)} entries have some expert exactly "
             f"at its cut-off" for c in ties]
    return ("- ties: both keep the k = ⌊0.2·numel⌋ largest |Δt| per tensor, but |Δt| of bf16 inputs takes few "
            "distinct values, so many entries equal the k-th largest, κ_t: lowmerge keeps every entry with "
            "|Δt| ≥ κ_t, mergekit's `argsort(|Δt|)[:k]` keeps exactly k and drops an arbitrary subset of the tied "
            "ones; where that changes an entry's kept set, the merged value moves by about κ_t/n, far beyond "
            "rounding. A near-0 election: the weighted sum of the kept entries that elects the sign is within "
            "rounding of 0, so a different summation order (mergekit sums in expert order, lowmerge positives and "
            "negatives apart) may elect the other sign. " + "; ".join(parts))


@dataclass
class Baselines:
    mergekit_start_s: float    # `mergekit-yaml --help`: interpreter, imports
    lowmerge_start_s: float    # `python -m lowmem_merge --help`
    input_bytes: dict[int, int] = field(default_factory=dict)  # experts → bytes of base + experts
    floors: dict[int, Floor] = field(default_factory=dict)     # experts → cold I/O floor


def measure_baselines(base: Path, experts: Sequence[Path], counts: Sequence[int]) -> Baselines:
    log("measuring start-up times and the cold I/O floor ...")
    b = Baselines(startup_s([str(VENV / "bin" / "mergekit-yaml"), "--help"]),
                  startup_s([sys.executable, "-m", "lowmem_merge", "--help"]))
    out_bytes = 2 * sum(p.stat().st_size for p in weight_files(base))  # the fp32 output of a bf16 base
    for n in counts:
        inputs = [p for m in [base, *experts[:n]] for p in weight_files(m)]
        b.input_bytes[n] = sum(p.stat().st_size for p in inputs)
        os.sync()
        b.floors[n] = measure_floor(inputs, out_bytes, cold=True)
    return b


def render(cases: Sequence[Case], args: argparse.Namespace, versions: dict[str, str], command: str, when, commit: str,
           base: Baselines, skipped: Sequence[str]) -> str:
    mk_cmd, lm_cmd = command_lines(args.shard_mb)
    floors = ", ".join(f"{n} experts {fmt_s(f.total_s)} s (read {fmt_bytes(base.input_bytes[n])} in "
                       f"{fmt_s(f.read_s)} s, write {fmt_s(f.write_s)} s)" for n, f in base.floors.items())
    residents = ", ".join(f"{fmt_pct(r.resident)}" for c in cases for r in (c.mergekit, c.lowmerge))
    own = "; ".join(f"`{c.method}` {c.n_experts}: {fmt_bytes(c.lowmerge.own_peak or 0)}, "
                    f"{fmt_s(c.lowmerge.own_total_s or 0)} s" for c in cases)
    lines = [
        f"## vs_mergekit — {when:%Y-%m-%d %H:%M} UTC — {commit}",
        "",
        "Question: how much faster and leaner is lowmerge than mergekit on the same merge, and do the two give the "
        "same model?",
        "",
        f"- machine: {machine()}",
        f"- mergekit venv (bench/_work/mergekit-venv): mergekit {versions['mergekit']}, torch {versions['torch']}, "
        f"transformers {versions['transformers']}",
        f"- command: `{command}`",
        f"- model: Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}, heads {args.heads}, kv heads {args.kv_heads}, untied lm_head, bf16, "
        f"{args.shard_mb} MB input shards, seed {args.seed}; base + n experts; linear's inputs are the experts "
        "only (see the recipe)",
        "- recipe (one file, read by both): `dtype: float32`, per-model `weight` w_t = 1 − 0.1·t, ties "
        f"`density: {DENSITY:g}` (normalize: mergekit's default, true for linear and ties, false for "
        "task_arithmetic), λ = 1",
        f"- mergekit: `{mk_cmd}`; lowmerge: `{lm_cmd}`; each in a fresh process started by a small stdlib launcher "
        "that reads the child's peak RSS (ru_maxrss from os.wait4); wall from spawn to exit, imports included; "
        "(+ fsync): plus fsync of every output file after exit",
        f"- baselines, same run: start-up only (`--help`, best of 2) mergekit {fmt_s(base.mergekit_start_s)} s, "
        f"lowmerge {fmt_s(base.lowmerge_start_s)} s; cold I/O floor (speed.py's: read base + experts once, write "
        f"the fp32 output's bytes once + fsync): {floors}",
        "- `os.sync()`, then a cold page cache before every run (fsync + POSIX_FADV_DONTNEED); resident after the "
        f"drop: {residents}",
        "- other processes' CPU: the machine's busy CPU time (/proc/stat) during the run less the tool's own "
        "(wait4), as a share of all cores; above a few % the machine was not quiet and the wall times are inflated "
        "(both tools run torch with one thread per core)",
        f"- lowmerge's own report (VmHWM, timings_s.total), a check on the launcher: {own}",
        "- a = mergekit, b = lowmerge, both fp32, every tensor; rounding bound per tensor "
        f"{ROUNDING_MARGIN:g}·(n + 1)·2⁻²³·max|b| (see the script)",
    ]
    note = ties_note(cases)
    if note:
        lines.append(note)
    if skipped:
        lines.append("- not run, to stay within --time-budget: " + "; ".join(skipped))
    lines += ["", *speed_table(cases, base.floors), "", *agreement_table(cases), "",
              "Targets (issue 6): lowmerge peak RSS ≤ 1 GB (10⁹ B) whatever the number of experts; task "
              f"arithmetic ≥ {SPEEDUP_TARGET['task_arithmetic']:g}× and TIES ≥ {SPEEDUP_TARGET['ties']:g}× "
              "faster than mergekit (wall, imports included); outputs equal up to rounding.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--experts", default="3,6", help="comma list of expert counts")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument("--methods-at-max", default=None,
                   help="methods run at the largest expert count (default: --methods)")
    p.add_argument("--shard-mb", type=int, default=1000, help="input and output shard size, MB (10⁶ B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the outputs under bench/_work")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; skip a case whose extrapolated time would overrun it")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md", help="markdown file appended to")
    args = p.parse_args(argv)
    args.expert_counts = sorted({int(s) for s in args.experts.split(",") if s.strip()})
    args.method_list = [m for m in args.methods.split(",") if m]
    args.methods_max = [m for m in (args.methods_at_max or args.methods).split(",") if m]
    unknown = set(args.method_list + args.methods_max) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    return args


def extrapolate(cases: Sequence[Case], method: str, n: int) -> float | None:
    """Seconds for ``method`` with ``n`` experts, linear in n from its case at the largest smaller count."""
    earlier = [c for c in cases if c.method == method and c.n_experts < n]
    if not earlier:
        return None
    prev = max(earlier, key=lambda c: c.n_experts)
    return prev.elapsed_s * n / prev.n_experts


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    when, commit, start = now(), git_commit(), time.perf_counter()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    versions = ensure_venv()
    base, experts, built = ensure_example(args)
    log(f"{'built' if built else 'reusing'} {base.parent}")
    baselines = measure_baselines(base, experts, args.expert_counts)
    cases: list[Case] = []
    skipped: list[str] = []
    for n in args.expert_counts:
        methods = args.methods_max if n == max(args.expert_counts) else args.method_list
        for method in methods:
            estimate = extrapolate(cases, method, n)
            if args.time_budget and estimate and time.perf_counter() - start + estimate > args.time_budget:
                skipped.append(f"`{method}` with {n} experts (estimated {estimate:.0f} s, "
                               f"{time.perf_counter() - start:.0f} s of {args.time_budget:.0f} s used)")
                log(f"skipping {method} with {n} experts: ~{estimate:.0f} s would overrun --time-budget")
                continue
            cases.append(run_case(method, base, experts[:n], args.shard_mb, args.keep))
    text = render(cases, args, versions, command, when, commit, baselines, skipped)
    print(text)
    append_results(args.results, text)
    log(f"appended to {args.results}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == MEASURE_CHILD:
        measure_child(sys.argv[2])
    else:
        main()
