"""Per tensor: read the base, then each expert pass by pass, form Δ in fp32 on the device, merge, write, free.

A background thread reads ahead in exactly the order the merge consumes (bounded queue), so disk reads overlap
arithmetic. Elementwise rules on large tensors work in row chunks so their buffers stay bounded.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .device import BufferPool
from .errors import InputError
from .info import TensorClass, TensorInfo
from .io.lora import LoraAdapter, LowRank
from .methods.base import MergeMethod
from .methods.covariance import Factors
from .methods.drive import drive
from .plan import Expert, Plan

MERGED = (TensorClass.LIN, TensorClass.EMB, TensorClass.VEC, TensorClass.CONV)
SLAB = 1 << 17                 # elements per step of a mixed-dtype in-place op: its cast temporary (512 KiB)
                               # stays under the 1 MiB mmap threshold, so the heap reuses it
CHUNK_ELEMS = 1 << 22          # rows per chunk keep one fp32 buffer of an elementwise rule ≤ 16 MiB
PREFETCH_BYTES = 64 << 20      # bytes read ahead of the tensor being merged (at least one tensor)


@dataclass(frozen=True)
class Piece:
    """A whole tensor, or a row range of one, to merge and write to ``target``."""
    info: TensorInfo                   # the source tensor as the method sees it (row_start set for chunks)
    target: str                        # output name (differs from info.name for a TIED alias)
    rows: tuple[int, int] | None       # stored rows, or None for the whole tensor


def make_pieces(plan: Plan, method: type[MergeMethod], params: Any, chunk_elems: int | None = None) -> list[Piece]:
    """Output order. A TIED alias is the canonical tensor merged again (deterministic) and written under its name.
    Row chunks hold at most ``chunk_elems`` elements (CHUNK_ELEMS by default), at least one row."""
    by_name = {i.name: i for i in plan.tensors}
    pieces: list[Piece] = []
    for info in plan.tensors:
        src = by_name[info.tied_to] if info.cls == TensorClass.TIED else info
        pieces.extend(_split(src, info.name, method.row_chunkable(params, src), chunk_elems or CHUNK_ELEMS))
    return pieces


def _split(info: TensorInfo, target: str, chunkable: bool, chunk_elems: int) -> list[Piece]:
    if not (chunkable and info.cls in MERGED and not info.transposed and len(info.shape) >= 2
            and info.numel > chunk_elems):
        return [Piece(info, target, None)]
    rows = info.shape[0]
    step = max(1, chunk_elems // (info.numel // rows))
    return [Piece(replace(info, shape=(min(r + step, rows) - r,) + info.shape[1:], row_start=r), target,
                  (r, min(r + step, rows))) for r in range(0, rows, step)]


class Prefetcher:
    """Reads ``requests`` (checkpoint, tensor name, rows[, held]) in order on a background thread.

    At most ``budget`` bytes wait in the queue (always at least one tensor), and the reader checks the budget
    before it reads, so the memory held ahead of the merge is bounded whatever the timing. A request marked held is
    read only once the consumer has taken everything before it and waits for it: nothing is read ahead of it.
    """

    def __init__(self, requests: Iterable[tuple[Expert, str, tuple[int, int] | None]], pool: BufferPool,
                 budget: int = PREFETCH_BYTES) -> None:
        self._items: deque = deque()
        self._queued = 0
        self._budget = budget
        self._cond = threading.Condition()
        self._stop = False
        self._waiting = False          # the consumer waits in next() for an empty queue
        self._thread = threading.Thread(target=self._run, args=(iter(requests), pool), name="lowmerge-reader",
                                        daemon=True)
        self._thread.start()

    def _run(self, requests: Iterator, pool: BufferPool) -> None:
        try:
            for ckpt, name, rows, *held in requests:
                size = request_bytes(ckpt, name, rows)
                ready = (lambda: not self._items and self._waiting) if held and held[0] else \
                    (lambda: not self._items or self._queued + size <= self._budget)
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or ready())
                    if self._stop:
                        return
                item = ckpt.read(name, rows, pool.take)
                self._push((ckpt, item), size)
        except BaseException as e:  # handed to the consumer, raised in its thread
            self._push((None, e), 0)

    def _push(self, item: tuple, size: int) -> None:
        with self._cond:
            self._items.append((item, size))
            self._queued += size
            self._cond.notify_all()

    def next(self) -> tuple[Expert, torch.Tensor | LowRank]:
        with self._cond:
            self._waiting = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: bool(self._items))
            self._waiting = False
            (ckpt, item), size = self._items.popleft()
            self._queued -= size
            self._cond.notify_all()
        if isinstance(item, BaseException):
            raise item
        return ckpt, item

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._items.clear()
            self._cond.notify_all()
        self._thread.join()


def request_bytes(ckpt: Expert, name: str, rows: tuple[int, int] | None) -> int:
    if isinstance(ckpt, LoraAdapter):
        return ckpt.read_bytes(name, rows)
    entry = ckpt.entries[name]
    return entry.nbytes if rows is None else entry.nbytes // entry.shape[0] * (rows[1] - rows[0])


def read_volume(plan: Plan, pieces: list[Piece], passes: int) -> int:
    """Bytes the stream reads for ``pieces``: the base once, each expert once per pass."""
    return sum(request_bytes(plan.base, p.info.name, p.rows)
               + (passes * sum(request_bytes(e, p.info.name, p.rows) for e in plan.experts)
                  if p.info.cls in MERGED else 0) for p in pieces)


@dataclass
class StreamContext:
    plan: Plan
    method: type[MergeMethod]
    params: Any
    device: torch.device
    progress: Callable[[int], None]          # called with bytes consumed
    pool: BufferPool                         # host buffers: reads, and Δ when the device is the CPU
    prefetch_bytes: int = PREFETCH_BYTES     # read-ahead budget
    cpu_tensors: frozenset[str] = frozenset()  # merged on the CPU: their statistics do not fit the device
    reduce: Callable[[list[torch.Tensor]], None] | None = None  # sums a prepass's counts over torchrun ranks
    params_for: Callable[[TensorInfo], Any] | None = None  # per-tensor parameters (a recipe's gradients, filters)
    calib: Any = None                        # a calibrated rule's walker (calib.Calibration): each tensor's state,
                                             # and each merged tensor handed back to it
    deltas: bool = False                     # write Δ* itself, not W0 + Δ* (--output-format peft, adapter_out.py)


def alone_bytes(method: type[MergeMethod], params: Any, piece: Piece, n_experts: int) -> tuple[int, int] | None:
    """The rule's (adding, finishing) bytes where ``piece`` is merged alone (MergeMethod.phase_bytes: a whole tensor
    of a rule that gives them, not on a per-tensor prepass' path); None for every other piece."""
    if piece.rows is not None or piece.info.cls not in MERGED or prepass_rounds(method, params, "tensor", piece.info):
        return None
    return method.phase_bytes(piece.info, n_experts, params)


