"""One merge split across processes started by torchrun: each rank merges a share of the tensors.

The data-free rules are independent per tensor, so ranks never exchange tensors. Every rank builds the same plan,
the same partition (``partition``: whole tensors, largest estimated cost first to the least-loaded rank) and the
same shard layout (``rank_shards``), so none of that needs communication. Ranks talk only to
  - sum a model-wide prepass's counts (global TIES thresholds) after each round (``all_reduce``),
  - agree at each such point, and at the end, that every rank is still well (``sync``: a rank that failed makes
    every rank stop, naming it and its error, instead of leaving the others waiting),
  - hand rank 0 every rank's timings and peaks for the report.
Each rank writes its shards under ``OUT/.lowmerge-rank<r>/`` with its own resume manifest; rank 0 moves them into
``OUT`` under their final names and writes the index, report and card only after every rank succeeded, so the
directory never looks complete before the whole merge is.

Backends: gloo for everything on the CPU; with CUDA, NCCL for device tensors (each rank on cuda:LOCAL_RANK) and gloo
for the small host-side exchanges.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch

from .errors import LowmergeError

RANK_DIR = ".lowmerge-rank{}"
TIMEOUT = datetime.timedelta(minutes=60)   # a rank waits this long for the slowest at a sync point


class RankFailed(LowmergeError):
    """Another rank failed: this rank stops too, naming it."""


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sync(self, error: BaseException | None = None, payload: Any = None) -> list[Any]:
        """Every rank's ``payload``, once every rank got here; RankFailed (or this rank's own ``error``) if any
        rank arrived with an error."""
        import torch.distributed as tdist
        mine = {"error": _describe(error), "payload": payload}
        gathered: list[Any] = [None] * self.world
        tdist.all_gather_object(gathered, mine)
        if error is not None:
            raise error
        failed = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"]]
        if failed:
            raise RankFailed("; ".join(f"rank {r} failed: {msg}" for r, msg in failed),
                             hint="fix that rank's error and rerun with --resume (finished shards are kept)")
        return [g["payload"] for g in gathered]

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` (host tensors) over ranks, in place; a sync point first."""
        import torch.distributed as tdist
        self.sync()
        for t in tensors:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)

    def close(self) -> None:
        import torch.distributed as tdist
        if tdist.is_initialized():
            tdist.destroy_process_group()


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return str(error) or type(error).__name__


def from_env() -> Dist | None:
    """The torchrun rank of this process (RANK, WORLD_SIZE, LOCAL_RANK), or None in a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> None:
    """Join the process group torchrun set up (MASTER_ADDR/PORT in the environment)."""
    import torch.distributed as tdist
    if tdist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world, timeout=TIMEOUT)


def partition(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item: largest cost first, each to the rank with the least so far (ties: lowest rank,
    then first item), a deterministic greedy within 4/3 of the best possible makespan."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner
