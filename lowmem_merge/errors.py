"""One error hierarchy: every failure a user can cause names the file, the tensor and what to do."""
from __future__ import annotations

from pathlib import Path


class LowmergeError(Exception):
    """An error the user can act on. Rendered as ``path: tensor: message`` plus ``hint: ...``."""

    def __init__(self, msg: str, *, path: str | Path | None = None, tensor: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        self.hint = hint

    def __str__(self) -> str:
        parts = [p for p in (self.path, self.tensor) if p]
        line = ": ".join(parts + [self.msg])
        return f"{line}\nhint: {self.hint}" if self.hint else line


class InputError(LowmergeError):
    """Missing tensor, shape or dtype mismatch, NaN/Inf, truncated or unreadable file."""


class ConfigError(LowmergeError):
    """Unknown method, bad parameter, bad recipe or option."""


class BudgetError(LowmergeError):
    """The memory budget cannot hold what one tensor needs."""


class OutputError(LowmergeError):
    """Disk full, output exists, output incomplete, resume mismatch."""


class ExportError(LowmergeError):
    """ONNX export failed."""


class ValidationError(ExportError):
    """onnxruntime and PyTorch disagree beyond tolerance; ``diffs`` holds the numbers."""

    def __init__(self, msg: str, *, diffs: dict | None = None, **kw) -> None:
        super().__init__(msg, **kw)
        self.diffs = diffs or {}
