"""How much memory one piece of a merge needs, from the plan alone (no tensor is read)."""
from __future__ import annotations

from typing import Any

from .errors import BudgetError
from .methods.base import MergeMethod
from .plan import Plan
from .sizes import format_size
from .stream import MERGED, PREFETCH_BYTES, Piece, request_bytes

RUNTIME_BYTES = 230 << 20   # Python, torch and lowmerge loaded, measured on Linux x86-64 (torch 2.13 CPU)


def piece_bytes(plan: Plan, piece: Piece, method: type[MergeMethod], params: Any) -> int:
    """Buffers for one piece: the method's statistics, Δ and the result in fp32, the base and one expert piece as
    read, the read-ahead, and two output pieces with the writer."""
    if piece.info.cls not in MERGED:
        return request_bytes(plan.base, piece.info.name, piece.rows)
    stored = request_bytes(plan.base, piece.info.name, piece.rows)
    return method.state_bytes(piece.info, plan.n_experts, params) + 8 * piece.info.numel \
        + 4 * stored + max(PREFETCH_BYTES, stored)


def largest_piece(plan: Plan, pieces: list[Piece], method: type[MergeMethod], params: Any) -> tuple[int, str]:
    """The most any one piece needs, and the tensor it belongs to."""
    return max(((piece_bytes(plan, p, method, params), p.info.name) for p in pieces), default=(0, ""))


def check_budget(plan: Plan, pieces: list[Piece], method: type[MergeMethod], params: Any, budget: int) -> None:
    """Refuse before starting when one piece's buffers exceed ``budget`` (the runtime excluded)."""
    need, name = largest_piece(plan, pieces, method, params)
    if need > budget:
        raise BudgetError(f"needs {format_size(need)} of buffers, more than --max-memory {format_size(budget)}",
                          tensor=name, hint="raise --max-memory or choose an elementwise method")
