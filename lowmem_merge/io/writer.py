"""Output shards written tensor by tensor, under temporary names, renamed only when the whole merge is done.

Each shard's header is computed up front from (name, dtype, shape), so tensors (or row ranges of them) are appended
as soon as they are merged and then freed; nothing holds a shard in memory. A background thread writes and hashes
while the caller merges the next tensor. A finished shard is recorded, with its sha256, in the manifest, which is
what ``--resume`` trusts. Final names (``model.safetensors``, the index) appear last, so an interrupted directory
never looks complete.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import OutputError
from .reader import INDEX_NAME, SINGLE_NAME, ST_NAMES

MANIFEST_NAME = "lowmerge-manifest.json"
PARTIAL = ".partial"


@dataclass
class Shard:
    name: str                                   # final file name
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    header: bytes                               # 8-byte length + JSON, padded to 8
    size: int                                   # total file size

    @property
    def partial(self) -> str:
        return self.name + PARTIAL


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def plan_shards(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int,
                attached: frozenset[str] | set[str] = frozenset()) -> list[Shard]:
    """Split tensors in order into shards of at most ``shard_size`` bytes (a larger tensor gets its own).

    A name in ``attached`` stays in the shard of the tensor before it (a quantized weight's statistics: --resume
    skips or redoes a weight with everything written after it)."""
    groups: list[list] = [[]]
    used = 0
    for spec in specs:
        n = _nbytes(spec[1], spec[2])
        if groups[-1] and used + n > shard_size and spec[0] not in attached:
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += n
    shards = []
    for i, group in enumerate(groups):
        name = SINGLE_NAME if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {}, 0
        for tname, dtype, shape in group:
            n = _nbytes(dtype, shape)
            header[tname] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shards.append(Shard(name, group, struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + off))
    return shards


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def create_new(path: Path) -> BinaryIO:
    """``path`` opened for writing as a new regular file of this process.

    Whatever is at that name (a previous run's file, or a symlink planted there to redirect the write) is unlinked,
    never followed; O_EXCL and O_NOFOLLOW make the open fail if anything appears there again meanwhile.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    return os.fdopen(fd, "wb")


def write_new(path: Path, data: bytes) -> None:
    """``data`` as the new file ``path`` (``create_new``)."""
    with create_new(path) as f:
        f.write(data)


def copy_new(src: Path, dst: Path) -> None:
    """A copy of ``src`` as the new file ``dst`` (``create_new``: a link at ``dst`` is replaced, not followed)."""
    with open(src, "rb") as fin, create_new(dst) as fout:
        shutil.copyfileobj(fin, fout)


def write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    write_new(tmp, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
    os.replace(tmp, path)


def output_error(e: OSError, path: Path) -> OutputError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError("disk full while writing", path=path,
                           hint="free space (or choose another -o), then rerun with --resume: finished shards are kept")
    if e.errno == errno.EFBIG:
        return OutputError("file size limit reached while writing", path=path,
                           hint="raise the limit (ulimit -f) or use a smaller --shard-size, then rerun with --resume")
    return OutputError(f"cannot write: {e.strerror}", path=path, hint="check the output directory")


class ShardWriter:
    """Appends tensors to shards in plan order. ``done`` holds shards already complete (from a resumed run)."""

    def __init__(self, out_dir: Path, shards: list[Shard], done: dict[str, dict], on_shard_done,
                 release: Callable[[torch.Tensor], None] | None = None) -> None:
        self.out_dir = out_dir
        self._release = release                     # gets each written buffer back (for reuse)
        self.shards = shards
        self.done = done
        self._on_shard_done = on_shard_done        # callback(shard_name, record) from the writer thread's caller
        self._shard_of = {spec[0]: s for s in shards for spec in s.specs}
        self._queue: queue.Queue = queue.Queue(maxsize=1)   # one tensor waits while one is written
        self._error: BaseException | None = None
        self._finished: list[tuple[str, dict]] = []
        self._thread = threading.Thread(target=self._run, name="lowmerge-writer", daemon=True)
        self._thread.start()

    def needed(self, name: str) -> bool:
        return self._shard_of[name].name not in self.done

    def write(self, name: str, part: torch.Tensor) -> None:
        """Append ``part`` (the tensor, or its next rows) in the output dtype; the writer takes ownership. A tensor of
        a shard finished before (a resumed calibrated merge recomputes everything) is dropped."""
        self._raise_pending()
        if not self.needed(name):
            if self._release is not None:
                self._release(part)
            return
        self._queue.put((self._shard_of[name], part.contiguous().cpu()))
        self._drain_finished()

    def wait_idle(self) -> None:
        """Return once every tensor given so far is written and its buffer released (the stream calls it before a
        piece whose plan counts no output beside it); raise the writer's error if any."""
        written = threading.Event()
        self._queue.put(written)
        written.wait()
        self._raise_pending()
        self._drain_finished()

    def close(self) -> None:
        """Wait until every queued byte is written and every shard recorded; raise the writer's error if any."""
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()
        self._drain_finished()

    def abort(self) -> None:
        """Stop after what is queued; record the shards that did complete, so --resume keeps them."""
        self._queue.put(None)
        self._thread.join(timeout=60)
        try:
            self._drain_finished()
        except OSError:
            pass   # best effort while another error propagates: an unrecorded shard is only written again

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self._drain_finished()
            raise err

    def _drain_finished(self) -> None:
        while self._finished:
            self._on_shard_done(*self._finished.pop(0))

    def _run(self) -> None:
        current: Shard | None = None
        f = hasher = None
        written = 0
        try:
            while (item := self._queue.get()) is not None:
                if isinstance(item, threading.Event):  # wait_idle: everything before it is written
                    item.set()
                    continue
                if self._error is not None:
                    continue                         # keep draining so the producer never blocks
                shard, part = item
                if shard is not current:
                    current, written = shard, len(shard.header)
                    f = create_new(self.out_dir / shard.partial)
                    hasher = hashlib.sha256(shard.header)
                    f.write(shard.header)
                # 1-D, so that len(data) counts bytes (a 2-D memoryview's len is its number of rows)
                data = memoryview(part.reshape(-1).view(torch.uint8).numpy()) if part.numel() else b""
                f.write(data)
                hasher.update(data)
                written += len(data)
                del data
                if self._release is not None:
                    self._release(part)
                del part
                if written == shard.size:
                    f.flush()
                    os.fsync(f.fileno())
                    f.close()
                    self._finished.append((shard.name, {"sha256": hasher.hexdigest(), "size": shard.size}))
                    current = f = None
        except BaseException as e:  # stored and re-raised in the caller's thread; the queue is drained
            where = self.out_dir / (current.partial if current else "")
            self._error = output_error(e, where) if isinstance(e, OSError) else e
            while (item := self._queue.get()) is not None:
                if isinstance(item, threading.Event):
                    item.set()
        finally:
            if f is not None:
                try:
                    f.close()
                except OSError as e:   # flushing the rest of a shard that failed fails again (disk full, EFBIG)
                    self._error = self._error or output_error(e, self.out_dir / current.partial)


def write_models(out_dirs: list[Path], specs: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
                 shard_size: int) -> None:
    """Write whole safetensors models of the same tensors (shards + index each), one tensor name at a time:
    ``produce(name)`` yields that tensor of every model, in ``out_dirs``' order (the demo's base and experts share
    the base's tensor, generated once for all of them). One model's write overlaps the next one's tensor being
    made; at most one written tensor waits at a time, whatever the number of models."""
    shards = plan_shards(specs, shard_size)
    writers: list[ShardWriter] = []
    try:
        for d in out_dirs:
            d.mkdir(parents=True, exist_ok=True)
            writers.append(ShardWriter(d, shards, {}, lambda name, record: None))
        for name, dtype, _ in specs:
            last = None
            for writer, tensor in zip(writers, produce(name), strict=True):
                if last is not None:
                    last.wait_idle()
                writer.write(name, tensor.to(dtype))
                last = writer
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for d in out_dirs:
        for shard in shards:
            os.replace(d / shard.partial, d / shard.name)
        if len(shards) > 1:
            write_index(d, shards)


def write_index(out_dir: Path, shards: list[Shard]) -> None:
    total = sum(s.size - len(s.header) for s in shards)
    index = {"metadata": {"total_size": total}, "weight_map": {spec[0]: s.name for s in shards for spec in s.specs}}
    write_json_atomic(out_dir / INDEX_NAME, index)
