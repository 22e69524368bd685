"""Where an export writes: its folder made, or refused in one line, before any work starts, and its files written
under fresh temporary names, then renamed (issue 20).

A regular file in the way or a folder without write permission would otherwise surface as a traceback from the first
mkdir or temporary file, after the model had been traced or read.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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


@contextlib.contextmanager
def scratch_beside(out: Path) -> Iterator[Path]:
    """A new hidden folder beside ``out`` (a fresh random name: nothing planted there can redirect the writes),
    removed when the block ends; the caller renames its finished files into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """``path`` replaced whole by ``data`` as JSON, written under a fresh temporary name first."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
