"""LoRA experts in the covariance rules: the core-space solve (ALGORITHMS.md §2) against the dense path.

Question: how much does keeping LoRA experts as factors save for actmat and wudi_cfs on one large layer, and how close
is each path to the rule computed in fp64? The dense path is what lowmerge does when any expert of a matrix is a full checkpoint:
Δt = s·B·A formed, A = Σ ΔtᵀΔt (n×n), N = Σ Δt(ΔtᵀΔt), an n×n solve. The core path keeps (B, A) and solves in the
span of the stacked A rows (k = r·T dimensions). Both run through the method classes the stream uses.

Run:  python bench/lora_core.py [--m 4096 --n 4096 --rank 16 --experts 4]   (appends to bench/RESULTS.md)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import reference as ref  # noqa: E402  (the tests' fp64 rules)

from lowmem_merge.info import TensorClass, TensorInfo  # noqa: E402
from lowmem_merge.methods import REGISTRY  # noqa: E402
from lowmem_merge.methods.covariance import Factors  # noqa: E402


def run(name: str, factors: list[tuple[torch.Tensor, torch.Tensor]], dense: bool) -> tuple[float, torch.Tensor]:
    m, n = factors[0][0].shape[0], factors[0][1].shape[1]
    cls = REGISTRY[name]
    start = time.perf_counter()
    method = cls(TensorInfo("layer.weight", (m, n), TensorClass.LIN), len(factors), cls.Params())
    for t, (b, a) in enumerate(factors):
        method.add(t, b @ a if dense else Factors(b, a))  # dense: the stream's s·B·A, then the method's work
    out = method.finalize()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    factors = [(0.01 * torch.randn(args.m, args.rank, generator=g), torch.randn(args.rank, args.n, generator=g))
               for _ in range(args.experts)]
    run("actmat", [(b[:8], a[:, :8]) for b, a in factors], False)  # warm-up
    taus = [(b @ a).double() for b, a in factors]
    fp64 = {"actmat": lambda: ref.actmat_matrix(taus, 1e-3), "wudi_cfs": lambda: ref.wudi_cfs_matrix(taus, 1e-5)}
    rows = []
    for name in ("actmat", "wudi_cfs"):
        t_dense, dense = run(name, factors, True)
        t_core, core = run(name, factors, False)
        want = fp64[name]()
        err = [float((x.double() - want).norm() / want.norm()) for x in (dense, core)]
        rows.append(f"| `{name}` | {t_dense:.3g} | {t_core:.3g} | {t_dense / t_core:.0f}× | {err[0]:.2e} | "
                    f"{err[1]:.2e} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = "+dirty" if subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip() else ""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"\n## lora_core — {now} — {commit}{dirty}\n",
        "Question: what does the core-space solve save for LoRA experts in the covariance rules, and how close is "
        "each path to the fp64 rule?\n",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, Python {platform.python_version()}",
        f"- command: `python bench/lora_core.py --m {args.m} --n {args.n} --rank {args.rank} "
        f"--experts {args.experts}`",
        f"- layer {args.m}×{args.n}, {args.experts} LoRA experts of rank {args.rank} (B ~ 0.01·N(0,1), A ~ N(0,1)), "
        "fp32 on the CPU; dense = the method given s·B·A (what happens when any expert of the matrix is a full "
        "checkpoint), core = the method given the factors; time = add every expert + finalize, one run after a "
        "warm-up",
        "",
        "| method | dense s | core s | speed-up | dense error vs fp64 | core error vs fp64 |",
        "|---|---|---|---|---|---|",
        *rows,
        "- error: ‖x − ref‖ / ‖ref‖ against the rule in fp64 on the dense Δt (tests/reference.py)",
    ])
    with args.results.open("a") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
