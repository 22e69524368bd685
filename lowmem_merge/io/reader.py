"""Read one tensor (or a row range of it) of one checkpoint, and nothing more.

Safetensors files are never mapped: the header is parsed here and each tensor's byte range is read with
``preadv`` into a fresh buffer that the caller owns. A mapped file counts in the resident set as soon as it is
touched, which would make peak memory grow with the model; page cache used by ``pread`` does not.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 8, 64 * 2**10   # sample_hash: 512 KiB read per file
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_NOT_SAFETENSORS_HINT = "pass a Hugging Face model directory or a .safetensors file; re-download or re-save the file"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``nbytes`` bytes at absolute ``offset`` of ``path``."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime_ns: int
    header_sha256: str
    sample_sha256: str = ""      # sample_hash of the file: --resume's check of the bytes the header does not cover


def _fail(path: Path, msg: str, hint: str = _NOT_SAFETENSORS_HINT) -> InputError:
    return InputError(msg, path=path, hint=hint)


def read_header(path: Path) -> tuple[dict[str, TensorEntry], FileInfo]:
    """Parse and check a safetensors header: every error the header can show is raised here."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"not a safetensors file: only {size} bytes")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
                raise _fail(path, f"not a safetensors file or truncated: header length {hlen} "
                                  f"does not fit a file of {size} bytes")
            raw = f.read(hlen)
            sample = sample_hash(f.fileno(), 8 + hlen, size)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path=path, hint="check the path and its permissions") from None
    header = _parse_header(path, raw)
    header.pop("__metadata__", None)
    data_start = 8 + hlen
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        entries[name] = _entry(path, name, spec, data_start, size)
    _check_layout(path, entries, data_start)
    info = FileInfo(str(path), size, path.stat().st_mtime_ns, hashlib.sha256(raw).hexdigest(), sample)
    return entries, info


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is an error (as in safetensors), not the last one silently kept."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise _fail(path, f"not a valid safetensors file: the header names {e.args[0]!r} twice") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _fail(path, "not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file: its header is not a JSON object")
    return header


def _check_layout(path: Path, entries: dict[str, TensorEntry], data_start: int) -> None:
    """As safetensors validates: in offset order, each tensor's bytes start where the previous one's end (from 0),
    so no two tensors share bytes and none hides in a gap."""
    end = data_start
    for e in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        if e.offset != end:
            what = "overlap the previous tensor's" if e.offset < end else "leave a gap after the previous tensor"
            raise InputError(f"invalid data_offsets: this tensor's bytes {what} (starts at {e.offset - data_start}, "
                             f"expected {end - data_start})", path=path, tensor=e.name, hint=_NOT_SAFETENSORS_HINT)
        end += e.nbytes


def sample_hash(fd: int, start: int, size: int) -> str:
    """sha256 of SAMPLE_BLOCKS blocks of SAMPLE_BLOCK_BYTES at fixed places of bytes [start, size) (all of them when
    they fit): a cheap check that the data did not change. A change between the blocks goes unseen."""
    h = hashlib.sha256()
    span = size - start
    if span <= SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES:
        offsets, block = [start], span
    else:
        step = (span - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1)
        offsets, block = [start + k * step for k in range(SAMPLE_BLOCKS)], SAMPLE_BLOCK_BYTES
    for off in offsets:
        h.update(os.pread(fd, block, off))
    return h.hexdigest()


def _entry(path: Path, name: str, spec: object, data_start: int, size: int) -> TensorEntry:
    try:
        dtype = ST_DTYPES[spec["dtype"]]
        shape = tuple(_count(s) for s in spec["shape"])
        begin, end = (_count(x) for x in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise InputError("malformed safetensors header entry (dtype, shape and data_offsets: non-negative "
                         "integers expected)", path=path, tensor=name, hint=_NOT_SAFETENSORS_HINT) from None
    numel = 1
    for s in shape:
        numel *= s
    if end - begin != numel * dtype.itemsize:
        raise InputError(f"header says {end - begin} bytes for shape {list(shape)} {spec['dtype']}",
                         path=path, tensor=name, hint=_NOT_SAFETENSORS_HINT)
    if data_start + end > size:
        raise InputError(f"file is truncated: the tensor ends at byte {data_start + end} but the file has {size}",
                         path=path, tensor=name, hint="the download or copy was cut short: fetch the file again")
    return TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)


def _count(x: object) -> int:
    """A shape or offset value: a non-negative JSON integer (safetensors' usize), nothing else."""
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise ValueError(x)
    return x


def read_into(entry: TensorEntry, fd: int, rows: tuple[int, int] | None = None,
              alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor (or rows ``[r0, r1)`` of its first dimension) as a CPU tensor in its stored dtype.

    ``alloc(nbytes)`` supplies the uint8 buffer (default: a new one); the caller owns the result.
    """
    shape, offset, nbytes = entry.shape, entry.offset, entry.nbytes
    if rows is not None:
        row_bytes = nbytes // shape[0] if shape[0] else 0
        offset += rows[0] * row_bytes
        nbytes = (rows[1] - rows[0]) * row_bytes
        shape = (rows[1] - rows[0],) + shape[1:]
    buf = alloc(nbytes) if alloc else torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise InputError(f"file ended while reading ({done} of {nbytes} bytes)", path=entry.path,
                             tensor=entry.name, hint="the file changed or was truncated during the merge")
        done += n
    return buf.view(entry.dtype).reshape(shape)
