"""The folder an export is written into: made, or refused in one line, before any work starts (issue 20).

A regular file in the way or a folder without write permission would otherwise surface as a traceback from the first
mkdir or temporary file, after the model had been traced or read.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from lowmem_merge.errors import OutputError


def make_parent(out: Path) -> None:
    """Create ``out``'s parent folder and check that files can be created in it."""
    existing = next(p for p in (out.parent, *out.parent.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise OutputError(f"cannot write here: {existing} is a file, not a folder", path=out,
                          hint="choose an -o in a folder you can write to")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(out.parent, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise OutputError(f"cannot write here: {e.strerror}", path=out,
                          hint="choose an -o in a folder you can write to") from None
