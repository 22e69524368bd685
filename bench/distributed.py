"""How much faster is a merge split over torchrun processes, and is its output the same?

The same merge (speed.py's synthetic Llama, cached under bench/_work) in one process and under
`python -m torch.distributed.run --nproc-per-node N` (gloo, CPU), each in a fresh process tree on a warm and on a cold
page cache; every torch process gets cores ÷ N threads (torchrun's OMP_NUM_THREADS), the single run all cores.
Outputs are compared byte for byte. Appends a table to RESULTS.md.

Run: python bench/distributed.py   (defaults: 1 and 2 processes, task_arithmetic and actmat)
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import (REPO, WORK, append_results, drop_cache, ensure_example, example_root, fmt_bytes, git_commit,  # noqa: E402
                   input_files, log, machine, parse_args, shape_line, warm_cache)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(method: str, procs: int, base: Path, experts: list[Path], inputs: list[Path], cold: bool) -> dict:
    out = WORK / f"out-dist-{method}-{procs}"
    shutil.rmtree(out, ignore_errors=True)
    drop_cache(inputs) if cold else warm_cache(inputs)
    threads = max(1, (os.cpu_count() or 1) // procs)
    merge = ["-m", "lowmem_merge", "merge", str(base), *map(str, experts), "-o", str(out), "--method", method,
             "--device", "cpu", "-q"]
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
              "--master-port", str(free_port())] if procs > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, *merge], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{method} with {procs} process(es) failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "lowmerge_report.json").read_text())
    ranks = report.get("distributed", {}).get("ranks") or [{"peak_rss_bytes": report["memory"]["peak_rss_bytes"]}]
    return {"wall": wall, "out": out, "threads": threads, "peaks": [r["peak_rss_bytes"] for r in ranks]}


def same_bytes(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file
    ta: dict = {}
    tb: dict = {}
    for d, t in ((a, ta), (b, tb)):
        for f in sorted(d.glob("*.safetensors")):
            t.update(load_file(f))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k].view(-1).view(torch.uint8),
                                                      tb[k].view(-1).view(torch.uint8)) for k in ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="comma list of process counts (1 = a plain single process)")
    ap.add_argument("--methods", default="task_arithmetic,actmat")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    own, rest = ap.parse_known_args()
    args = parse_args(rest + ["--results", own.results])          # speed.py's model options
    base, experts, _ = ensure_example(args)
    log(f"example {example_root(args)}")
    inputs = input_files(base, experts)
    procs = [int(p) for p in own.procs.split(",")]
    rows = []
    for method in own.methods.split(","):
        runs = {}
        for n in procs:
            for cache in ("cold", "warm"):
                log(f"{method}, {n} process(es), {cache} ...")
                runs[(n, cache)] = one_run(method, n, base, experts, inputs, cache == "cold")
        ref = runs[(procs[0], "warm")]
        for n in procs:
            equal = same_bytes(ref["out"], runs[(n, "warm")]["out"])
            rows.append(f"| `{method}` | {n} | {runs[(n, 'cold')]['threads']} | {runs[(n, 'cold')]['wall']:.2f} | "
                        f"{runs[(procs[0], 'cold')]['wall'] / runs[(n, 'cold')]['wall']:.2f}× | "
                        f"{runs[(n, 'warm')]['wall']:.2f} | "
                        f"{runs[(procs[0], 'warm')]['wall'] / runs[(n, 'warm')]['wall']:.2f}× | "
                        f"{' + '.join(fmt_bytes(p) for p in runs[(n, 'warm')]['peaks'])} | "
                        f"{'yes' if equal else 'NO'} |")
        for n in procs:
            shutil.rmtree(runs[(n, "warm")]["out"], ignore_errors=True)
    text = "\n".join([
        f"## distributed — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — {git_commit()}",
        "",
        "Question: how much faster is a merge split over torchrun processes, and is its output the same?",
        "",
        f"- machine: {machine()}",
        "- command: `python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]) + "`",
        f"- model: {shape_line(args)}; inputs {fmt_bytes(sum(p.stat().st_size for p in inputs))}",
        "- each run a fresh process tree (`python -m torch.distributed.run --nproc-per-node N -m lowmem_merge merge "
        "... --device cpu`, gloo; 1 = a plain process); wall includes interpreter start, imports and the process "
        "group's rendezvous; cold = inputs dropped from the page cache first; speed-up against the first row of the "
        "method; peak RSS per rank (the report's VmHWM); same bytes: every tensor against the first row's output",
        "",
        "| method | processes | torch threads each | wall cold s | speed-up cold | wall warm s | speed-up warm | "
        "peak RSS per rank | same bytes |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    print(text)
    append_results(Path(own.results), text)
    print(f"appended to {own.results}")


if __name__ == "__main__":
    main()
