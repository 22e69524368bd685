"""Task-vector diagnostics for `lowmerge inspect --stats`: one read of base and experts, by the merge's own stream.

For every merged tensor (LIN, EMB, VEC, CONV; TIED aliases, heads and integer buffers are not read):
  G[s, t] = ⟨Δs, Δt⟩ (T×T, fp64) gives ‖Δt‖ = √G[t, t] and cos(Δs, Δt) = G[s, t] / (‖Δs‖ ‖Δt‖).
LIN only:
  γ, ACE's heterogeneity of s_t = ‖Δt‖² (ALGORITHMS.md §3, the function ace.py uses): γ > τ takes ACE's
  normalized branch;
  the spectrum of ACTMat's A = Σ_t ΔtᵀΔt (n×n, fp64, no ridge; §2) when n ≤ ``cond_max_dim``: condition number
  λmax/λmin and numerical rank (eigenvalues above n·eps64·λmax). A rank below n (LoRA experts, n > T·m) has no
  finite condition number: ``cond`` is None there.
Stacked MoE weights (E, m, n) are E matrices: γ and the condition number are the largest over them.

Memory: ⟨Δs, Δt⟩ needs every expert's Δ of the same elements at once, so the stream reads row chunks of at most
STACK_ELEMS / T elements and holds the T chunks as one fp64 stack (≤ 32 MiB whatever T), plus A (8n² bytes).
Tensors the stream does not split (stored transposed, GPT-2 Conv1D) are held whole, T of them.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .device import BufferPool, resolve_device, tune_malloc
from .info import TensorClass, TensorInfo
from .methods.ace import AceParams, heterogeneity
from .methods.base import MergeMethod
from .methods.drive import drive
from .names import block_of
from .plan import EXPERT_IS_BASE, Plan
from .stream import MERGED, Piece, Prefetcher, StreamContext, expert_deltas, make_pieces, piece_reads, read_base, \
    read_volume

STACK_ELEMS = 1 << 22       # elements of Δ held across all experts at once (fp64: 32 MiB)
COND_MAX_DIM = 4096         # default largest n whose A = Σ ΔtᵀΔt is formed (8n² bytes, ~2mn² flops per expert)
SCALE_RATIO = 10.0          # max/min total ‖Δt‖ above which experts are "of very different scales": ACTMat's A
                            # weighs each expert by ‖Δt‖² (100× here) and sums/means of Δ follow the largest one


class _Acc:
    """One tensor's accumulators over its row chunks."""

    def __init__(self, info: TensorInfo, n_experts: int, device: torch.device, cond_max_dim: int) -> None:
        self.info = info
        self.gram = torch.zeros(n_experts, n_experts, dtype=torch.float64, device=device)   # G, (T, T)
        n = info.shape[-1]
        self.matrix = info.cls == TensorClass.LIN and len(info.shape) == 2
        self.want_a = info.cls == TensorClass.LIN and n <= cond_max_dim
        self.a = torch.zeros(n, n, dtype=torch.float64, device=device) if self.want_a and self.matrix else None
        self.gammas: list[float] = []                   # stacked MoE: one per matrix
        self.spectra: list[tuple[float | None, int]] = []

    def add(self, stack: torch.Tensor, piece: Piece) -> None:
        """``stack``: (T, k) fp64, the T experts' Δ of ``piece`` (rows in the method's orientation)."""
        self.gram.addmm_(stack, stack.T)
        if self.info.cls != TensorClass.LIN:
            return
        if self.matrix:
            if self.a is not None:
                d = stack.view(-1, self.info.shape[-1])   # (T·rows, n): A += Σ_t Δtᵀ Δt over these rows
                self.a.addmm_(d.T, d)
            return
        *_, m, n = self.info.shape                          # whole matrices: the stream splits only the E axis
        mats = stack.view(stack.shape[0], -1, m, n)
        for j in range(mats.shape[1]):
            one = mats[:, j]                                # (T, m, n)
            self.gammas.append(heterogeneity(one.square().sum((1, 2)).tolist()))
            if self.want_a:
                d = one.reshape(-1, n)
                self.spectra.append(_spectrum(d.T @ d))

    def result(self) -> tuple[dict, torch.Tensor]:
        """The tensor's JSON entry and its G (CPU, fp64)."""
        g = self.gram.cpu()
        entry = {"name": self.info.name, "class": self.info.cls.value, **_norms_cosines(g)}
        if self.info.cls == TensorClass.LIN:
            if self.matrix:
                self.gammas = [heterogeneity(g.diagonal().tolist())]
                if self.a is not None:
                    self.spectra = [_spectrum(self.a)]
            finite = [x for x in self.gammas if not math.isnan(x)]
            entry["gamma"] = max(finite) if finite else None       # T = 1: no variance
            if self.spectra:
                conds = [c for c, _ in self.spectra]
                entry["cond"] = None if None in conds else max(conds)
                entry["rank"] = min(r for _, r in self.spectra)
                entry["n"] = self.info.shape[-1]
        return entry, g