def piece_reads(plan: Plan, piece: Piece, passes: int) -> Iterator[tuple[Expert, str, tuple[int, int] | None]]:
    yield plan.base, piece.info.name, piece.rows
    if piece.info.cls in MERGED:
        for _ in range(passes):
            for ex in plan.experts:
                yield ex, piece.info.name, piece.rows


def _fp32(ctx: StreamContext, x: torch.Tensor) -> torch.Tensor:
    """``x`` as fp32 on the device, in a pooled buffer on the CPU; ``x`` goes back to the pool."""
    if ctx.device.type == "cpu":
        d = ctx.pool.take(4 * x.numel()).view(torch.float32).view(x.shape)
        d.copy_(x)
    else:
        d = x.to(ctx.device, torch.float32, non_blocking=True)
    ctx.pool.give(x)
    return d


def _check_finite(t: torch.Tensor, path: object, name: str, hint: str) -> None:
    """One fp32 sum finds any NaN/Inf (it propagates); only then look element by element."""
    if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
        raise InputError("contains NaN or Inf", path=path, tensor=name, hint=hint)


def _inplace(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], acc: torch.Tensor,
             other: torch.Tensor) -> torch.Tensor:
    """``op(acc, other)`` in place, in slabs of SLAB elements when the dtypes differ.

    An in-place op between fp32 and bf16 tensors casts the whole bf16 operand to a temporary first; slab by slab,
    that temporary stays small.
    """
    if acc.dtype == other.dtype or not (acc.is_contiguous() and other.is_contiguous()):
        return op(acc, other)
    for a, b in zip(acc.view(-1).split(SLAB), other.view(-1).split(SLAB)):
        op(a, b)
    return acc


