"""TSV-M's polar factors: lowmerge's eigh route against Newton–Schulz, in time and in error, on the CPU or a GPU.

Question: issue 17 §2 names a Newton–Schulz polar factor as a way to bring tsv, iso_c and iso_cts near their FLOP
time. On TSV-M's real slot matrices Ū (each expert's top-k left singular vectors side by side; the fp64 SVD of each
Δt of bench/speed.py's model, k = ⌊r/T⌋), how long does each route take, and how far is it from the polar factor
of Ū computed by fp64 LAPACK (``U·Vh`` of its SVD)?

Routes, each on Ū as the merge holds it (fp32) and timed on the device:
- ``polar_`` (methods/matrix_rule.py, what `tsv` runs): the fp64 Gram ŪᵀŪ, its eigh, Ū·G^{-1/2} in fp64 blocks;
- Newton–Schulz, fp32 and fp64: X ← 1.5·X − 0.5·X·(XᵀX) from X = Ū / (1.02·σ₁), σ₁ by 20 steps of the power method,
  until ‖XᵀX − I‖F < TOL (1e-4 fp32, 1e-6 fp64) or MAX_STEPS; a step is two GEMMs (XᵀX and X·G).
The cubic iteration lifts a singular value σ < 1 by about 1.5× a step, so it needs ~log₁.₅ κ(Ū) steps before the
quadratic end: κ(Ū) is printed beside each tensor.

Run (a quiet machine; builds or reuses speed.py's example under bench/_work):
    python bench/polar_routes.py                   # CPU
    python bench/polar_routes.py --device cuda     # a GPU: the same matrices, synchronized timings
Model options are speed.py's (--hidden, --layers, ...); the defaults here are one layer and vocab 8000.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import REPO, append_results, ensure_example, git_commit, log, machine, parse_args, shape_line  # noqa: E402

TENSORS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj")   # square, square, tall (r = hidden)
TOL = {"float32": 1e-4, "float64": 1e-6}
MAX_STEPS = 100
POWER_STEPS = 20


def timed(fn: Callable[[], object], device, repeat: int) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (the device synchronized around each) and the last result."""
    import torch
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def newton_schulz(x, tol: float):
    """(polar factor of x (m ≥ n) by the cubic Newton–Schulz iteration in x's dtype, steps taken)."""
    import torch
    v = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    for _ in range(POWER_STEPS):
        v = x.T @ (x @ v)
        v = v / v.norm()
    x = x / (1.02 * float((x @ v).norm()))
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    for step in range(1, MAX_STEPS + 1):
        g = x.T @ x
        x = torch.addmm(x, x, g, beta=1.5, alpha=-0.5)
        if float(torch.linalg.matrix_norm(g - eye)) < tol:
            return x, step
    return x, MAX_STEPS


def eigh_route(x32):
    """``polar_`` (what `tsv` runs) on a copy of the fp32 matrix."""
    from lowmem_merge.methods.matrix_rule import polar_
    p = x32.clone()
    polar_(p)
    return p


def rel_error(p, want) -> float:
    return float((p.double().cpu() - want).norm() / want.norm())


def slot_matrix(name: str, base: Path, experts: list[Path]):
    """Ū (fp64, m × T·k) of one tensor: each expert's top-k left singular vectors of Δt (fp64 LAPACK)."""
    import torch
    from lowmem_merge.io.checkpoint import open_checkpoint

    def load(path: Path):
        with open_checkpoint(path) as ck:
            return ck.read(name).double()
    w0 = load(base)
    deltas = [load(e) - w0 for e in experts]
    r = min(w0.shape)
    k = r // len(deltas)
    cols = []
    for d in deltas:
        u, _, _ = torch.linalg.svd(d, full_matrices=False)
        cols.append(u[:, :k])
    return torch.cat(cols, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--repeat", type=int, default=2, help="timed calls per route; the fastest is kept")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    own, rest = ap.parse_known_args()
    args = parse_args(["--layers", "1", "--vocab", "8000", *rest, "--results", own.results])   # speed.py's model
    import torch
    device = torch.device(own.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {own.device}, but torch sees no CUDA device here (--device cpu runs it)")
    base, experts, _ = ensure_example(args)
    rows = []
    for short in TENSORS:
        name = f"model.layers.0.{short}.weight"
        ubar = slot_matrix(name, base, experts)
        u, s, vh = torch.linalg.svd(ubar, full_matrices=False)
        want, kappa = u @ vh, float(s[0] / s[-1])
        x32 = ubar.float().to(device)
        t, p = timed(lambda: eigh_route(x32), device, own.repeat)
        rows.append((short, tuple(ubar.shape), kappa, "polar_ (fp64 Gram + eigh)", t, "-", rel_error(p, want)))
        for dtype in ("float32", "float64"):
            x = ubar.to(device, getattr(torch, dtype))
            t, (p, steps) = timed(lambda: newton_schulz(x, TOL[dtype]), device, own.repeat)
            rows.append((short, tuple(ubar.shape), kappa, f"Newton–Schulz {dtype}", t, str(steps),
                         rel_error(p, want)))
        for row in rows[-3:]:
            log(" | ".join(map(str, row)))
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"\n## polar_routes — {now:%Y-%m-%d %H:%M} UTC — {git_commit()}\n",
        "Question: on TSV-M's slot matrices Ū, how long do lowmerge's eigh route and Newton–Schulz (fp32, fp64) take "
        "to the polar factor, and how far is each from fp64 LAPACK's?\n",
        f"- machine: {machine()}; device {device}",
        f"- command: `{shlex.join(['python', 'bench/polar_routes.py', *sys.argv[1:]])}`",
        f"- model: {shape_line(args)}; Ū = each expert's top-⌊r/T⌋ left singular vectors of Δt (fp64 SVD)",
        f"- time: best of {own.repeat}; error: ‖P − U·Vh‖F / ‖U·Vh‖F against fp64 LAPACK's SVD of Ū; Newton–Schulz "
        f"stops at ‖XᵀX − I‖F < {TOL['float32']:g} (fp32) / {TOL['float64']:g} (fp64)",
        "",
        "| tensor | Ū | κ(Ū) | route | time s | steps | error |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| `{n}` | {m}×{k} | {kappa:.3g} | {route} | {t:.3f} | {steps} | {err:.1e} |"
              for n, (m, k), kappa, route, t, steps, err in rows]
    text = "\n".join(lines)
    print(text)
    append_results(Path(own.results), text)


if __name__ == "__main__":
    main()
