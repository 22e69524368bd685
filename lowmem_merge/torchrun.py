"""A merge under torchrun: which rank writes which tensor, each rank's shards and working directory, and rank 0
gathering every rank's shards and outcome. In one process everything here is rank 0's."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import distributed
from .device import peak_device_bytes, peak_rss_bytes
from .errors import LowmergeError
from .info import TensorClass
from .io.outdir import OutputDir
from .io.reader import SINGLE_NAME
from .io.writer import Shard, plan_shards
from .methods import MergeMethod
from .output import claim_output
from .plan import Plan
from .quantize import Quantizer
from .stream import Piece, prepass_rounds, read_volume, tensor_groups


def owners(plan: Plan, method: type[MergeMethod], params: Any, pieces: list[Piece], world: int) -> dict[str, int]:
    """Which rank writes each output tensor (every one is rank 0's in a single process).

    Whole tensors, never row chunks of one (a per-tensor prepass sees all of a tensor), balanced by an estimate of
    each tensor's time: its bytes read over every pass and prepass round at 1 GB/s, plus for a rule that solves a
    matrix problem per LIN tensor (one that is not row-chunkable there) n_experts · 2·m·n·min(m, n) FLOPs at
    100 GFLOP/s: a Gram or an SVD per expert dominates those rules.
    """
    groups = tensor_groups(pieces)
    if world == 1:
        return {g[0].target: 0 for g in groups}
    reads = (method.passes_for(params) + prepass_rounds(method, params, "model")
             + prepass_rounds(method, params, "tensor"))
    costs = []
    for group in groups:
        info = group[0].info
        cost = read_volume(plan, group, reads) / 1e9
        if info.cls == TensorClass.LIN and not method.row_chunkable(params, info) and len(info.shape) >= 2:
            m, n = info.shape[-2:]
            cost += plan.n_experts * 2 * m * n * min(m, n) * (info.numel // (m * n)) / 1e11
        costs.append(cost)
    owner = distributed.partition(costs, world)
    return {g[0].target: r for g, r in zip(groups, owner)}


def rank_shards(plan: Plan, quantizer: Quantizer | None, owner: dict[str, int], world: int,
                shard_bytes: int) -> list[list[Shard]]:
    """Each rank's shards (its tensors in plan order), named in one sequence over all ranks."""
    per_rank: list[list] = [[] for _ in range(world)]
    for i in plan.tensors:
        spec = (i.name, plan.out_dtype[i.name], plan.entry(i.name).shape)
        per_rank[owner[i.name]].extend(quantizer.specs(*spec) if quantizer else [spec])
    attached = quantizer.attached() if quantizer else frozenset()
    by_rank = [plan_shards(specs, shard_bytes, attached) if specs else [] for specs in per_rank]
    total = sum(len(r) for r in by_rank)
    names = iter([SINGLE_NAME] if total == 1 else
                 [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)])
    return [[dataclasses.replace(s, name=next(names)) for s in shards] for shards in by_rank]


@dataclasses.dataclass(frozen=True)
class RanksDone:
    """Rank 0's view once every rank finished: OUT, and each rank's outcome (its report entry)."""
    outdir: OutputDir
    ranks: list[dict]


def run_ranks(dist: distributed.Dist, stack: contextlib.ExitStack, out: Path, fingerprint: dict, files: list[str],
              by_rank: list[list[Shard]], resume: bool, force: bool,
              stream: Callable[[OutputDir], tuple[dict, int, dict]], n_tensors: int,
              device: Any) -> RanksDone | None:
    """Rank 0 claims OUT; every rank streams its share into its own directory; rank 0 gathers the shards.
    Returns None on the other ranks; raises on every rank if any failed (naming it)."""
    outdir, error = None, None
    if dist.is_main:
        try:
            outdir = claim_output(stack, out, fingerprint, files, resume=resume, force=force)
        except LowmergeError as e:
            error = e
    dist.sync(error)                           # nobody writes unless rank 0 may use the directory
    work = stack.enter_context(_rank_dir(out, dist.rank, fingerprint, resume))
    resumed = sorted(work.done_shards)
    ranks = _stream_rank(dist, work, stream, by_rank[dist.rank], resumed, n_tensors, device)
    if not dist.is_main:
        return None
    for r, shards in enumerate(by_rank):       # under their partial names: OutputDir.finish gives the final ones
        for s in shards:
            os.replace(out / distributed.RANK_DIR.format(r) / s.partial, out / s.partial)
    return RanksDone(outdir, ranks)


def remove_rank_dirs(out: Path, world: int) -> None:
    for r in range(world):
        shutil.rmtree(out / distributed.RANK_DIR.format(r), ignore_errors=True)


def _rank_dir(out: Path, rank: int, fingerprint: dict, resume: bool) -> OutputDir:
    """This rank's working directory inside OUT, with its own resume manifest (a new run starts it empty)."""
    path = out / distributed.RANK_DIR.format(rank)
    if not resume:
        shutil.rmtree(path, ignore_errors=True)
    return OutputDir(path, {**fingerprint, "rank": rank}, resume=resume)


def _stream_rank(dist: distributed.Dist, work: OutputDir, stream: Callable[[OutputDir], tuple[dict, int, dict]],
                 shards: list[Shard], resumed: list[str], n_tensors: int, device: Any) -> list[dict]:
    """This rank's share, then every rank's outcome."""
    t0 = time.perf_counter()
    error: BaseException | None = None
    stats, bytes_read, timings = {}, 0, {}
    try:
        stats, bytes_read, timings = stream(work)
    except distributed.RankFailed:
        raise                                       # another rank failed during a prepass round: all stop there
    except Exception as e:
        error = e
    payload = {"rank": dist.rank, "tensors": n_tensors, "shards": [s.name for s in shards],
               "resumed_shards": resumed, "bytes_read": bytes_read, "tensor_stats": stats,
               "timings_s": {**timings, "rank_total": time.perf_counter() - t0},
               "peak_rss_bytes": peak_rss_bytes(), "peak_device_bytes": peak_device_bytes(device)}
    return dist.sync(error, payload)
