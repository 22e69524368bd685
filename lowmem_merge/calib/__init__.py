"""Merges that use calibration data (RegMean, Chain of Merges): the data, the model run block by block, the walk."""
from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError


def require_transformers(what: str = "a calibrated merge") -> ModuleType:
    """transformers (tokenizer and model classes), or a ConfigError saying how to get it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"{what} needs transformers", hint="pip install 'lowmerge[hf]'") from None
    return transformers
