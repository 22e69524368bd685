"""Device choice and the process's peak memory, as the memory rule measures it."""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch

from .errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` = the first CUDA device when present, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}", hint="use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} asked for, but CUDA is not available", hint="use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} does not exist: {torch.cuda.device_count()} CUDA device(s)",
                              hint="use cuda:0 .. cuda:N-1")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {spec!r}", hint="use auto, cpu, cuda or cuda:N")
    return dev


def peak_rss_bytes() -> int:
    """Peak resident set of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def limit_heap_growth() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold up to 32 MiB after large frees, so tensors of a few MiB would otherwise be
    carved from a heap that fragments and never shrinks: the resident set would grow with the number of tensors.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