def _delta(ctx: StreamContext, ckpt: Expert, x: torch.Tensor | LowRank, base: torch.Tensor,
           info: TensorInfo) -> torch.Tensor | Factors:
    """Δ = W_t − W_0 (or a LoRA adapter's s·B·A) in fp32 on the device, in the method's orientation; checks that
    it is finite. A LoRA Δ stays factors when the method takes them for this tensor (ALGORITHMS.md §2).

    ``base`` is in its stored dtype and orientation. Takes ``x`` (the reader's buffer); the caller gives the
    result back to the pool after use.
    """
    if isinstance(x, LowRank):
        hint = (f"this adapter's factors are corrupt, or its scale (lora_alpha/r = {x.scale:g}) makes Δ overflow: "
                "re-export it or leave it out")
        if ctx.method.takes_factors(info):
            f = _lora_factors(ctx, x, info)
            for part in (f.b, f.a):
                _check_finite(part, ckpt.path, info.name, hint)
            return f
        d = _lora_delta(ctx, x, info)
        _check_finite(d, ckpt.path, info.name, hint)
        return d
    d = _inplace(torch.Tensor.sub_, _fp32(ctx, x), base)
    _check_finite(d, ckpt.path, info.name, "this expert's weights are corrupt: re-export it or leave it out")
    if info.transposed:
        t = d.mT.contiguous()
        ctx.pool.give(d)
        return t
    return d


def _lora_factors(ctx: StreamContext, x: LowRank, info: TensorInfo) -> Factors:
    """s·B·A as fp32 factors (b, a) on the device with b a shaped ``info.shape`` (orientation as in _lora_delta)."""
    m, n = info.shape
    if x.b is None:
        return Factors(torch.zeros(m, 0, device=ctx.device), torch.zeros(0, n, device=ctx.device))
    b = x.b.to(ctx.device, torch.float32, copy=True).mul_(x.scale)  # small copies the method keeps: the reader's
    a = x.a.to(ctx.device, torch.float32, copy=True)                # buffers go back to the pool
    ctx.pool.give(x.b)
    ctx.pool.give(x.a)
    if x.fan_in_fan_out == info.transposed:
        return Factors(b, a)
    return Factors(a.T.contiguous(), b.T.contiguous())    # (B·A)ᵀ = Aᵀ Bᵀ


def _lora_delta(ctx: StreamContext, x: LowRank, info: TensorInfo) -> torch.Tensor:
    """s·B·A in fp32 on the device, shaped ``info.shape`` (the method's orientation); zeros when ``x`` has no factors.

    B·A is (out, in); the stored weight is its transpose with fan_in_fan_out, and the method sees the stored weight
    transposed back when ``info.transposed``: so the product is transposed exactly when the two flags differ.
    """
    if ctx.device.type == "cpu":
        d = ctx.pool.take(4 * info.numel).view(torch.float32).view(info.shape)
    else:
        d = torch.empty(info.shape, dtype=torch.float32, device=ctx.device)
    if x.b is None:
        return d.zero_()
    b, a = _fp32(ctx, x.b), _fp32(ctx, x.a)        # (rows, r), (r, in): small
    b.mul_(x.scale)
    if x.fan_in_fan_out == info.transposed:
        torch.mm(b, a, out=d)
    else:
        torch.mm(a.T, b.T, out=d)                   # (B·A)ᵀ, written contiguous
    ctx.pool.give(b)
    ctx.pool.give(a)
    return d


