"""Models named by their Hugging Face id (``org/name``, optionally ``@revision``), found in the local Hugging Face
cache only (HF_HUB_CACHE, HF_HOME or ~/.cache/huggingface/hub): lowmerge never downloads, and never waits on the
network for a name that is not there."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve(path: str | Path) -> Path:
    """``path`` itself when it exists or cannot be a hub id; else the cached snapshot of that id."""
    p = Path(path)
    if p.exists() or not HUB_ID.match(str(path)):
        return p
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:        # without huggingface_hub there is no cache to look in
        return p
    repo, _, revision = str(path).partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        raise InputError("neither a local path nor a model in the local Hugging Face cache", path=str(path),
                         hint="download it first (huggingface-cli download " + repo + "), or give a local "
                              "directory; lowmerge reads the cache only and never downloads") from None
    except HFValidationError:   # shaped like an id but not a valid one (models/my--model): a missing path
        raise InputError("no such file or directory", path=str(path), hint="check the path") from None
