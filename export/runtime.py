"""Importing the ONNX stack and opening onnxruntime sessions, with the errors a user can act on.

onnxruntime and onnxruntime-gpu install the same ``onnxruntime/`` package folder: with both installed, the one
installed last silently wins and uninstalling either breaks the other, so two installed distributions are refused
here with the commands that repair the environment. onnxruntime-gpu without a working CUDA falls back to the CPU
while only logging an error, so every session reports the provider that actually runs it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import statistics
import time
from pathlib import Path
from types import ModuleType

from lowmem_merge.errors import ExportError

_ORT_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")
INSTALL_HINT = "pip install 'lowmerge[onnx-cpu]' (or 'lowmerge[onnx-gpu]' on a machine with CUDA)"


def require(*modules: str) -> list[ModuleType]:
    """Import ``modules`` (onnx, onnx_ir, onnxscript, transformers, onnxruntime), or say what to install."""
    out = []
    for name in modules:
        if name == "onnxruntime":
            out.append(onnxruntime())
            continue
        try:
            out.append(importlib.import_module(name))
        except ImportError as e:
            raise ExportError(f"ONNX export needs {name}, which is not installed ({e})", hint=INSTALL_HINT) from None
    return out


def installed_ort_dists() -> list[str]:
    found = []
    for dist in _ORT_DISTS:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def onnxruntime() -> ModuleType:
    """The onnxruntime module, after checking that exactly one onnxruntime distribution is installed."""
    dists = installed_ort_dists()
    if len(dists) > 1:
        raise ExportError(
            f"conflicting installs: {' and '.join(dists)} are both installed; they share one 'onnxruntime' "
            "package folder, so whichever was installed last is the one that runs and removing either breaks it",
            hint=f"pip uninstall -y {' '.join(dists)} && {INSTALL_HINT}")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(f"onnxruntime is not installed or does not import ({e})", hint=INSTALL_HINT) from None
    return ort


def providers() -> list[str]:
    """CUDA first when this onnxruntime build has it and a GPU answers, then the CPU."""
    ort = onnxruntime()
    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_present():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def build_note() -> str | None:
    """A line for the report when the installed build does not fit the machine (CPU build beside a GPU)."""
    if _cuda_present() and "CUDAExecutionProvider" not in onnxruntime().get_available_providers():
        return ("CUDA is present but the CPU build of onnxruntime is installed: "
                "pip uninstall -y onnxruntime && pip install 'lowmerge[onnx-gpu]'")
    return None


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def session(path: Path, threads: int | None = None):
    """An InferenceSession on the best provider; ``session.get_providers()[0]`` is the one that runs.

    TF32 is off on CUDA so that fp32 validation compares fp32 arithmetic on both sides.
    """
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    chosen = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in providers()]
    try:
        return ort.InferenceSession(str(path), opts, providers=chosen)
    except Exception as e:  # onnxruntime raises its own pybind exception types for unreadable models
        raise ExportError(f"onnxruntime cannot load the model: {str(e).splitlines()[0]}", path=path,
                          hint="re-export it; keep the .onnx and its .onnx.data file together") from None


def latency_ms(sess, feeds: dict, runs: int = 10) -> float:
    """Median wall time of ``runs`` calls after one warm-up call, in milliseconds."""
    sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