def _spectrum(a: torch.Tensor) -> tuple[float | None, int]:
    """(λmax/λmin or None when singular, numerical rank) of the symmetric PSD ``a`` (n×n, fp64)."""
    ev = torch.linalg.eigvalsh(a)                         # ascending
    top = float(ev[-1])
    if top <= 0.0:
        return None, 0
    n = a.shape[0]
    rank = int((ev > top * n * torch.finfo(torch.float64).eps).sum())
    return (top / float(ev[0]) if rank == n else None), rank


def _norms_cosines(g: torch.Tensor) -> dict:
    """‖Δt‖ and the cosine matrix (None where a Δ is zero) from G."""
    norms = g.diagonal().clamp(min=0).sqrt().tolist()
    cos = [[float(g[s, t]) / (norms[s] * norms[t]) if norms[s] > 0 and norms[t] > 0 else None
            for t in range(len(norms))] for s in range(len(norms))]
    return {"norms": norms, "cosine": cos}


def collect_stats(plan: Plan, device: str = "auto", cond_max_dim: int = COND_MAX_DIM,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Per-tensor, per-layer and whole-model diagnostics and the warnings they raise (module docstring).

    Reads every merged tensor of the base and of each expert once; ``progress(done_bytes, total_bytes)``.
    """
    dev = resolve_device(device)
    tune_malloc()                    # as a merge does: freed stacks go back to the OS instead of a fragmenting heap
    t_count = plan.n_experts
    pieces = [p for p in make_pieces(plan, _Stack, None, max(1, STACK_ELEMS // t_count))
              if p.info.cls in MERGED and p.target == p.info.name]
    total, done = read_volume(plan, pieces, 1), [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress:
            progress(done[0], total)

    ctx = StreamContext(plan, _Stack, None, dev, tick, BufferPool(pin=dev.type == "cuda"))
    by_name = {i.name: i for i in plan.tensors}
    fetch = Prefetcher((r for p in pieces for r in piece_reads(plan, p, 1)), ctx.pool, ctx.prefetch_bytes)
    results: list[tuple[dict, torch.Tensor]] = []
    acc: _Acc | None = None
    try:
        for piece in pieces:
            if acc is None or acc.info.name != piece.info.name:
                if acc is not None:
                    results.append(acc.result())
                acc = _Acc(by_name[piece.info.name], t_count, dev, cond_max_dim)
            acc.add(_read_stack(ctx, piece, fetch), piece)
        if acc is not None:
            results.append(acc.result())
    finally:
        fetch.close()
    return _summarize(plan, results, dev, cond_max_dim)


def _read_stack(ctx: StreamContext, piece: Piece, fetch: Prefetcher) -> torch.Tensor:
    """(T, k) fp64 on the device: row t is expert t's Δ of ``piece``, as the merge forms it (LoRA, transposes)."""
    base = read_base(ctx, piece, fetch)
    delta, added = expert_deltas(ctx, piece, base, fetch)
    stack, _ = drive(_Stack, None, piece.info, ctx.plan.n_experts, delta, added=added)
    ctx.pool.give(base)
    return stack


class _Stack(MergeMethod):
    """Not a merge rule: the stream's one driver (``drive``) runs it to gather the T experts' Δ of a piece as the
    rows of one fp64 (T, k) stack, the input of every statistic here."""
    name = "stack"
    summary = "the experts' task vectors of one piece, stacked (inspect --stats)"

    def add(self, t: int, delta: torch.Tensor, pass_: int = 0) -> None:
        if t == 0:
            self.stack = torch.empty(self.n_experts, delta.numel(), dtype=torch.float64, device=delta.device)
        self.stack[t].copy_(delta.reshape(-1))

    def finalize(self) -> torch.Tensor:
        return self.stack

    @classmethod
    def row_chunkable(cls, params: object, info: TensorInfo) -> bool:
        return True


def _summarize(plan: Plan, results: list[tuple[dict, torch.Tensor]], dev: torch.device, cond_max_dim: int) -> dict:
    t_count = plan.n_experts
    groups: dict[str, list[tuple[dict, torch.Tensor]]] = {}
    for entry, g in results:
        groups.setdefault(block_of(entry["name"]), []).append((entry, g))
    layers = [_layer_row(name, members, t_count) for name, members in groups.items()]
    total = _norms_cosines(sum((g for _, g in results), torch.zeros(t_count, t_count, dtype=torch.float64)))
    return {"device": str(dev), "tau": AceParams().tau, "cond_max_dim": cond_max_dim,
            "experts": [str(e.path) for e in plan.experts], "total": total, "layers": layers,
            "tensors": [entry for entry, _ in results], "warnings": _warnings(plan, total["norms"])}


def _layer_row(name: str, members: list[tuple[dict, torch.Tensor]], t_count: int) -> dict:
    """A layer's norms and cosines over its tensors taken as one vector; γ and condition number: the largest."""
    g = sum((g for _, g in members), torch.zeros(t_count, t_count, dtype=torch.float64))
    lin = [e for e, _ in members if e["class"] == TensorClass.LIN.value]
    gammas = [e["gamma"] for e in lin if e.get("gamma") is not None]
    with_a = [e for e in lin if "cond" in e]
    conds = [e["cond"] for e in with_a if e["cond"] is not None]
    return {"name": name, "tensors": len(members), **_norms_cosines(g),
            "gamma_max": max(gammas) if gammas else None, "cond_max": max(conds) if conds else None,
            "singular": sum(e["cond"] is None for e in with_a), "cond_tensors": len(with_a)}


def _warnings(plan: Plan, norms: list[float]) -> list[str]:
    """Experts equal to the base, experts of very different scales, tied embeddings."""
    out = []
    told = {w.fields["expert"] for w in plan.warnings if w.kind == EXPERT_IS_BASE}
    for t, (ex, norm) in enumerate(zip(plan.experts, norms)):
        if norm == 0.0 and t not in told:
            out.append(f"expert {t} ({ex.path}) equals the base on every tensor (‖Δ‖ = 0): it adds nothing and "
                       f"dilutes every mean")
    nonzero = [(n, t) for t, n in enumerate(norms) if n > 0.0]
    if len(nonzero) >= 2:
        (lo, i), (hi, j) = min(nonzero), max(nonzero)
        if hi > SCALE_RATIO * lo:
            out.append(f"experts of very different scales: total ‖Δ‖ {lo:.3g} (expert {i}) to {hi:.3g} (expert {j}), "
                       f"{hi / lo:.0f}× > {SCALE_RATIO:g}×: sums and means of Δ follow expert {j}, and ACTMat's A "
                       f"weighs each expert by ‖Δ‖²; check the experts, or weight them (average -p weights=...)")
    tied = [i for i in plan.tensors if i.cls == TensorClass.TIED]
    out += [f"tied embeddings: {i.name} is written as the merged {i.tied_to} (the EMB rule), not merged as a LIN "
            f"layer" for i in tied]
    if not tied and (plan.base.config or {}).get("tie_word_embeddings"):
        out.append("tied embeddings (tie_word_embeddings): the output projection is the input embedding, merged by "
                   "the EMB rule, not as a LIN layer")
    return out


def stats_lines(stats: dict) -> list[str]:
    """The per-layer table, the whole-model line and the warnings, for the terminal."""
    t_count = len(stats["experts"])
    width = max([len(r["name"]) for r in stats["layers"]] + [5])
    lines = [f"task vectors per layer (γ > τ = {stats['tau']:g}: ACE's normalized branch; cond: A = Σ ΔtᵀΔt of LIN "
             f"tensors, n ≤ {stats['cond_max_dim']}):",
             f"  {'layer':{width}s}  " + " ".join(f"{f'‖Δ_{t}‖':>9s}" for t in range(t_count))
             + f"  {'cos min..max':>13s}  {'γ max':>7s}  {'cond max':>9s}"]
    for r in stats["layers"] + [{"name": "total", **stats["total"]}]:
        norms = " ".join(f"{n:9.3g}" for n in r["norms"])
        lines.append(f"  {r['name']:{width}s}  {norms}  {_cos_range(r['cosine']):>13s}  "
                     f"{_gamma(r.get('gamma_max'), stats['tau']):>7s}  {_cond(r):>9s}")
    return lines + [f"warning: {w}" for w in stats["warnings"]]


def _cos_range(cos: list[list[float | None]]) -> str:
    off = [c for s, row in enumerate(cos) for t, c in enumerate(row) if s < t and c is not None]
    return f"{min(off):+.2f}..{max(off):+.2f}" if off else "-"


def _gamma(g: float | None, tau: float) -> str:
    return "-" if g is None else f"{g:.3f}" + ("*" if g > tau else " ")


def _cond(row: dict) -> str:
    if not row.get("cond_tensors"):
        return "-"
    if row["singular"]:
        return f"∞ ({row['singular']})"
    return f"{row['cond_max']:.2e}"
