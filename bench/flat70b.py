"""Is every elementwise, geometric and data-free matrix rule flat at 70B x 8? Two measurements (issue 17, section 3):

1. `inspect`'s plan on a header-only 70B-shaped model (hidden 8192, intermediate 28672, 80 layers, 8 KV heads,
   vocab 128256, bf16, base + 8 experts): sparse files, the safetensors header written and the file truncated to
   its full size, so the plan reads nothing else.
2. A 70B-shaped slice with real random bf16 data (one full layer at 8192/28672, the 128256x8192 embedding and LM
   head, base + 3 experts: ~6 GB a model), merged by every rule in its own `lowmerge merge` subprocess; each
   measured peak RSS (the report's VmHWM) must sit under `inspect`'s estimate and under 1 GB (8 GB for the matrix
   rules actmat, wudi_cfs, wudi, ace, tsv, iso_c, iso_cts: their tall LIN tensors in row chunks, a down_proj-like
   matrix whole, its n×n statistic packed in tiles or worked in row blocks). `--hidden` etc. shrink the slice where
   the matrix rules' O(m·n²) products would take hours on a small CPU.

Not in CI: the slice is ~24 GB on disk (check `df -h`; the files are deleted afterwards) and every rule reads it
once per pass. Appends its tables to bench/RESULTS.md line by line as each is known (a run stopped early keeps
the rules it measured).

Run:  python bench/flat70b.py [--plan-only] [--rules slerp,sce] [--layers 1 --vocab 128256 --hidden 8192 ...]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from lowmem_merge.demo import LlamaShape, build_example, write_header_only  # noqa: E402
from lowmem_merge.budget import RUNTIME_BYTES, largest_piece, piece_bytes  # noqa: E402
from lowmem_merge.inspect import describe_plan  # noqa: E402
from lowmem_merge.io.checkpoint import open_checkpoint  # noqa: E402
from lowmem_merge.methods import REGISTRY  # noqa: E402
from lowmem_merge.plan import make_plan  # noqa: E402
from lowmem_merge.stream import make_pieces  # noqa: E402

# rule -> (experts it takes, -p parameters): the rules of issue 17 section 3
RULES = {
    "slerp": (1, ["t=0.3"]),
    "multislerp": (None, []),
    "nuslerp": (2, []),
    "sce": (None, ["select_topk=0.1"]),
    "karcher": (None, ["max_iter=3"]),
    "arcee_fusion": (1, []),
    "nearswap": (1, []),
    "model_stock": (None, []),
    "della": (None, []),
    "breadcrumbs": (None, []),
    "actmat": (None, []),
    "wudi_cfs": (None, []),
    "wudi": (None, ["steps=20"]),      # memory does not depend on the steps; 300 Adam steps per matrix take long
    "ace": (None, []),
    "tsv": (None, []),
    "iso_c": (None, []),
    "iso_cts": (None, []),
}
TARGET = 1 << 30
MATRIX_TARGET = 8 * 10**9
MATRIX_RULES = {"actmat", "wudi_cfs", "wudi", "ace", "tsv", "iso_c", "iso_cts"}


def target(rule: str) -> int:
    return MATRIX_TARGET if rule in MATRIX_RULES else TARGET


WORK = REPO / "bench" / "_work" / "flat70b"


def experts_for(rule: str, experts: list[Path]) -> list[Path]:
    n = RULES[rule][0]
    return experts if n is None else experts[:n]


def planned(base: Path, experts: list[Path], rule: str) -> int:
    return describe_plan(base, experts_for(rule, experts))["methods"][rule]["peak_bytes"]


def planned_detail(base: Path, experts: list[Path], rule: str) -> tuple[int, str, int]:
    """inspect's peak, the tensor that sets it, and the LM head's own piece estimate (runtime included)."""
    with contextlib.ExitStack() as stack:
        plan = make_plan(stack.enter_context(open_checkpoint(base)),
                         [stack.enter_context(open_checkpoint(e)) for e in experts_for(rule, experts)])
        cls = REGISTRY[rule]
        params = cls.Params()
        pieces = make_pieces(plan, cls, params)
        need, largest = largest_piece(plan, pieces, cls, params)
        head = max(piece_bytes(plan, p, cls, params) for p in pieces if p.info.name == "lm_head.weight")
    return need + RUNTIME_BYTES, largest, head + RUNTIME_BYTES


def measured(base: Path, experts: list[Path], rule: str, out: Path) -> tuple[int, float]:
    """Peak RSS (bytes) of a real `lowmerge merge` subprocess and its wall time."""
    args = [a for p in RULES[rule][1] for a in ("-p", p)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lowmem_merge", "merge", str(base), *map(str, experts_for(rule, experts)),
                    "-o", str(out), "--method", rule, "--device", "cpu", "-q", "--force", *args], check=True)
    wall = time.perf_counter() - start
    peak = json.loads((out / "lowmerge_report.json").read_text())["memory"]["peak_rss_bytes"]
    shutil.rmtree(out)
    return peak, wall


def gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-only", action="store_true", help="only the header-only 70B x 8 plan")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md", help="markdown file appended to")
    a = ap.parse_args()
    rules = a.rules.split(",")
    results = open(a.results, "a")    # each line as it is known: a run stopped early keeps them
    lines = [f"\n## Every elementwise, geometric and data-free matrix rule at 70B x 8 ({datetime.date.today()}, "
             "bench/flat70b.py)\n",
             f"`python bench/flat70b.py {' '.join(sys.argv[1:])}` on {platform.machine()} "
             f"({platform.system()}), CPU, a machine shared with other work.\n"]
    shape70 = LlamaShape(hidden=8192, intermediate=28672, layers=80, vocab=128256, heads=64, kv_heads=8)
    root = WORK / "header"
    shutil.rmtree(root, ignore_errors=True)
    base, experts = write_header_only(root, shape70, 8)
    lines += ["`inspect` on the header-only 70B model, base + 8 experts (1.3 TB per read, sparse files):\n",
              "| rule | planned peak | set by | LM head alone | target |", "|---|---|---|---|---|"]
    for rule in rules:
        need, largest, head = planned_detail(base, experts, rule)
        lines.append(f"| `{rule}` | {gib(need)} | `{largest}` | {gib(head)} | {gib(target(rule))} |")
    emit(results, lines)
    shutil.rmtree(root)
    if not a.plan_only:
        shape = LlamaShape(hidden=a.hidden, intermediate=a.intermediate, layers=a.layers, vocab=a.vocab,
                           heads=max(1, a.hidden // 128), kv_heads=max(1, a.hidden // 1024))
        root = WORK / "slice"
        shutil.rmtree(root, ignore_errors=True)
        print(f"writing the slice ({shape}) to {root} ...", flush=True)
        base, experts = build_example(root, shape, n_experts=a.experts, dtype=torch.bfloat16)
        lines += [f"\nMeasured on a slice with random bf16 data: {a.layers} layer(s) at {a.hidden}/{a.intermediate}, "
                  f"the {a.vocab}x{a.hidden} embedding and LM head, base + {a.experts} experts:\n",
                  "| rule | parameters | inspect | measured peak RSS | under both | wall |", "|---|---|---|---|---|---|"]
        emit(results, lines)
        try:
            for rule in rules:
                bound = planned(base, experts, rule)
                peak, wall = measured(base, experts, rule, WORK / "out")
                ok = peak <= bound and peak <= target(rule)
                lines.append(f"| `{rule}` | {' '.join(RULES[rule][1]) or '-'} | {gib(bound)} | {gib(peak)} | "
                             f"{'yes' if ok else 'NO'} | {wall:.0f} s |")
                emit(results, lines)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    results.close()


def emit(results, lines: list[str]) -> None:
    """Print and append the lines not yet written (taken from the list), so RESULTS holds what is measured so far."""
    text = "\n".join(lines) + "\n"
    print(text, end="", flush=True)
    results.write(text)
    results.flush()
    lines.clear()


if __name__ == "__main__":
    main()
