"""A model on disk: its tensors' locations (headers only) and its directory's config."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePath

import torch

from ..errors import InputError
from .hub import resolve
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter
from .reader import (BIN_NAMES, INDEX_NAME, SINGLE_NAME, FileInfo, TensorEntry, read_header, read_into,
                     sample_hash)


class Checkpoint:
    """Headers of every file of one model, and a reader of one tensor at a time.

    Opening reads only headers. File descriptors stay open until ``close`` (no mapping, nothing resident).
    """

    def __init__(self, path: str | Path, entries: dict[str, TensorEntry], files: list[FileInfo],
                 model_dir: Path | None, config: dict | None, bin_state: dict | None = None) -> None:
        self.path = Path(path)
        self.entries = entries
        self.files = files
        self.model_dir = model_dir
        self.config = config
        self._bin_state = bin_state   # only for .bin checkpoints: tensors backed by torch.load(mmap=True)
        self._fds: dict[Path, int] = {}
        self.aligned: dict = {}       # name -> vocab.AlignedRows: read in another vocabulary's row order

    @property
    def label(self) -> str:
        return str(self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None,
             alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """A CPU tensor in the stored dtype, in a buffer from ``alloc(nbytes)`` if given; the caller owns it."""
        if name in self.aligned:
            return self.aligned[name].read(rows, alloc)
        return self.read_raw(name, rows, alloc)

    def read_raw(self, name: str, rows: tuple[int, int] | None = None,
                 alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """``read`` of the tensor as stored, whatever alignment ``aligned`` gives it."""
        entry = self.aligned[name].source if name in self.aligned else self.entries[name]
        if self._bin_state is not None:
            t = self._bin_state[name]
            return (t[rows[0]:rows[1]] if rows else t).clone()
        fd = self._fds.get(entry.path)
        if fd is None:
            try:
                fd = self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
            except OSError as e:
                raise InputError(f"cannot open: {e.strerror}", path=entry.path, tensor=name) from None
        return read_into(entry, fd, rows, alloc)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def input_paths(ck: Checkpoint | LoraAdapter) -> list[Path]:
    """Every path a model is read from: the directory or file given, and each of its files (as named: resolved, a
    symlink's target is judged too)."""
    return [ck.path, *(Path(f.path) for f in ck.files)]


def open_checkpoint(path: str | Path) -> Checkpoint | LoraAdapter:
    """A Hugging Face directory (single file or sharded), a .safetensors file, a .bin via mmap'd torch.load, a
    PEFT LoRA adapter directory (or its adapter_model.safetensors), or a Hugging Face id already in the local cache."""
    p = resolve(path)                   # a Hugging Face id: its snapshot in the local cache
    if not p.exists():
        raise InputError("no such file or directory", path=p, hint="check the path")
    if p.is_file() and p.name == ADAPTER_WEIGHTS and (p.parent / ADAPTER_CONFIG).is_file():
        return LoraAdapter(p.parent)
    if p.is_file():
        if p.suffix in (".bin", ".pt", ".pth"):
            return _open_bin(p, p.parent)
        entries, info = read_header(p)
        return Checkpoint(p, entries, [info], None, None)
    config = _read_config(p)
    if (p / INDEX_NAME).is_file():
        return _open_sharded(p, config)
    if (p / SINGLE_NAME).is_file():
        entries, info = read_header(p / SINGLE_NAME)
        return Checkpoint(p, entries, [info], p, config)
    if (p / BIN_NAMES[0]).is_file():
        return _open_bin(p / BIN_NAMES[0], p)
    if (p / ADAPTER_CONFIG).is_file():
        return LoraAdapter(p)
    found = sorted(x.name for x in p.glob("*.safetensors"))
    hint = f"found {', '.join(found)}: pass one of them as a file" if found else \
        "a model directory holds model.safetensors or model.safetensors.index.json"
    raise InputError("no model weights found in this directory", path=p, hint=hint)


def _read_config(model_dir: Path) -> dict | None:
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        return None
    try:
        config = json.loads(cfg.read_text())
    except (ValueError, OSError, RecursionError) as e:
        raise InputError(f"config.json is not readable JSON ({type(e).__name__}: {e})".split("\n")[0], path=cfg,
                         hint="fix or remove config.json") from None
    if not isinstance(config, dict):
        raise InputError(f"config.json holds a JSON {type(config).__name__}, not an object", path=cfg,
                         hint="fix or remove config.json")
    return config


def _open_sharded(model_dir: Path, config: dict | None) -> Checkpoint:
    index_path = model_dir / INDEX_NAME
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, OSError, RecursionError):
        raise InputError("not a valid index: expected JSON with a 'weight_map' object", path=index_path,
                         hint="re-save the model with save_pretrained") from None
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"the index gives {shard!r} as this tensor's shard, not a file name", path=index_path,
                             tensor=name, hint="re-save the model with save_pretrained")
        shards.setdefault(shard, set()).add(name)
    entries: dict[str, TensorEntry] = {}
    files: list[FileInfo] = []
    for shard in sorted(shards):
        shard_path = model_dir / shard
        # the entry is judged, not where a symlink leads: in the Hugging Face cache every file links to ../../blobs
        if not shard or PurePath(shard).is_absolute() or ".." in PurePath(shard).parts:
            raise InputError(f"the index names a shard outside the model directory: {shard!r}", path=index_path,
                             hint="an index may only name files inside its own directory")
        if not shard_path.is_file():
            raise InputError(f"the index names a missing shard {shard!r}", path=index_path,
                             tensor=sorted(shards[shard])[0], hint="the download is incomplete: fetch every shard")
        shard_entries, info = read_header(shard_path)
        files.append(info)
        for name in shards[shard]:
            if name not in shard_entries:
                raise InputError(f"the index places this tensor in {shard!r}, which does not hold it",
                                 path=index_path, tensor=name, hint="re-save the model with save_pretrained")
            entries[name] = shard_entries[name]
    return Checkpoint(model_dir, entries, files, model_dir, config)


def _open_bin(path: Path, model_dir: Path) -> Checkpoint:
    """PyTorch pickles only through torch.load(mmap=True, weights_only=True): never an unrestricted unpickle."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        raise InputError(f"cannot load as a weights-only PyTorch checkpoint: {type(e).__name__}: {e}".split("\n")[0],
                         path=path, hint="convert it to safetensors, or check that it holds only tensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("not a flat state dict of tensors", path=path, hint="convert it to safetensors")
    entries = {k: TensorEntry(k, v.dtype, tuple(v.shape), path, 0, v.numel() * v.element_size())
               for k, v in state.items()}
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        info = FileInfo(str(path), st.st_size, st.st_mtime_ns, "", sample_hash(f.fileno(), 0, st.st_size))
    return Checkpoint(path, entries, [info], model_dir, _read_config(model_dir), bin_state=state)
