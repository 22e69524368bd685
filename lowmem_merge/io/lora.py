"""A PEFT LoRA adapter directory as an expert: Δ = s·B·A per tensor, never written out as a full checkpoint.

Opening reads only the header and adapter_config.json. The reader thread reads the small factors (``LowRank``);
the merging thread forms the product in fp32 on the device (stream.py). Tensors the adapter does not touch have
Δ = 0; ``modules_to_save`` tensors replace the base's outright and are read like any expert tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from .reader import FileInfo, TensorEntry, read_header, read_into

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(\.[^.]+)?\.weight$")     # optional adapter name
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save(\.[^.]+)?(?P<param>\.[^.]+)$")
_ORIGINAL = re.compile(r"\.original_module(\.[^.]+)?\.[^.]+$")
_UNSUPPORTED_HINT = "lowmerge applies LoRA on Linear and GPT-2 Conv1D layers only (no DoRA, LoRA bias, " \
                    "embedding or conv LoRA): merge this adapter with PEFT's merge_and_unload first"


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight: Δ = scale·B·A with B (out, r), A (r, in); with fan_in_fan_out the base stores Δᵀ."""
    a: TensorEntry
    b: TensorEntry
    scale: float
    fan_in_fan_out: bool

    @property
    def stored_shape(self) -> tuple[int, int]:
        out, in_ = self.b.shape[0], self.a.shape[1]
        return (in_, out) if self.fan_in_fan_out else (out, in_)


@dataclass
class LowRank:
    """An adapter's piece of one tensor as read: Δ_stored = scale·b·a (its transpose with fan_in_fan_out).

    ``b`` and ``a`` are CPU tensors in the stored dtype, owned by the stream; both None when Δ = 0.
    """
    b: torch.Tensor | None            # (rows, r), or (out, r) with fan_in_fan_out
    a: torch.Tensor | None            # (r, in), or (r, rows) with fan_in_fan_out
    scale: float
    fan_in_fan_out: bool

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in (self.b, self.a) if x is not None)


