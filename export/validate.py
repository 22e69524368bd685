"""onnxruntime against transformers in PyTorch on the same padded inputs: the diffs as data.

Errors are measured only where ``attention_mask == 1``: outputs at padded positions are unspecified (a fully
masked row of Llama + SDPA differs by up to 0.5 between the two and means nothing). The relative error is
``max|onnx - torch| / max|torch|`` over those positions, a scale-free number that does not blow up where a logit
crosses zero as an elementwise ratio would.

Tolerance, fp32: 1e-4 relative. The exported graph does the same fp32 operations in another order (fused
attention, other matmul blocking); each such difference is a few ulps (2^-24 ~ 6e-8) of the values, and they
compound over layers: tiny models measure 1e-7..1e-6 relative, a 0.85B Llama 1.2e-5 absolute on logits of
magnitude ~10 (~1e-6 relative). 1e-4 leaves two orders of magnitude for deeper models, while every real defect
(a wrong or untransposed weight, a lost mask, shifted positions) moves logits by 1e-2 of their scale or more.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowmem_merge.errors import ValidationError

from . import models, runtime

FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Case:
    """One input batch: ``mask`` is 0 on padding."""
    label: str
    input_ids: np.ndarray  # (batch, seq) int64
    mask: np.ndarray       # (batch, seq) int64

    def feeds(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.mask}


def cases(vocab: int, max_len: int, seed: int = 0) -> list[Case]:
    """Three batches: no padding; left padding (as for generation); right padding (as for encoders).

    The shapes differ from the (2, 8) example the graph was traced with, so they also exercise the dynamic axes.
    """
    rng = np.random.default_rng(seed)
    out = []
    for batch, seq, pad in ((1, 7, None), (2, 16, "left"), (3, 33, "right")):
        seq = min(seq, max_len)
        ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        if pad == "left":
            mask[0, :5] = 0
        elif pad == "right":
            mask[1, seq - 9:] = 0
            mask[2, seq // 2:] = 0
        out.append(Case(f"{batch}x{seq}" + (f" {pad}-padded" if pad else ""), ids, mask))
    return out


def max_length(config) -> int:
    """The longest sequence absolute position embeddings allow (RoPE models: no limit that matters here)."""
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512)


def compare(ref: np.ndarray, got: np.ndarray, mask: np.ndarray, logits: bool) -> dict:
    """max abs / relative error over unpadded positions, and top-1 agreement when the output is logits."""
    if ref.ndim == 3:                       # per token: (batch, seq, features) -> (positions, features)
        keep = mask.astype(bool)
        ref, got = ref[keep], got[keep]
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    scale = float(np.abs(ref).max()) or 1.0
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean()) if logits else None
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale, "top1": top1,
            "positions": int(ref.shape[0])}


def combine(rows: list[dict]) -> dict:
    """Worst errors over all cases; top-1 agreement over all positions."""
    n = sum(r["positions"] for r in rows)
    top1 = None if rows[0]["top1"] is None else sum(r["top1"] * r["positions"] for r in rows) / n
    return {"max_abs": max(r["max_abs"] for r in rows), "max_rel": max(r["max_rel"] for r in rows),
            "top1": top1, "positions": n}


def validate(model_dir: Path, onnx_path: Path, tolerance: float = FP32_TOLERANCE, seed: int = 0) -> dict:
    """Run both on :func:`cases`; the report says ``passed`` when every relative error is within ``tolerance``."""
    t0 = time.perf_counter()
    config = models.load_config(model_dir)
    kind = models.kind_of(config, model_dir)
    sess = runtime.session(onnx_path)
    reference = _load_reference(model_dir, kind)
    rows = []
    for case in cases(config.vocab_size, max_length(config), seed):
        with torch.no_grad():
            ref = reference(input_ids=torch.from_numpy(case.input_ids),
                            attention_mask=torch.from_numpy(case.mask))[kind.output].numpy()
        got = sess.run(None, case.feeds())[0]
        rows.append({"case": case.label, **compare(ref, got, case.mask, kind.output == "logits")})
    total = combine(rows)
    return {"reference": f"transformers {type(reference).__name__} (PyTorch, fp32, SDPA)",
            "provider": sess.get_providers()[0], "output": kind.output, "tolerance_rel": tolerance,
            "passed": total["max_rel"] <= tolerance, **total, "cases": rows,
            "seconds": time.perf_counter() - t0}


def _load_reference(model_dir: Path, kind: models.Kind) -> torch.nn.Module:
    """The whole model in fp32: validation needs about the model's fp32 size in memory, twice with onnxruntime's."""
    import transformers
    model = models.from_pretrained(getattr(transformers, kind.auto_class), model_dir)
    model.config.use_cache = False
    return model


def raise_if_failed(report: dict, onnx_path: Path) -> None:
    if not report["passed"]:
        worst = max(report["cases"], key=lambda r: r["max_rel"])
        raise ValidationError(
            f"onnxruntime and PyTorch disagree: max relative error {report['max_rel']:.2e} > tolerance "
            f"{report['tolerance_rel']:.0e} (worst case {worst['case']}, max abs {worst['max_abs']:.2e})",
            path=onnx_path, diffs=report,
            hint="the export is wrong for this architecture: please report it with the JSON report beside the model")
