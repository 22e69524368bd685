"""Export, then validate, then quantize, and one JSON report beside the model saying what each step measured."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import time
from pathlib import Path

from . import generation_check
from . import quantize as quant
from . import runtime
from .folders import write_json
from .genai_export import REPORT, GenaiResult, export_genai
from .memory import peak_rss_bytes, reset_peak, step_peak
from .onnx_export import export_onnx
from .validate import FP32_TOLERANCE, max_length, raise_if_failed, validate


def choose_format(model_dir: Path, fmt: str, out: Path) -> str:
    """``auto``: one plain graph when OUT names a .onnx file or the model is not a decoder LM (encoders,
    classifiers); the generation folder otherwise."""
    if fmt != "auto":
        return fmt
    if out.suffix == ".onnx":
        return "plain"
    from .models import kind_of, load_config
    return "genai" if kind_of(load_config(model_dir), model_dir).task == "causal-lm" else "plain"


def report_path(onnx_path: Path) -> Path:
    """``model.onnx`` -> ``model.report.json``."""
    return onnx_path.with_name(onnx_path.stem + ".report.json")


def run(model_dir: Path, out: Path, *, check: bool = True, schemes: tuple[str, ...] = (),
        tolerance: float = FP32_TOLERANCE, opset: int = 18, force: bool = False) -> dict:
    """The whole ``lowmerge export``; returns the report, also written to :func:`report_path`.

    A failed validation writes the report first and then raises ``ValidationError``; quantization runs only
    after a validation that passed (or none).
    """
    with step_peak() as mem:
        result = export_onnx(model_dir, out, opset=opset, force=force)
    report: dict = {
        "model_dir": str(model_dir), "task": result.task, "output": result.output,
        "export": {"path": str(out), "data_path": str(result.data_path), "opset": opset,
                   "bytes": quant.files_bytes(out), "seconds": result.seconds, **mem},
        "versions": _versions(), "notes": [],
    }
    if check or schemes:                    # onnxruntime is needed from here on, and only from here on
        report["notes"] += [n for n in [runtime.build_note()] if n]
    if check:
        with step_peak() as vmem:
            report["validation"] = validate(model_dir, out, tolerance)
        report["validation"]["peak_rss_bytes"] = vmem["peak_rss_bytes"]
        _write(report, out)
        raise_if_failed(report["validation"], out)
    if schemes:
        report["quantized"] = _quantize_all(model_dir, out, schemes, result.output == "logits")
    _write(report, out)
    return report


def run_genai(model_dir: Path, out: Path, *, precision: str = "fp32", check: bool = True,
              force: bool = False) -> dict:
    """The generation folder for onnxruntime-genai; returns the report, also written to ``out/export_report.json``.

    Validation runs on the finished folder before it gets its name: a failed fp32 validation leaves no folder,
    only its report at :func:`failed_report_path`, and raises ``ValidationError``.
    """
    require_genai()
    report: dict = {"model_dir": str(model_dir), "format": "genai", "precision": precision,
                    "versions": _versions(), "notes": []}
    step_only = reset_peak()

    def finish(folder: Path, result: GenaiResult) -> None:
        report["export"] = {"path": str(out), "bytes": result.bytes, "seconds": result.seconds,
                            "model_type": result.spec.model_type, "layers": result.spec.layers,
                            "peak_rss_bytes": peak_rss_bytes(), "peak_is_step_only": step_only}
        if check:
            with step_peak() as vmem:
                report["validation"] = generation_check.check(model_dir, folder, precision)
            report["validation"]["peak_rss_bytes"] = vmem["peak_rss_bytes"]
            if not report["validation"]["passed"]:
                _write_json(report, failed_report_path(out))
                generation_check.raise_if_failed(report["validation"], failed_report_path(out))
        _write_json(report, folder / REPORT)

    export_genai(model_dir, out, precision, force=force, check=finish)
    return report


def failed_report_path(out: Path) -> Path:
    return out.with_name(out.name + ".failed-validation.json")


def require_genai() -> None:
    """onnxruntime-genai (CPU build, or -cuda beside onnxruntime-gpu), or the pip command that installs it."""
    runtime.require("onnx", "transformers", "onnxruntime")
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        from lowmem_merge.errors import ExportError
        raise ExportError(f"the generation export needs onnxruntime-genai, which is not installed ({e})",
                          hint=runtime.INSTALL_HINT) from None


def _quantize_all(model_dir: Path, out: Path, schemes: tuple[str, ...], logits: bool) -> dict:
    from .models import load_config
    config = load_config(model_dir)
    vocab, max_len = config.vocab_size, max_length(config)
    timed = quant.latency_case(vocab, max_len)
    results = {"fp32": quant.describe(out, timed)}
    for scheme in schemes:
        t0 = time.perf_counter()
        path, mem = quant.quantize(out, scheme)
        mem["seconds"] = time.perf_counter() - t0
        results[scheme] = {**quant.describe(path, timed), **mem,
                           "vs_fp32": quant.agreement(out, path, vocab, max_len, logits),
                           "quantized_nodes": quant.count_quantized(path)}
    return results


def _write(report: dict, out: Path) -> None:
    _write_json(report, report_path(out))


def _write_json(report: dict, path: Path) -> None:
    write_json(path, report)


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": ",".join(f"{d} {importlib.metadata.version(d)}" for d in runtime.installed_ort_dists())
                           or "not installed",
            "onnxruntime-genai": _version_of("onnxruntime-genai", "onnxruntime-genai-cuda"),
            "python": platform.python_version()}


def _version_of(*dists: str) -> str:
    for dist in dists:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"