class LoraAdapter:
    """An adapter directory: ``lora`` (base weight name -> factors) and ``entries`` (base name -> saved tensor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        cfg_path, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        self.adapter_config = _read_config(cfg_path)
        if not weights.is_file():
            raise InputError(f"no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}", path=path,
                             hint="re-save the adapter with save_pretrained(safe_serialization=True)")
        raw, info = read_header(weights)
        raw_cfg = cfg_path.read_bytes()
        st = cfg_path.stat()
        self.files = [info, FileInfo(str(cfg_path), st.st_size, st.st_mtime_ns, hashlib.sha256(raw_cfg).hexdigest())]
        self.lora, self.entries = _map_names(raw, self.adapter_config)
        self._fd: int | None = None
        self.aligned: dict = {}       # name -> vocab.AlignedRows: a saved tensor read in another vocabulary's order

    @property
    def label(self) -> str:
        return str(self.path)

    def read_bytes(self, name: str, rows: tuple[int, int] | None) -> int:
        """Bytes ``read`` reads for this piece (the factors, a saved tensor, or nothing)."""
        if name in self.entries:
            e = self.entries[name]
            return e.nbytes if rows is None else e.nbytes // e.shape[0] * (rows[1] - rows[0])
        f = self.lora.get(name)
        if f is None:
            return 0
        b_rows = rows[1] - rows[0] if rows is not None and not f.fan_in_fan_out else f.b.shape[0]
        return f.b.nbytes // f.b.shape[0] * b_rows + f.a.nbytes

    def read(self, name: str, rows: tuple[int, int] | None = None,
             alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor | LowRank:
        """A saved tensor (stored dtype), or the factors of stored rows ``rows`` of Δ (``LowRank``)."""
        if name in self.aligned:
            return self.aligned[name].read(rows, alloc)
        if name in self.entries:
            return self.read_raw(name, rows, alloc)
        if self._fd is None:
            self._fd = os.open(self.path / ADAPTER_WEIGHTS, os.O_RDONLY)
        f = self.lora.get(name)
        if f is None:
            return LowRank(None, None, 0.0, False)
        if not f.fan_in_fan_out:    # stored rows of Δ are rows of B
            return LowRank(read_into(f.b, self._fd, rows, alloc), read_into(f.a, self._fd, None, alloc), f.scale,
                           False)
        a = read_into(f.a, self._fd, None, alloc)   # stored rows of Δᵀ are columns of A
        return LowRank(read_into(f.b, self._fd, None, alloc), a if rows is None else a[:, rows[0]:rows[1]],
                       f.scale, True)

    def read_raw(self, name: str, rows: tuple[int, int] | None = None,
                 alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """A saved tensor as stored, whatever alignment ``aligned`` gives it."""
        if self._fd is None:
            self._fd = os.open(self.path / ADAPTER_WEIGHTS, os.O_RDONLY)
        return read_into(self.aligned[name].source if name in self.aligned else self.entries[name], self._fd, rows,
                         alloc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "LoraAdapter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
        r, alpha = cfg["r"], cfg["lora_alpha"]
        if not (_is_rank(r) and _is_number(alpha)):
            raise TypeError
    except (ValueError, OSError, KeyError, TypeError, RecursionError):
        raise InputError("not a LoRA adapter config: expected JSON with a positive integer 'r' and 'lora_alpha'",
                         path=path, hint="re-save the adapter with PEFT's save_pretrained") from None
    _check_patterns(cfg, path)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("target_parameters"):
        what = "DoRA" if cfg.get("use_dora") else "target_parameters" if cfg.get("target_parameters") \
            else f"peft_type {cfg.get('peft_type')}"
        raise InputError(f"{what} adapters are not supported", path=path, hint=_UNSUPPORTED_HINT)
    return cfg


def _is_rank(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_patterns(cfg: dict, path: Path) -> None:
    """rank_pattern / alpha_pattern: objects from a regular expression to a rank (a number for alpha)."""
    for key, valid, what in (("rank_pattern", _is_rank, "a positive integer"), ("alpha_pattern", _is_number,
                                                                                  "a number")):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise InputError(f"{key} is a JSON {type(patterns).__name__}, not an object", path=path,
                             hint=f"{key} maps module-name patterns to values: re-save the adapter with PEFT")
        for pattern, value in patterns.items():
            if not valid(value):
                raise InputError(f"{key}[{pattern!r}] is {value!r}, not {what}", path=path,
                                 hint="re-save the adapter with PEFT's save_pretrained")
            try:
                re.compile(pattern)
            except re.error as e:
                raise InputError(f"{key} key {pattern!r} is not a valid regular expression ({e})", path=path,
                                 hint="fix the pattern in adapter_config.json") from None


def _map_names(raw: dict[str, TensorEntry], cfg: dict) -> tuple[dict[str, LoraFactors], dict[str, TensorEntry]]:
    """Adapter keys to base names: ``X.lora_{A,B}[.NAME].weight`` give Δ of ``X.weight``; other tensors replace.

    A ``modules_to_save`` copy is the trained value and wins over a plain ``X.weight`` that PEFT also writes for a
    resized embedding (save_embedding_layers); ``X.original_module.*`` is PEFT's frozen copy of the base's module.
    """
    pairs: dict[str, dict[str, TensorEntry]] = {}
    saved: dict[str, TensorEntry] = {}
    trained: set[str] = set()
    for key, entry in raw.items():
        name = key.removeprefix(_PREFIX)
        if _ORIGINAL.search(name):
            continue
        if m := _LORA.match(name):
            pairs.setdefault(m["module"], {})[m["which"]] = entry
        elif re.search(r"(^|\.)lora_", name):
            raise InputError("not a LoRA factor lowmerge can apply", path=entry.path, tensor=key,
                             hint=_UNSUPPORTED_HINT)
        else:
            m = _SAVED.match(name)
            target = m["module"] + m["param"] if m else name
            if m or target not in trained:
                saved[target] = entry
            if m:
                trained.add(target)
    return {module + ".weight": _factors(module, ab, cfg) for module, ab in pairs.items()}, saved


def _factors(module: str, ab: dict[str, TensorEntry], cfg: dict) -> LoraFactors:
    some = next(iter(ab.values()))
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise InputError(f"{missing} of this module is missing", path=some.path, tensor=some.name,
                         hint="the adapter file is incomplete: re-save it")
    a, b = ab["A"], ab["B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise InputError(f"factors B {list(b.shape)} and A {list(a.shape)} are not a 2-D product", path=a.path,
                         tensor=a.name, hint=_UNSUPPORTED_HINT)
    r = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    if a.shape[0] != r:
        raise InputError(f"rank {a.shape[0]}, but adapter_config.json gives r={r} for this module", path=a.path,
                         tensor=a.name, hint="the config does not belong to these weights: re-save the adapter")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r    # PEFT's LoraLayer.update_layer
    if not abs(scale) <= torch.finfo(torch.float32).max:     # NaN too: Δ is formed in fp32
        raise InputError(f"lora_alpha {alpha!r} gives the scale {scale:g} for this module, which is not a finite fp32 "
                         "number", path=a.path.parent / ADAPTER_CONFIG, tensor=module + ".weight",
                         hint="fix lora_alpha (or alpha_pattern) in adapter_config.json")
    return LoraFactors(a, b, scale, bool(cfg.get("fan_in_fan_out")))


def _pattern(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup (utils.other.get_pattern_key): a key matches a name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
