"""Device choice and the process's peak memory, as the memory rule measures it."""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
import threading

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
    """Peak resident set of this process's own memory image.

    Linux: VmHWM from /proc/self/status. getrusage's ru_maxrss survives exec, so a process started by a large
    parent (fork, then exec) would report the parent's size; VmHWM belongs to the image that exec created.
    Elsewhere: ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def tune_malloc() -> None:
    """Serve every allocation of 1 MiB or more with its own mapping, returned to the OS when freed.

    glibc otherwise raises its mmap threshold up to 32 MiB after large frees and carves tensors of a few MiB from a
    heap that fragments and keeps freed memory: the resident set then drifts upward with the number of tensors,
    by an amount that depends on the order of frees. The cost, fresh zeroed pages for every buffer, is paid back
    by ``BufferPool`` for the buffers a merge allocates once per expert.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if not name:
        return
    libc = ctypes.CDLL(name)
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


class BufferPool:
    """Host byte buffers reused across tensors of the same size.

    A merge reads and converts tensors of a few recurring sizes (every layer of a kind, every row chunk) once per
    expert. Fresh allocations would page-fault through new zeroed memory each time (or, from glibc's heap,
    fragment it so the resident set drifts upward); reusing idle buffers avoids both. At most ``limit`` bytes sit
    idle. Pinned buffers (for CUDA copies) are left to torch's own caching host allocator. Thread-safe: the reader
    thread takes, the merging thread gives back.
    """

    def __init__(self, limit: int = 64 << 20, pin: bool = False) -> None:
        self.limit = limit
        self.pin = pin
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._order: list[int] = []          # sizes of idle buffers, oldest first
        self._idle_bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 CPU tensor of ``nbytes`` (contents undefined), owned by the caller until ``give``."""
        with self._lock:
            if self._idle.get(nbytes):
                self._order.remove(nbytes)
                self._idle_bytes -= nbytes
                return self._idle[nbytes].pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def give(self, t: torch.Tensor) -> None:
        """Return a buffer (any dtype or shape, as long as it is a whole contiguous buffer) for reuse."""
        if self.pin or t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() != 0 \
                or t.untyped_storage().nbytes() != t.nbytes or t.nbytes == 0:
            return
        flat = t.reshape(-1).view(torch.uint8)
        with self._lock:
            while self._order and self._idle_bytes + flat.nbytes > self.limit:
                old = self._order.pop(0)
                self._idle[old].pop()
                self._idle_bytes -= old
            if self._idle_bytes + flat.nbytes <= self.limit:
                self._idle.setdefault(flat.nbytes, []).append(flat)
                self._order.append(flat.nbytes)
                self._idle_bytes += flat.nbytes
