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


def tune_malloc() -> None:
    """Keep freed tensor buffers in the heap for reuse instead of returning them to the OS at every free.

    Tensors up to 32 MiB (row chunks, most layers) then come from a heap that keeps up to 256 MiB free at its top,
    so a merge does not page-fault through fresh zeroed pages for every tensor (that cost 3-4x in wall time); larger
    tensors are mapped and unmapped as usual. Fixed thresholds also stop glibc from moving them as it goes, which
    kept the peak resident set from depending on the order of frees.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)
