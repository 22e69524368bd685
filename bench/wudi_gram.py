"""How much faster is lowmerge's Gram-form WUDI than a straightforward per-expert autograd loop of the same loss, and
do they agree?

One (m, n) LIN layer, random task vectors Δt (rank-r signal plus noise, a different Frobenius norm per expert), for
each T in --experts:
  reference (FusionBench-style, written here): τm = Σ Δt as an nn.Parameter, torch.optim.Adam(lr); each step
      loss = Σ_t (1/‖Δt‖F²)·‖(τm − Δt) Δtᵀ‖F², loss.backward(), step; a Python loop over the experts every step.
  lowmerge: ``Wudi`` driven as the engine drives it: one instance with a LIN TensorInfo, ``add(t, Δt)`` per expert
      (the one pass that accumulates A, B, S), then ``finalize()`` (Adam on the gradient 2(τA − B), §4.1).
Both run in fp32 on the CPU with the same lr and steps; wall time of lowmerge includes its accumulation. Reported:
both times, their ratio, ‖τ_ref − τ_lowmerge‖F / ‖τ_lowmerge‖F and the loss before/after for both (the reference's
"after" is one extra forward after the last step, outside its timing). Prints one table and appends it to
bench/RESULTS.md.

Run (on a quiet machine; a few minutes on 2 cores):
    python bench/wudi_gram.py
Tiny check (seconds; keep it out of RESULTS.md):
    python bench/wudi_gram.py --m 128 --n 96 --experts 2,3 --steps 20 --results /tmp/scratch.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from speed import REPO, append_results, cpu_model, fmt_bytes, fmt_s, git_commit, now, ram_bytes

from lowmem_merge.info import TensorClass, TensorInfo
from lowmem_merge.methods.wudi import Wudi, WudiParams

SPEEDUP_TARGET, SPEEDUP_AT = 10.0, 8     # the issue: ≥ 10× at 8 experts
AGREE_TARGET = 1e-4                      # ‖τ_ref − τ_lowmerge‖ / ‖τ_lowmerge‖


def task_vectors(n_experts: int, m: int, n: int, rank: int, seed: int) -> list[torch.Tensor]:
    """Δt = s_t·(U_t V_tᵀ + noise), rows of U_t V_tᵀ ~ 1e-3 per entry, noise 0.3× that, s_t spread over [0.5, 2]:
    fine-tuning-sized entries, a dominant low-rank part, unequal norms so the 1/‖Δt‖² weights matter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(n_experts):
        u = torch.randn(m, rank, generator=g) / rank ** 0.5
        v = torch.randn(n, rank, generator=g)
        noise = 0.3 * torch.randn(m, n, generator=g)
        scale = 0.5 * 4 ** (t / max(n_experts - 1, 1))
        out.append((u @ v.T + noise).mul_(1e-3 * scale))  # (m, n) fp32
    return out


def reference_loss(tau: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_t w_t ‖(τ − Δt) Δtᵀ‖F², one expert at a time, as an autograd graph."""
    loss = tau.new_zeros(())
    for d, w in zip(deltas, weights):
        loss = loss + w * torch.sum(torch.square((tau - d) @ d.T))
    return loss


def run_reference(deltas: Sequence[torch.Tensor], lr: float, steps: int) -> tuple[torch.Tensor, float, float, float]:
    """(τ, wall s, loss before, loss after); the wall covers building τ⁰ and the steps."""
    t0 = time.perf_counter()
    weights = [1.0 / float(torch.sum(d * d)) for d in deltas]
    tau = torch.nn.Parameter(torch.stack(list(deltas)).sum(0))
    opt = torch.optim.Adam([tau], lr=lr)
    before = None
    for _ in range(steps):
        opt.zero_grad()
        loss = reference_loss(tau, deltas, weights)
        before = float(loss.detach()) if before is None else before
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    with torch.no_grad():
        after = float(reference_loss(tau, deltas, weights))
    return tau.detach(), wall, after if before is None else before, after


def run_lowmerge(deltas: Sequence[torch.Tensor], lr: float, steps: int) -> tuple[torch.Tensor, float, float, float]:
    """(τ, wall s, loss before, loss after) from Wudi's own stats; the wall covers add() per expert and finalize()."""
    m, n = deltas[0].shape
    info = TensorInfo(name="layer.weight", shape=(m, n), cls=TensorClass.LIN)
    t0 = time.perf_counter()
    rule = Wudi(info, len(deltas), WudiParams(lr=lr, steps=steps))
    for t, d in enumerate(deltas):
        rule.add(t, d)
    tau = rule.finalize()
    wall = time.perf_counter() - t0
    stats = rule.stats()
    return tau, wall, stats["loss_before"], stats["loss_after"]


@dataclass
class Row:
    experts: int
    ref_s: float
    low_s: float
    rel_diff: float
    ref_loss: tuple[float, float]
    low_loss: tuple[float, float]

    @property
    def speedup(self) -> float:
        return self.ref_s / self.low_s


def measure(n_experts: int, args: argparse.Namespace) -> Row:
    deltas = task_vectors(n_experts, args.m, args.n, args.rank, args.seed)
    low_tau, low_s, *low_loss = run_lowmerge(deltas, args.lr, args.steps)
    ref_tau, ref_s, *ref_loss = run_reference(deltas, args.lr, args.steps)
    rel = float(torch.linalg.matrix_norm(ref_tau - low_tau) / torch.linalg.matrix_norm(low_tau))
    return Row(n_experts, ref_s, low_s, rel, tuple(ref_loss), tuple(low_loss))  # type: ignore[arg-type]


def table(rows: Sequence[Row]) -> list[str]:
    head = ["T", "reference s", "lowmerge s", "speed-up", "‖a−b‖/‖b‖", "loss before ref / lowmerge",
            "loss after ref / lowmerge"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r.experts), fmt_s(r.ref_s), fmt_s(r.low_s), f"{r.speedup:.1f}×", f"{r.rel_diff:.2e}",
            f"{r.ref_loss[0]:.6g} / {r.low_loss[0]:.6g}", f"{r.ref_loss[1]:.6g} / {r.low_loss[1]:.6g}"]) + " |")
    return lines


