"""Text files the user names (a recipe, a MoE config, calibration data): regular files only.

A FIFO, socket or character device would block the read forever or stream without end (issue 20: export hung on a
shard that was a FIFO; the same held for --config, moe's CONFIG and --calib). Checked before opening, as the
checkpoint reader checks its shards.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import LowmergeError


def require_regular(path: str | Path, what: str, error: type[LowmergeError]) -> None:
    """Raise ``error`` in one line when ``path`` exists and is neither a regular file nor a directory (a directory
    gets the reader's own "Is a directory" line)."""
    p = Path(path)
    if p.exists() and not p.is_file() and not p.is_dir():
        raise error(f"the {what} is not a regular file (a FIFO, socket or device): reading it could block forever",
                    path=p, hint=f"give the {what} as a plain file")
