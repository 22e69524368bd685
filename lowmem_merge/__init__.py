"""lowmerge: a streaming, low-memory model merger.

    from lowmem_merge import merge
    report = merge("base/", ["expert1/", "expert2/"], "out/", method="actmat", rho=1e-3)
"""
__version__ = "0.1.0"

from .errors import (BudgetError, ConfigError, ExportError, InputError, LowmergeError,  # noqa: E402
                     OutputError, ValidationError)
from .merge import merge  # noqa: E402
from .report import Report  # noqa: E402

__all__ = ["merge", "Report", "LowmergeError", "InputError", "ConfigError", "BudgetError", "OutputError",
           "ExportError", "ValidationError", "__version__"]
