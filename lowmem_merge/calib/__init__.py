"""Merges that use calibration data (RegMean, Chain of Merges): the data, the model run block by block, the walk."""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError, InputError


def require_transformers(what: str = "a calibrated merge") -> ModuleType:
    """transformers (tokenizer and model classes), or a ConfigError saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{what} needs transformers", hint="pip install 'lowmerge[hf]'") from None
    return transformers


def refuse_remote_code(directory: Path) -> None:
    """Refuse a model whose config or tokenizer config names its own code (``auto_map``): transformers would offer
    to run Python from the input. lowmerge loads only what transformers has built in (trust_remote_code=False)."""
    for name in ("config.json", "tokenizer_config.json"):
        path = directory / name
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (ValueError, OSError, RecursionError):
            continue             # unreadable: the loader that needs it says so
        if isinstance(data, dict) and data.get("auto_map"):
            raise InputError(f"{name} names custom code (auto_map), which lowmerge never runs", path=directory,
                             hint="use a model whose architecture and tokenizer transformers has built in; "
                                  "data-free merges of one vocabulary need neither")
