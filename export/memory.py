"""Peak resident memory of this process, and of one step of it.

Linux keeps the high-water mark in VmHWM and lets a process reset it (``5`` into ``/proc/self/clear_refs``), so
the peak of one step (a quantization after an export in the same process) is measured without a subprocess.
Where the reset is not allowed the step's peak is the process's peak so far, which is an upper bound; the
report says which (``peak_is_step_only``). The reset also lowers what ``getrusage`` and ``/usr/bin/time`` later
report for the whole process, so the JSON report keeps each step's peak instead.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lowmem_merge.device import peak_rss_bytes


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def step_peak() -> Iterator[dict]:
    """``with step_peak() as m:`` ... then ``m["peak_rss_bytes"]`` is the peak during the block."""
    result: dict = {"peak_is_step_only": reset_peak()}
    try:
        yield result
    finally:
        result["peak_rss_bytes"] = peak_rss_bytes()
