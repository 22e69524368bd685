"""Quantized copies of an exported fp32 graph with onnxruntime's own tools, and what they cost and lose.

int8: dynamic quantization (int8 weights per output channel, activations quantized per call) of MatMul and Gemm.
Its weights use 7 of the 8 bits (``reduce_range``): onnxruntime's u8 x s8 kernel for x86 CPUs without VNNI
(AVX2: vpmaddubsw) adds adjacent pairs of products in int16, which saturates for full-range weights
(2 * 255 * 127 > 32767) and silently corrupts results there (measured 29 % error on the logits of the test Llama);
with |w| <= 64 no pair can overflow, so the file gives the same results on every CPU it is deployed to.
int4: weight-only 4-bit (MatMulNBits, symmetric, blocks of 32 along the input dimension) of MatMul; activations
stay fp32 and onnxruntime dequantizes blocks on the fly (``accuracy_level=4`` lets it compute in int8 on CPUs).
onnxruntime's 4-bit quantizer takes only MatMul, so the plain ``Gemm(x, W) + b`` that GPT-2's Conv1D layers and
2-D heads export to is first rewritten as ``MatMul(x, W) + b``.
Both quantizers load the whole fp32 model (weights included) into memory: their peak is measured and reported.
Agreement is measured against the fp32 ONNX model on the validation inputs; on random-weight test models it
says the graph is right, not how much accuracy a trained model keeps.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lowmem_merge.errors import ConfigError, ExportError

from . import runtime
from .folders import scratch_beside
from .memory import step_peak
from .validate import Case, cases, combine, compare

SCHEMES = ("int8", "int4")
INT4_BLOCK = 32
LATENCY_SHAPE = (1, 64)  # (batch, seq) of the fixed latency input


def quantized_path(fp32: Path, scheme: str) -> Path:
    """``model.onnx`` -> ``model.int8.onnx`` (its weights in ``model.int8.onnx.data``)."""
    return fp32.with_name(f"{fp32.stem}.{scheme}.onnx")


def files_bytes(onnx_path: Path) -> int:
    """The graph plus its external data, when there is any."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize(fp32: Path, scheme: str) -> tuple[Path, dict]:
    """Write the quantized model beside ``fp32``; returns its path and the quantization step's peak memory."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}", hint=f"use one of {', '.join(SCHEMES)}")
    runtime.require("onnx", "onnxruntime")
    out = quantized_path(fp32, scheme)
    with _quiet_root_logger(), step_peak() as mem, scratch_beside(out) as tmp:
        try:
            (_int8 if scheme == "int8" else _int4)(fp32, tmp / out.name)
        except (ValueError, RuntimeError, KeyError) as e:
            raise ExportError(f"onnxruntime's {scheme} quantizer failed: {str(e).splitlines()[0]}", path=fp32,
                              hint="run with --debug for its traceback") from e
        data = tmp / (out.name + ".data")    # the weights first: the graph appearing means both are there
        if data.exists():
            shutil.copymode(tmp / out.name, data)    # onnxruntime writes it 0600: unreadable to the deploying user
            os.replace(data, out.with_name(data.name))
        os.replace(tmp / out.name, out)
    return out, mem


def _int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)


def _int4(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    model = onnx.load(src)
    _gemm_to_matmul(model.graph)
    config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True, accuracy_level=4, bits=4)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


def _gemm_to_matmul(graph) -> None:
    """``Gemm(x, W[, b])`` with a weight initializer and no scaling -> ``MatMul(x, W') [+ b]`` (W' = W or W^T)."""
    from onnx import helper, numpy_helper
    weights = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = weights[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=node.name + "_bias"))
    del graph.node[:]
    graph.node.extend(nodes)


QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


def count_quantized(path: Path) -> dict[str, int]:
    """How many matrix products were quantized, and how many float ones are left (activation x activation
    products in attention, and weights with several consumers such as a tied lm_head, stay float)."""
    import onnx
    graph = onnx.load(path, load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    return {"quantized": sum(op in QUANTIZED_OPS for op in ops),
            "float": sum(op in ("MatMul", "Gemm") for op in ops)}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizers log advice ("consider pre-processing") on the root logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def latency_case(vocab: int, max_len: int) -> Case:
    batch, seq = LATENCY_SHAPE[0], min(LATENCY_SHAPE[1], max_len)
    ids = np.random.default_rng(1).integers(0, vocab, size=(batch, seq), dtype=np.int64)
    return Case(f"{batch}x{seq}", ids, np.ones_like(ids))


def describe(path: Path, timed: Case) -> dict:
    """Size on disk and median onnxruntime latency for the fixed input."""
    sess = runtime.session(path)
    return {"path": str(path), "bytes": files_bytes(path), "provider": sess.get_providers()[0],
            "latency_ms": runtime.latency_ms(sess, timed.feeds()), "latency_input": timed.label,
            "threads": os.cpu_count()}


def agreement(fp32: Path, quantized: Path, vocab: int, max_len: int, logits: bool) -> dict:
    """The quantized model against the fp32 ONNX model on the validation inputs."""
    ref, got = runtime.session(fp32), runtime.session(quantized)
    rows = [compare(ref.run(None, c.feeds())[0], got.run(None, c.feeds())[0], c.mask, logits)
            for c in cases(vocab, max_len)]
    return combine(rows)
