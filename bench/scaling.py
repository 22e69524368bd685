"""Does lowmerge's peak memory stay flat as the number of experts and the depth grow, and how does its time grow?

One run: synthetic Llama-shaped bases and experts (lowmem_merge.demo, deterministic, built once under bench/_work/);
for an elementwise rule (task_arithmetic) and a covariance rule (actmat), one merge per point in a fresh subprocess
on a cold page cache (a system-wide sync, then speed.py's fsync + POSIX_FADV_DONTNEED), against the number of experts
(2, 4, 8, 16 at --layers) and against depth (4, 8, 16 layers at --depth-experts experts); peak RSS is lowmerge's own
(VmHWM, from its report), wall time is the subprocess's, interpreter start and imports included. A run with n
experts uses the first n of one build. Prints one table, appends it to bench/RESULTS.md and saves a plot (PNG).

Run (on a quiet machine; ~10 min on 2 cores, ~10 GB under bench/_work):
    python bench/scaling.py
Tiny check (a minute; keep it out of RESULTS.md and of the committed plot):
    python bench/scaling.py --hidden 256 --intermediate 688 --vocab 4096 --heads 4 --kv-heads 4 --experts 2,4 \
        --depths 2,4 --layers 2 --depth-experts 2 --results /tmp/scratch.md --plot /tmp/scaling.png
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from speed import (IMPORT_REPEAT, REPO, WORK, MergeRun, MethodSpec, append_results, ensure_example, example_root,
                   fmt_bytes, fmt_pct, fmt_s, git_commit, import_time, input_files, log, machine, now, run_merge)
from vs_mergekit import busy_cpu_s

METHODS = ("task_arithmetic", "actmat")
PEAK_TARGET = 10**9  # issue 6: lowmerge on CPU ≤ 1 GB peak whatever the number of experts


@dataclass
class Point:
    method: str
    series: str      # "experts" or "depth"
    experts: int
    layers: int
    input_bytes: int
    run: MergeRun
    others_share: float  # CPU other processes took during the run, as a share of all cores


def shape_args(args: argparse.Namespace, layers: int, experts: int) -> argparse.Namespace:
    """The namespace speed.ensure_example keys its cache on."""
    return argparse.Namespace(hidden=args.hidden, intermediate=args.intermediate, layers=layers, vocab=args.vocab,
                              heads=args.heads, kv_heads=args.kv_heads, experts=experts, dtype="bfloat16",
                              seed=args.seed, rebuild=False)


def models(args: argparse.Namespace, layers: int, experts: int) -> tuple[Path, list[Path]]:
    """Base and ``experts`` experts at ``layers``: the first ones of the largest build needed at that depth."""
    need = max(args.expert_counts) if layers == args.layers else 0
    need = max(need, args.depth_experts if layers in args.depth_list else 0, experts)
    base, all_experts, built = ensure_example(shape_args(args, layers, need))
    if built:
        log(f"built {example_root(shape_args(args, layers, need))}")
    return base, all_experts[:experts]


def measure(method: str, series: str, args: argparse.Namespace, layers: int, experts: int) -> Point:
    base, use = models(args, layers, experts)
    inputs = input_files(base, use)
    log(f"{method}: {experts} experts, {layers} layers ...")
    os.sync()  # earlier runs' (and anyone's) dirty pages would otherwise be flushed inside this run's fsyncs
    busy, mine = busy_cpu_s(), children_cpu_s()
    run = run_merge(MethodSpec(method), base, use, inputs, cold=True)
    others = max(0.0, busy_cpu_s() - busy - (children_cpu_s() - mine)) / (run.wall_s * (os.cpu_count() or 1))
    log(f"  {fmt_s(run.wall_s)} s, peak {fmt_bytes(run.peak_rss)}, other processes' CPU {fmt_pct(others)}")
    return Point(method, series, experts, layers, sum(p.stat().st_size for p in inputs), run, others)


def children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children (the merge subprocess), user + system."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def table(points: Sequence[Point]) -> list[str]:
    head = ["method", "series", "experts", "layers", "inputs", "wall s (cold)", "report total s",
            "s per GiB read", "peak RSS", "≤ 1 GB", "cache resident", "other processes' CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        r = p.run
        row = [f"`{p.method}`", p.series, str(p.experts), str(p.layers), fmt_bytes(p.input_bytes), fmt_s(r.wall_s),
               fmt_s(r.total_s), f"{r.wall_s / (r.bytes_read / 2**30):.2f}", fmt_bytes(r.peak_rss),
               "met" if r.peak_rss <= PEAK_TARGET else "not met", fmt_pct(r.resident), fmt_pct(p.others_share)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def growth(points: Sequence[Point]) -> list[str]:
    """Per method and series: peak and wall at the largest point over the smallest."""
    out = []
    for method in dict.fromkeys(p.method for p in points):
        for series, key in (("experts", lambda p: p.experts), ("depth", lambda p: p.layers)):
            pts = sorted((p for p in points if p.method == method and p.series == series), key=key)
            if len(pts) < 2:
                continue
            lo, hi = pts[0], pts[-1]
            out.append(f"`{method}` {series} {key(lo)} → {key(hi)} ({hi.input_bytes / lo.input_bytes:.1f}× the "
                       f"inputs): peak {fmt_bytes(lo.run.peak_rss)} → {fmt_bytes(hi.run.peak_rss)} "
                       f"({hi.run.peak_rss / lo.run.peak_rss:.2f}×), wall {fmt_s(lo.run.wall_s)} → "
                       f"{fmt_s(hi.run.wall_s)} s ({hi.run.wall_s / lo.run.wall_s:.1f}×)")
    return out


def plot(points: Sequence[Point], path: Path, title: str) -> None:
    """2×2: peak RSS (top) and wall (bottom) against experts (left) and depth (right); inputs' size dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for col, (series, key, label) in enumerate((("experts", "experts", "experts"), ("depth", "layers", "layers"))):
        pts = [p for p in points if p.series == series]
        for method in dict.fromkeys(p.method for p in pts):
            mine = sorted((p for p in pts if p.method == method), key=lambda p: getattr(p, key))
            xs = [getattr(p, key) for p in mine]
            axes[0, col].plot(xs, [p.run.peak_rss / 2**30 for p in mine], "o-", label=f"{method} peak RSS")
            axes[1, col].plot(xs, [p.run.wall_s for p in mine], "o-", label=method)
        inputs = sorted({(getattr(p, key), p.input_bytes) for p in pts})
        axes[0, col].plot([x for x, _ in inputs], [b / 2**30 for _, b in inputs], "k--", label="inputs read")
        axes[0, col].axhline(PEAK_TARGET / 2**30, color="grey", lw=0.8, ls=":", label="1 GB target")
        axes[0, col].set_ylabel("GiB")
        axes[0, col].set_title(f"peak RSS vs {label}")
        axes[1, col].set_ylabel("wall s (cold cache)")
        axes[1, col].set_title(f"wall time vs {label}")
        axes[1, col].set_xlabel(label)
        axes[1, col].set_xscale("log", base=2)
        axes[1, col].set_xticks(sorted({x for x, _ in inputs}), labels=[str(x) for x, _ in inputs])
        for ax in axes[:, col]:
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def render(points: Sequence[Point], args: argparse.Namespace, import_s: float, command: str, when,
           commit: str) -> str:
    lines = [
        f"## scaling — {when:%Y-%m-%d %H:%M} UTC — {commit}",
        "",
        "Question: does lowmerge's peak memory stay flat as the number of experts and the depth grow, and how does "
        "its time grow?",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- model: Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, heads "
        f"{args.heads}, kv heads {args.kv_heads}, untied lm_head, bf16, seed {args.seed}; experts series at "
        f"{args.layers} layers, depth series at {args.depth_experts} experts",
        "- each point: `python -m lowmem_merge merge BASE EXPERT... -o bench/_work/out-... --method M --device cpu "
        "-q` in a fresh subprocess on a cold page cache (fsync + POSIX_FADV_DONTNEED; resident fraction after the "
        "drop in the last column); peak RSS = the report's VmHWM; wall includes interpreter start and imports "
        f"({fmt_s(import_s)} s for `import lowmem_merge.cli, torch`, best of {IMPORT_REPEAT})",
        "- other processes' CPU: the machine's busy CPU time (/proc/stat) during the run less the merge's own "
        "(RUSAGE_CHILDREN), as a share of all cores; above a few % the machine was not quiet and the wall time is "
        "inflated",
        f"- plot: `{os.path.relpath(args.plot, REPO) if args.plot.is_relative_to(REPO) else args.plot}`",
        "",
        *table(points),
        "",
        "Growth: " + "; ".join(growth(points)) + ".",
        "",
        f"Target (issue 6): peak RSS ≤ 1 GB (10⁹ B) whatever the number of experts — "
        f"{'met at every point' if all(p.run.peak_rss <= PEAK_TARGET for p in points) else 'not met at every point'}"
        f" (largest {fmt_bytes(max(p.run.peak_rss for p in points))}).",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=8, help="depth of the experts series")
    p.add_argument("--experts", default="2,4,8,16", help="expert counts of the experts series")
    p.add_argument("--depths", default="4,8,16", help="layer counts of the depth series")
    p.add_argument("--depth-experts", type=int, default=4, help="experts in the depth series")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of lowmerge methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md", help="markdown file appended to")
    p.add_argument("--plot", type=Path, default=REPO / "bench" / "scaling.png", help="PNG written")
    args = p.parse_args(argv)
    args.expert_counts = [int(s) for s in args.experts.split(",") if s.strip()]
    args.depth_list = [int(s) for s in args.depths.split(",") if s.strip()]
    args.method_list = [m for m in args.methods.split(",") if m]
    args.plot = args.plot.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    when, commit = now(), git_commit()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    import_s = import_time(IMPORT_REPEAT)
    points: list[Point] = []
    for method in args.method_list:
        cases = [("experts", args.layers, n) for n in args.expert_counts]
        cases += [("depth", layers, args.depth_experts) for layers in args.depth_list]
        done: dict[tuple[int, int], Point] = {}
        for series, layers, n in cases:  # a point in both series is merged once and listed in both
            if (layers, n) not in done:
                done[layers, n] = measure(method, series, args, layers, n)
            points.append(dataclasses.replace(done[layers, n], series=series))
    title = (f"lowmerge {commit}, cold cache, hidden {args.hidden}, intermediate {args.intermediate}, vocab "
             f"{args.vocab}; experts at {args.layers} layers, depth at {args.depth_experts} experts")
    plot(points, args.plot, title)
    text = render(points, args, import_s, command, when, commit)
    print(text)
    append_results(args.results, text)
    log(f"appended to {args.results}; plot {args.plot}")


if __name__ == "__main__":
    main()
