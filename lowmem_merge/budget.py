"""How much memory one piece of a merge needs, from the plan alone (no tensor is read), and how to run within a
budget: smaller row chunks (with a shorter read-ahead) for elementwise rules, the CPU for a tensor whose statistics
do not fit the device, or a refusal before anything starts."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import BudgetError
from .methods.base import MergeMethod
from .plan import Plan
from .sizes import format_size
from . import stream
from .stream import MERGED, PREFETCH_BYTES, Piece, make_pieces, request_bytes

RUNTIME_BYTES = 230 << 20   # Python, torch and lowmerge loaded, measured on Linux x86-64 (torch 2.13 CPU)
TOKENIZER_RUNTIME_BYTES = 160 << 20   # transformers and the models' tokenizers, when vocabularies are matched by
                                      # token (bench/vocab.py: +114-116 MiB peak with 32000-token vocabularies)
COMPUTE_BYTES = 64 << 20    # beside a piece merged alone: what a process holds once it has run large GEMMs and
                            # factorizations and RUNTIME_BYTES (at import) does not: MKL's cached GEMM buffers and
                            # LAPACK's workspaces. An actmat merge solving a whole 8000x512 lm_head peaked 29 MiB over
                            # the two phases without it, 13 MiB less with MKL_DISABLE_FAST_MM=1 (torch 2.13 CPU, MKL)
SHRINK_STEPS = 6            # row chunks down to CHUNK_ELEMS / 64 (64K elements) and read-ahead to 1 MiB
DEVICE_HEADROOM = 0.9       # of the device memory free at the start: the CUDA context and allocator need the rest


@dataclass(frozen=True)
class Strategy:
    """How the stream runs: its pieces, the read-ahead, and the tensors computed on the CPU instead of the device."""
    pieces: list[Piece]
    chunk_elems: int
    prefetch_bytes: int
    cpu_tensors: frozenset[str]
    peak_bytes: int             # the largest piece's host buffers (the runtime excluded)

    def describe(self) -> dict:
        return {"chunk_elems": self.chunk_elems, "prefetch_bytes": self.prefetch_bytes,
                "cpu_tensors": sorted(self.cpu_tensors), "peak_buffer_bytes": self.peak_bytes}


def piece_bytes(plan: Plan, piece: Piece, method: type[MergeMethod], params: Any,
                prefetch: int = PREFETCH_BYTES) -> int:
    """Buffers for one piece: the method's statistics, Δ and the result in fp32, the base and one expert piece as
    read, the read-ahead, two output pieces with the writer, and the idle buffers the pool keeps (as many bytes as
    the read-ahead: the stream sizes both alike)."""
    if piece.info.cls not in MERGED:
        return request_bytes(plan.base, piece.info.name, piece.rows)
    stored = request_bytes(plan.base, piece.info.name, piece.rows)
    phases = stream.alone_bytes(method, params, piece, plan.n_experts)
    if phases is not None:
        return alone_piece_bytes(piece, phases, stored, prefetch)
    return state_bytes(plan, piece, method, params) + 8 * piece.info.numel \
        + 4 * stored + max(prefetch, stored) + prefetch


def alone_piece_bytes(piece: Piece, phases: tuple[int, int], stored: int, prefetch: int) -> int:
    """A piece merged alone (stream.alone_bytes: nothing read ahead, the writer idle before it), the larger of its
    two phases. Adding: the rule's bytes, Δ in fp32 and the base piece, and the expert's piece as read while it
    becomes Δ (a transposed one with Δ's contiguous copy). Finishing: the rule's bytes (the result among them), the
    base piece and the output piece (cast once the rule's statistics are freed). The pool's idle buffers and
    COMPUTE_BYTES in both."""
    adding, finishing = phases
    numel = piece.info.numel
    converting = 4 * numel if piece.info.transposed else 0
    return max(adding + 4 * numel + 2 * stored + converting, finishing + 2 * stored) + prefetch + COMPUTE_BYTES


def state_bytes(plan: Plan, piece: Piece, method: type[MergeMethod], params: Any, cuda: bool = False) -> int:
    """The method's statistics for one piece (``cuda``: on a CUDA device); for a piece of a tensor its per-tensor
    prepass covers (a matrix rule's tall LIN tensor), what that prepass declares: its state, held while every piece
    merges, and the piece's own."""
    pre = method.prepass_for(params)
    if pre is not None and pre.scope == "tensor":
        entry = plan.entry(piece.info.name)
        whole = piece.info if piece.rows is None else replace(piece.info, shape=tuple(entry.shape), row_start=0)
        held = pre.piece_bytes(whole, piece.info, plan.n_experts, params) if pre.covers(params, whole) else None
        if held is not None:
            return held
    return (method.cuda_state_bytes if cuda else method.state_bytes)(piece.info, plan.n_experts, params)


def device_bytes(plan: Plan, piece: Piece, method: type[MergeMethod], params: Any) -> int:
    """Device memory for one piece: the statistics, Δ and the result in fp32, and the base piece as stored."""
    if piece.info.cls not in MERGED:
        return 0
    stored = request_bytes(plan.base, piece.info.name, piece.rows)
    return state_bytes(plan, piece, method, params, cuda=True) + 8 * piece.info.numel + stored


def largest_piece(plan: Plan, pieces: list[Piece], method: type[MergeMethod], params: Any,
                  prefetch: int = PREFETCH_BYTES) -> tuple[int, str]:
    """The most any one piece needs, and the tensor it belongs to."""
    return max(((piece_bytes(plan, p, method, params, prefetch), p.info.name) for p in pieces), default=(0, ""))


def choose_strategy(plan: Plan, method: type[MergeMethod], params: Any, budget: int | None = None,
                    device_budget: int | None = None) -> Strategy:
    """The largest row chunks (and read-ahead) whose buffers fit ``budget``; BudgetError naming the tensor if even
    the smallest do not (a matrix rule's LIN statistics cannot be chunked). Pieces needing more than
    ``device_budget`` on the device run on the CPU."""
    for step in range(SHRINK_STEPS + 1):
        chunk, prefetch = stream.CHUNK_ELEMS >> step, PREFETCH_BYTES >> step   # read now: tests set it smaller
        pieces = make_pieces(plan, method, params, chunk)
        need, name = largest_piece(plan, pieces, method, params, prefetch)
        if budget is None or need <= budget:
            break
    else:
        raise BudgetError(f"needs {format_size(need)} of buffers, more than --max-memory {format_size(budget)} "
                          f"(even in row chunks of {chunk} elements)", tensor=name,
                          hint="raise --max-memory or choose an elementwise method (they work in row chunks)")
    cpu = frozenset(p.info.name for p in pieces
                    if device_budget is not None and device_bytes(plan, p, method, params) > device_budget)
    return Strategy(pieces, chunk, prefetch, cpu, need)


def device_budget(device: torch.device, given: int | None) -> int | None:
    """Bytes of device memory a merge may use: ``given``, else a share of what is free now; None on the CPU."""
    if device.type != "cuda":
        return None
    if given is not None:
        return given
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_HEADROOM)