def verdicts(rows: Sequence[Row]) -> str:
    at = [r for r in rows if r.experts == SPEEDUP_AT]
    speed = (f"{at[0].speedup:.1f}× at T = {SPEEDUP_AT}: {'met' if at[0].speedup >= SPEEDUP_TARGET else 'not met'}"
             if at else f"T = {SPEEDUP_AT} not run")
    worst = max(r.rel_diff for r in rows)
    agree = f"worst ‖a−b‖/‖b‖ {worst:.2e}: {'met' if worst <= AGREE_TARGET else 'not met'}"
    return (f"Targets: speed-up ≥ {SPEEDUP_TARGET:g}× at T = {SPEEDUP_AT} ({speed}); agreement within "
            f"{AGREE_TARGET:g} relative ({agree}).")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    ram = ram_bytes()
    return (f"{cpu_model()}, {os.cpu_count()} cores, RAM {fmt_bytes(ram) if ram else 'unknown'}, GPU {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}")


def render(rows: Sequence[Row], args: argparse.Namespace, when: datetime.datetime, commit: str, command: str) -> str:
    lines = [
        f"## wudi_gram — {when:%Y-%m-%d %H:%M} UTC — {commit}",
        "",
        "Question: how much faster is lowmerge's Gram-form WUDI than a straightforward per-expert autograd loop of "
        "the same loss, and do they agree?",
        "",
        f"- machine: {machine()}",
        f"- command: `{command}`",
        f"- layer: {args.m}×{args.n} fp32 on the CPU; Δt = s_t·(rank-{args.rank} signal + 0.3× noise)·1e-3, "
        f"s_t from 0.5 to 2 (geometric), seed {args.seed}; Adam lr {args.lr:g}, {args.steps} steps, both sides",
        "- reference: τm = Σ Δt as nn.Parameter, torch.optim.Adam(lr); per step "
        "Σ_t (1/‖Δt‖F²)·‖(τm − Δt) Δtᵀ‖F², a Python loop over experts, loss.backward(), step. "
        "lowmerge: `Wudi(TensorInfo(LIN))`, `add(t, Δt)` per expert, `finalize()`; its time includes the "
        "accumulation of A, B, S. One run each after an untimed warm-up on a 64×48 layer; a = reference, b = lowmerge",
        "",
        *table(rows),
        "",
        verdicts(rows),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--m", type=int, default=1024, help="rows (d_out) of the layer")
    p.add_argument("--n", type=int, default=1024, help="columns (d_in) of the layer")
    p.add_argument("--experts", default="2,4,8", help="comma list of expert counts T")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rank", type=int, default=16, help="rank of each task vector's signal part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md", help="markdown file appended to")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    counts = [int(s) for s in args.experts.split(",") if s.strip()]
    when, commit = now(), git_commit()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    warm = task_vectors(2, 64, 48, 4, args.seed)  # first-call costs (Adam, kernels) kept out of the timings
    run_lowmerge(warm, args.lr, 3)
    run_reference(warm, args.lr, 3)
    rows = []
    for n_experts in counts:
        print(f"T = {n_experts} ...", file=sys.stderr, flush=True)
        rows.append(measure(n_experts, args))
    text = render(rows, args, when, commit, command)
    print(text)
    append_results(args.results, text)
    print(f"appended to {args.results}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
