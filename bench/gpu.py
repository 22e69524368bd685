"""The covariance rules on a GPU, on 7B-shaped layers: how close to the time it takes to read the inputs, how much
device memory, and the same result as on the CPU?

One run: build (once, under bench/_work/) a synthetic Llama-shaped base and experts with 7B layers (hidden 4096,
intermediate 11008, a few layers, a small vocabulary so the layers dominate), bf16; measure the cold read time of the
inputs (speed.py's floor, read part); then merge each method with `--device cuda` and with `--device cpu`, each in a
fresh subprocess on a cold page cache, and compare the two outputs tensor by tensor (‖W_cuda − W_cpu‖ over
‖W_cpu − W0‖: the error relative to the merged update). Where no CUDA device is present the script says so and
measures the CPU alone. Prints one table and appends it to bench/RESULTS.md.

Run (on the GPU machine):   python bench/gpu.py [--layers 2 --experts 3 --methods actmat,wudi_cfs]
On a CPU alone keep it small: python bench/gpu.py --layers 1 --methods actmat
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import speed  # noqa: E402  (the page-cache and floor helpers; stdlib only at import)


def ensure_example(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    import torch

    from lowmem_merge.demo import LlamaShape, build_example
    root = speed.WORK / f"gpu-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-e{args.experts}"
    marker = root / "complete.json"
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        speed.log(f"building the example in {root} ...")
        shape = LlamaShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, vocab=args.vocab,
                           heads=args.hidden // 128, kv_heads=args.hidden // 128)
        build_example(root, shape, n_experts=args.experts, dtype=torch.bfloat16, shard_size=1 << 30)
        marker.write_text("{}\n")
    return root / "base", sorted(root.glob("expert*"))


def merge(method: str, device: str, base: Path, experts: list[Path], inputs: list[Path]) -> dict:
    out = speed.WORK / f"gpu-out-{method}-{device}"
    shutil.rmtree(out, ignore_errors=True)
    speed.prepare_cache(inputs, cold=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lowmem_merge", "merge", str(base), *map(str, experts), "-o",
                           str(out), "--method", method, "--device", device, "-q"], cwd=REPO, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: {method} on {device} failed:\n{done.stderr}")
    report = json.loads((out / "lowmerge_report.json").read_text())
    return {"out": out, "wall": wall, "total": report["timings_s"]["total"],
            "rss": report["memory"]["peak_rss_bytes"], "device_bytes": report["memory"]["peak_device_bytes"]}


def agreement(a: Path, b: Path, base: Path) -> float:
    """max over tensors of ‖A − B‖ / ‖B − W0‖, read one tensor at a time."""
    from safetensors import safe_open
    worst = 0.0
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb, \
            safe_open(base / "model.safetensors", "pt") as f0:
        for name in fb.keys():
            x, y, w0 = (f.get_tensor(name).double() for f in (fa, fb, f0))
            update = float((y - w0).norm())
            if update > 0:
                worst = max(worst, float((x - y).norm()) / update)
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--methods", default="actmat,wudi_cfs")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = p.parse_args()
    import torch
    cuda = torch.cuda.is_available()
    base, experts = ensure_example(args)
    inputs = speed.input_files(base, experts)
    in_bytes = sum(f.stat().st_size for f in inputs)
    floor = speed.measure_floor(inputs, 0, cold=True)
    speed.log(f"cold read of {speed.fmt_bytes(in_bytes)}: {floor.read_s:.2f} s")
    devices = ["cuda", "cpu"] if cuda else ["cpu"]
    rows = []
    for method in filter(None, args.methods.split(",")):
        runs = {}
        for device in devices:
            speed.log(f"merging with {method} on {device} ...")
            runs[device] = merge(method, device, base, experts, inputs)
        agree = agreement(runs["cuda"]["out"], runs["cpu"]["out"], base) if cuda else None
        for device, r in runs.items():
            dev_mem = speed.fmt_bytes(r["device_bytes"]) if r["device_bytes"] else "—"
            rows.append(f"| `{method}` | {device} | {r['wall']:.1f} | {r['total']:.1f} | "
                        f"{r['total'] / floor.read_s:.2f}× | {speed.fmt_bytes(r['rss'])} | {dev_mem} | "
                        f"{'%.2e' % agree if agree is not None and device == 'cuda' else '—'} |")
            print(rows[-1], flush=True)
        for r in runs.values():
            shutil.rmtree(r["out"], ignore_errors=True)
    gpu_name = torch.cuda.get_device_name(0) if cuda else None
    text = "\n".join([
        f"\n## gpu — {speed.now():%Y-%m-%d %H:%M UTC} — {speed.git_commit()}\n",
        "Question: on a GPU, how close are the covariance rules to the time it takes to read their inputs, how much "
        "device memory do they take, and do they give the CPU's result?\n",
        f"- machine: {speed.machine()}"
        + (f"; GPU: {gpu_name}" if gpu_name else " — no CUDA device here: CPU rows only"),
        f"- command: `python bench/gpu.py --layers {args.layers} --experts {args.experts} --methods {args.methods}`",
        f"- model: Llama-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
        f"{args.vocab}; base + {args.experts} experts, bf16; inputs {speed.fmt_bytes(in_bytes)}, cold read "
        f"{floor.read_s:.2f} s (speed.py's floor, read part)",
        "- each merge in a fresh subprocess on a cold page cache; total = the report's own time (imports excluded); "
        "agreement = max over tensors of ‖W_cuda − W_cpu‖ / ‖W_cpu − W0‖",
        "",
        "| method | device | wall s | total s | total ÷ cold read | peak RSS | peak device memory | agreement vs CPU |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    speed.append_results(args.results, text)
    print(text)


if __name__ == "__main__":
    main()
