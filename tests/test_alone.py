"""A tensor merged alone (MergeMethod.phase_bytes: statistics far larger than its reads): the stream reads nothing
ahead of it and lets the writer finish first, so the plan (budget.alone_piece_bytes) counts neither. Real
safetensors files, the real reader thread and writer thread; the measured peaks are in test_tiled_spd.py and
test_wide_rows.py."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lowmem_merge.budget import COMPUTE_BYTES, alone_piece_bytes
from lowmem_merge.device import BufferPool
from lowmem_merge.info import TensorClass, TensorInfo
from lowmem_merge.io.checkpoint import open_checkpoint
from lowmem_merge.io.writer import ShardWriter, plan_shards
from lowmem_merge.methods import REGISTRY
from lowmem_merge.stream import Piece, Prefetcher, alone_bytes


class CountingPool(BufferPool):
    """A pool that counts the reader's allocations: one per tensor read."""

    def __init__(self) -> None:
        super().__init__(limit=0)
        self.taken = 0

    def take(self, nbytes: int) -> torch.Tensor:
        self.taken += 1
        return super().take(nbytes)


def until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def checkpoint(tmp_path: Path):
    save_file({f"t{i}": torch.full((4, 4), float(i)) for i in range(3)}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        yield ckpt


def test_held_reads_wait_until_the_consumer_asks(checkpoint) -> None:
    pool = CountingPool()
    fetch = Prefetcher([(checkpoint, f"t{i}", None, True) for i in range(3)], pool)
    try:
        time.sleep(0.3)
        assert pool.taken == 0                 # nothing read before the consumer asks
        for i in range(3):
            _, x = fetch.next()
            assert float(x[0, 0]) == i
            time.sleep(0.2)
            assert pool.taken == i + 1         # the next one is not read while this one is worked on
    finally:
        fetch.close()


def test_other_reads_go_ahead_within_the_budget(checkpoint) -> None:
    pool = CountingPool()
    fetch = Prefetcher([(checkpoint, f"t{i}", None) for i in range(3)], pool, budget=1 << 20)
    try:
        assert until(lambda: pool.taken == 3)  # all three read ahead: they fit the read-ahead budget
        assert [float(fetch.next()[1][0, 0]) for _ in range(3)] == [0.0, 1.0, 2.0]
    finally:
        fetch.close()


def test_wait_idle_returns_once_every_piece_is_written_and_released(tmp_path: Path) -> None:
    specs = [(f"t{i}", torch.float32, (256, 256)) for i in range(3)]
    shards = plan_shards(specs, 1 << 30)
    released: list[int] = []
    gate = threading.Event()

    def release(t: torch.Tensor) -> None:
        gate.wait()                            # the writer is slow: held here until the test lets it go
        released.append(int(t[0, 0]))

    writer = ShardWriter(tmp_path, shards, {}, lambda *a: None, release)
    writer.write("t0", torch.full((256, 256), 0.0))
    writer.write("t1", torch.full((256, 256), 1.0))
    waiter = threading.Thread(target=writer.wait_idle)
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and released == []   # still writing: wait_idle has not returned
    gate.set()
    waiter.join(10)
    assert not waiter.is_alive() and released == [0, 1]
    writer.write("t2", torch.full((256, 256), 2.0))
    writer.close()
    data = (tmp_path / shards[0].partial).read_bytes()[len(shards[0].header):]
    assert torch.frombuffer(bytearray(data), dtype=torch.float32).view(3, 256, 256)[:, 0, 0].tolist() == [0, 1, 2]


def test_wait_idle_raises_the_writers_error(tmp_path: Path) -> None:
    shards = plan_shards([("t0", torch.float32, (4, 4))], 1 << 30)
    (tmp_path / shards[0].partial).mkdir()     # the shard cannot be created
    writer = ShardWriter(tmp_path, shards, {}, lambda *a: None)
    writer.write("t0", torch.zeros(4, 4))
    with pytest.raises(Exception, match="partial"):
        writer.wait_idle()
    writer.abort()


@pytest.mark.parametrize("rule", ["actmat", "wudi_cfs", "wudi", "ace"])
def test_a_whole_lin_tensor_is_merged_alone_and_priced_by_its_phases(rule: str) -> None:
    """The rules that give phase_bytes have a whole LIN tensor merged alone; its price is the larger phase with
    Δ, the base piece and the expert's piece as read (or the output), below the price of a piece that is not."""
    cls = REGISTRY[rule]
    params = cls.Params() if hasattr(cls, "Params") else None
    info = TensorInfo("model.layers.0.mlp.down_proj.weight", (512, 2048), TensorClass.LIN)
    whole, chunk = Piece(info, info.name, None), Piece(info, info.name, (0, 256))
    adding, finishing = alone_bytes(cls, params, whole, 3)
    assert alone_bytes(cls, params, chunk, 3) is None
    norm = TensorInfo("model.norm.weight", (512,), TensorClass.VEC)
    assert alone_bytes(cls, params, Piece(norm, norm.name, None), 3) is None
    stored, pool = 2 * info.numel, 64 << 20
    price = alone_piece_bytes(whole, (adding, finishing), stored, pool)
    assert price == max(adding + 4 * info.numel + 2 * stored, finishing + 2 * stored) + pool + COMPUTE_BYTES
    old = cls.state_bytes(info, 3, params) + 8 * info.numel + 4 * stored + max(pool, stored) + pool
    assert price < old
