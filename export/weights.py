"""The weights of a Hugging Face directory, read one tensor at a time with ``pread``.

Export attaches each ONNX initializer to a reader from here, so a tensor is in memory only while it is written.
Files are never mapped: a mapped safetensors file counts in the resident set once its pages are touched, which
made the prototype's peak grow with the model (1.33x from 2 to 8 layers); page cache filled by ``pread`` does not.
This module is independent of lowmerge's merge reader on purpose: ``export/`` imports only ``lowmem_merge.errors``.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_merge.errors import InputError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HINT = "re-save the model with save_pretrained (safetensors) or fetch the file again"


@dataclass(frozen=True)
class Entry:
    """``nbytes`` bytes at absolute ``offset`` of ``path`` hold tensor ``name``."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int


class Weights:
    """Every tensor of a model directory (``model.safetensors`` or shards with an index), by checkpoint name."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.entries: dict[str, Entry] = {}
        for path in _safetensors_files(model_dir):
            self.entries.update(_read_header(path))

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor in its stored dtype; the caller owns (and frees) it."""
        e = self.entries[name]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        fd = os.open(e.path, os.O_RDONLY)
        try:
            done = 0
            while done < e.nbytes:
                n = os.preadv(fd, [view[done:]], e.offset + done)
                if n <= 0:
                    raise InputError(f"file ended while reading ({done} of {e.nbytes} bytes)", path=e.path,
                                     tensor=name, hint="the file changed or was truncated during the export")
                done += n
        finally:
            os.close(fd)
        return buf.view(e.dtype).reshape(e.shape)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InputError("malformed shard index: no weight_map", path=index, hint=_HINT) from None
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise InputError("no model.safetensors or model.safetensors.index.json", path=model_dir,
                     hint="export reads safetensors checkpoints: " + _HINT)


def _read_header(path: Path) -> dict[str, Entry]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            hlen = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if hlen < 0 or 8 + hlen > size:
                raise InputError(f"not a safetensors file, or truncated: {size} bytes", path=path, hint=_HINT)
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path=path, hint="check the path and its permissions") from None
    except (ValueError, UnicodeDecodeError):
        raise InputError("not a safetensors file: its header is not JSON", path=path, hint=_HINT) from None
    header.pop("__metadata__", None)
    return {name: _entry(path, name, spec, 8 + hlen, size) for name, spec in header.items()}


def _entry(path: Path, name: str, spec: dict, data_start: int, size: int) -> Entry:
    try:
        dtype = _DTYPES[spec["dtype"]]
        shape = tuple(int(s) for s in spec["shape"])
        begin, end = (int(x) for x in spec["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise InputError("malformed safetensors header entry", path=path, tensor=name, hint=_HINT) from None
    numel = 1
    for s in shape:
        numel *= s
    if begin < 0 or end - begin != numel * dtype.itemsize:
        raise InputError(f"header gives {end - begin} bytes for shape {list(shape)}", path=path, tensor=name,
                         hint=_HINT)
    if data_start + end > size:
        raise InputError(f"file is truncated: the tensor ends at byte {data_start + end} but the file has {size}",
                         path=path, tensor=name, hint="the download or copy was cut short: fetch the file again")
    return Entry(name, dtype, shape, path, data_start + begin, end - begin)