def _base_on_device(ctx: StreamContext, x: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The base piece on the device, in its stored dtype (the CPU: ``x`` itself)."""
    b = x.to(ctx.device, non_blocking=True)
    _check_finite(b, ctx.plan.base.path, info.name, "the base's weights are corrupt: re-download it")
    return b


@contextlib.contextmanager
def compute_threads(ctx: StreamContext, info: TensorInfo) -> Iterator[None]:
    """Elementwise work (a row-chunkable tensor, a prepass) on half the torch threads, at least one.

    It is memory-bound: on an idle 2-core machine one thread is as fast as two (ties trim=tensor 7.4 s vs 7.2 s on
    bench/speed.py's model), and the reader thread needs a core. With another process busy on one core, two threads
    can wait on each other at every op: 8.2 s with one thread, 8.2–18.9 s with two over four runs (the spread
    depends on the scheduler). Outputs are bit-identical either way (elementwise ops do not depend on the thread
    count). Matrix rules keep every thread for their products.
    """
    before = torch.get_num_threads()
    elementwise = info.cls not in MERGED or ctx.method.row_chunkable(ctx.params, info)
    if ctx.device.type == "cpu" and elementwise and before > 1:
        torch.set_num_threads(max(1, before // 2))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_groups(pieces: list[Piece]) -> list[list[Piece]]:
    """Consecutive pieces writing one output tensor (its row chunks, in order)."""
    groups: list[list[Piece]] = []
    for p in pieces:
        if groups and groups[-1][0].target == p.target:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def whole_info(group: list[Piece]) -> TensorInfo:
    """The tensor a group of pieces (``tensor_groups``) writes, as the method sees it whole."""
    first = group[0]
    if first.rows is None:
        return first.info
    return replace(first.info, shape=(group[-1].rows[1],) + first.info.shape[1:], row_start=0)


def prepass_rounds(method: type[MergeMethod], params: Any, scope: str, info: TensorInfo | None = None) -> int:
    """Rounds of the rule's prepass of this scope; with ``info``, 0 for a tensor the per-tensor prepass skips."""
    pre = method.prepass_for(params)
    if pre is None or pre.scope != scope or (info is not None and not pre.covers(params, info)):
        return 0
    return pre.rounds


def stream_volume(ctx: StreamContext, pieces: list[Piece], todo: list[Piece]) -> int:
    """Bytes a merge of ``todo`` (out of ``pieces``) reads: a model-wide prepass over every source tensor, each
    tensor's per-tensor prepass rounds (with its own parameters), and the merge's own passes."""
    sources = [p for p in pieces if p.target == p.info.name]
    per_tensor = 0
    for g in tensor_groups(todo):
        params = _tensor_context(ctx, g[0].info).params
        per_tensor += read_volume(ctx.plan, g, ctx.method.passes_for(params))
        if g[0].info.cls in MERGED:
            per_tensor += prepass_rounds(ctx.method, params, "tensor", whole_info(g)) * read_volume(ctx.plan, g, 1)
    return prepass_rounds(ctx.method, ctx.params, "model") * read_volume(ctx.plan, sources, 1) + per_tensor


def _observe(ctx: StreamContext, pre: Any, round_: int, piece: Piece, fetch: Prefetcher) -> None:
    """Feed every expert's Δ of ``piece`` (the next reads of ``fetch``) to a prepass."""
    _, x = fetch.next()
    base = _base_on_device(ctx, x, piece.info)
    ctx.progress(x.nbytes)
    pre.base = base.mT if piece.info.transposed else base   # rules on the weights (slerp) read W0 too
    for t in range(ctx.plan.n_experts):
        ckpt, y = fetch.next()
        ctx.progress(y.nbytes)
        delta = _delta(ctx, ckpt, y, base, piece.info)
        pre.observe(round_, piece.info, t, delta)
        if not isinstance(delta, Factors):       # a LoRA expert's factors are no pooled buffer
            ctx.pool.give(delta)
    pre.base = None
    ctx.pool.give(base)


def run_prepass(ctx: StreamContext, pieces: list[Piece]) -> Any:
    """Rounds over every expert tensor for a model-wide statistic (global TIES thresholds); returns its state."""
    rounds = prepass_rounds(ctx.method, ctx.params, "model")
    if not rounds:
        return None
    sources = [p for p in pieces if p.info.cls in MERGED and p.target == p.info.name]
    pre = ctx.method.prepass_for(ctx.params)(ctx.plan.n_experts, ctx.params)
    for round_ in range(rounds):
        fetch = Prefetcher((r for p in sources for r in piece_reads(ctx.plan, p, 1)), ctx.pool, ctx.prefetch_bytes)
        try:
            for piece in sources:
                with compute_threads(ctx, piece.info):
                    _observe(ctx, pre, round_, piece, fetch)
        finally:
            fetch.close()
        if ctx.reduce is not None:                  # each rank observed its own tensors: sum them
            ctx.reduce(pre.counts(round_))
        pre.end_round(round_)
    return pre.state()


def _merge_reads(ctx: StreamContext, groups: list[list[Piece]], contexts: list[StreamContext],
                 rounds: list[int]) -> Iterator:
    """Every read of run_merge, in the order it consumes them: per tensor, its prepass rounds, then its pieces;
    each marked held (read only when asked for) if it belongs to a piece merged alone or is the first read after
    one (not read while it finalizes)."""
    after_alone = False
    for group, pctx, n_rounds in zip(groups, contexts, rounds):
        reads = []
        if group[0].info.cls in MERGED:
            reads = [(r, False) for _ in range(n_rounds) for p in group for r in piece_reads(ctx.plan, p, 1)]
        for p in group:
            alone = alone_bytes(pctx.method, pctx.params, p, ctx.plan.n_experts) is not None
            reads += [(r, alone) for r in piece_reads(ctx.plan, p, ctx.method.passes_for(pctx.params))]
        for (ckpt, name, rows), held in reads:
            yield ckpt, name, rows, held or after_alone
            after_alone = held


def run_merge(ctx: StreamContext, pieces: list[Piece], state: Any, write: Callable[[str, torch.Tensor], None],
              settle: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Merge and ``write`` every piece in order; returns per-tensor statistics the method reported.

    ``state`` is the model-wide prepass's; a per-tensor prepass runs over each tensor's pieces just before them.
    ``settle()`` returns once every piece written so far is out of memory: called before a piece merged alone.
    """
    groups = tensor_groups(pieces)
    contexts = [_tensor_context(ctx, g[0].info) for g in groups]
    rounds = [prepass_rounds(ctx.method, c.params, "tensor", whole_info(g)) for g, c in zip(groups, contexts)]
    fetch = Prefetcher(_merge_reads(ctx, groups, contexts, rounds), ctx.pool, ctx.prefetch_bytes)
    stats: dict[str, dict[str, float]] = {}
    try:
        for group, pctx, n_rounds in zip(groups, contexts, rounds):
            with compute_threads(pctx, group[0].info):
                _merge_group(ctx, pctx, group, state, n_rounds, fetch, write, settle, stats)
    finally:
        fetch.close()
    return stats


def _tensor_context(ctx: StreamContext, info: TensorInfo) -> StreamContext:
    """The context one tensor is merged in: its device (the CPU when its statistics do not fit the device) and its
    parameters (a recipe's gradients and filters)."""
    if info.name in ctx.cpu_tensors:
        ctx = replace(ctx, device=torch.device("cpu"))
    if ctx.params_for is not None:
        ctx = replace(ctx, params=ctx.params_for(info))
    return ctx


def _merge_group(ctx: StreamContext, pctx: StreamContext, group: list[Piece], state: Any, rounds: int,
                 fetch: Prefetcher, write: Callable[[str, torch.Tensor], None], settle: Callable[[], None],
                 stats: dict[str, dict[str, float]]) -> None:
    """One output tensor: its per-tensor prepass rounds (if any), then each of its pieces merged and written."""
    info = group[0].info
    tensor_state = state
    if rounds and info.cls in MERGED:
        pre = ctx.method.prepass_for(pctx.params)(ctx.plan.n_experts, pctx.params)
        for round_ in range(rounds):
            for piece in group:
                _observe(pctx, pre, round_, piece, fetch)
            pre.end_round(round_)
        tensor_state = pre.state()
    if ctx.calib is not None and info.cls in MERGED:
        tensor_state = ctx.calib.state_for(info)
    for piece in group:
        if alone_bytes(pctx.method, pctx.params, piece, ctx.plan.n_experts) is not None:
            settle()                             # the plan counts no earlier output beside this piece
        _, x = fetch.next()
        ctx.progress(x.nbytes)
        out_dtype = ctx.plan.out_dtype[piece.target]
        if piece.info.cls not in MERGED:         # INT buffers and HEADs keep the base's value
            write(piece.target, x.to(out_dtype))
            continue
        base = _base_on_device(pctx, x, piece.info)
        del x
        merged, piece_stats = _merge_piece(pctx, piece, base, tensor_state, fetch)
        ctx.pool.give(base)
        if ctx.calib is not None and piece.rows is None:
            ctx.calib.merged(piece.target, merged)
        if piece.rows is None and piece_stats:
            stats[piece.target] = piece_stats
        write(piece.target, _to_output(ctx, merged, out_dtype))


def read_base(ctx: StreamContext, piece: Piece, fetch: Prefetcher) -> torch.Tensor:
    """The base's ``piece``, the next read of ``fetch``, on the device (give it back to ``ctx.pool`` when done)."""
    _, x = fetch.next()
    ctx.progress(x.nbytes)
    return _base_on_device(ctx, x, piece.info)


def expert_deltas(ctx: StreamContext, piece: Piece, base: torch.Tensor,
                  fetch: Prefetcher) -> tuple[Callable[[int, int], Any], Callable[[Any], None]]:
    """``drive``'s ``delta`` and ``added`` for ``piece``: each expert's Δ as the merge forms it (LoRA products or
    factors, transposes, vocabulary rows), read in turn from ``fetch``; a dense Δ goes back to the pool once used."""
    def delta(pass_: int, t: int) -> torch.Tensor | Factors:
        ckpt, y = fetch.next()
        ctx.progress(y.nbytes)
        return _delta(ctx, ckpt, y, base, piece.info)     # y goes back to the pool before the method works

    def added(d: torch.Tensor | Factors) -> None:
        if not isinstance(d, Factors):                    # factors stay with the method until it finalizes
            ctx.pool.give(d)
    return delta, added


def _merge_piece(ctx: StreamContext, piece: Piece, base: torch.Tensor, state: Any,
                 fetch: Prefetcher) -> tuple[torch.Tensor, dict[str, float]]:
    base_m = base.mT if piece.info.transposed else base
    delta, added = expert_deltas(ctx, piece, base, fetch)
    merged, stats = drive(ctx.method, ctx.params, piece.info, ctx.plan.n_experts, delta, state,
                          base=base_m if ctx.method.needs_base else None, buffers=ctx.pool, added=added)
    out = merged if ctx.deltas else _inplace(torch.Tensor.add_, merged, base_m)   # W* = W0 + Δ*, fp32
    return (out.mT if piece.info.transposed else out), stats


def _to_output(ctx: StreamContext, merged: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``merged`` cast to the output dtype in a contiguous CPU buffer from the pool (the writer gives it back)."""
    if merged.dtype == dtype and merged.device.type == "cpu" and merged.is_contiguous():
        return merged
    out = ctx.pool.take(merged.numel() * dtype.itemsize).view(dtype).view(merged.shape)
    out.copy_(merged)
    ctx.pool.give(merged)
    return out
